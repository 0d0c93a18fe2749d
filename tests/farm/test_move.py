"""C-MOVE through the router against real Orthanc servers, with DCMTK movescu and storescp."""

from __future__ import annotations

import re
import time
from io import BytesIO

import pytest
from pydicom import dcmread
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from dicomrouter.pacsfarm import free_ports
from tests.support.find_support import edit_config, running_front, upload_study
from tests.support.move_support import getscu, movescu, received_sop_uids, workstation
from tests.support.orthanc_fixtures import WORKSTATION_AE, instance_bytes, make_test_instance

pytestmark = pytest.mark.slow


@pytest.fixture
def front(farm_config, router_port):
    with running_front(farm_config, router_port) as running:
        yield running


def test_move_study_to_workstation_direct(front, clean_orthanc_farm, workstation_port, tmp_path):
    study = upload_study(clean_orthanc_farm[0], series=2, images=2)
    with workstation(workstation_port, tmp_path / "ws") as folder:
        run = movescu(front.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study['study']}")
    assert run.status == 0x0000, run.output
    assert run.count("Completed") == 4
    assert received_sop_uids(folder) == set(study["sops"])
    # Not in the catalog at first: the federated C-FIND found it and the catalog learned.
    assert [row.server_name for row in front.catalog.where_study(study["study"])] == ["Test PACS 1"]


def test_move_series_and_image_level(front, clean_orthanc_farm, workstation_port, tmp_path):
    study = upload_study(clean_orthanc_farm[2], series=2, images=2)
    with workstation(workstation_port, tmp_path / "ws") as folder:
        series = movescu(
            front.port,
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={study['study']}",
            f"SeriesInstanceUID={study['series'][1]}",
        )
        assert series.status == 0x0000, series.output
        assert received_sop_uids(folder) == set(study["sops"][2:])
        image = movescu(
            front.port,
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study['study']}",
            f"SeriesInstanceUID={study['series'][0]}",
            f"SOPInstanceUID={study['sops'][0]}",
        )
    assert image.status == 0x0000, image.output
    assert image.count("Completed") == 1
    assert received_sop_uids(folder) == set(study["sops"][0:1] + study["sops"][2:])


def test_study_on_two_servers_counts_add_up(front, clean_orthanc_farm, workstation_port, tmp_path):
    first = upload_study(clean_orthanc_farm[0], images=2)
    second = upload_study(clean_orthanc_farm[1], study_uid=first["study"], images=3)
    with workstation(workstation_port, tmp_path / "ws") as folder:
        run = movescu(front.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={first['study']}")
    assert run.status == 0x0000, run.output
    assert run.count("Completed") == 5
    assert received_sop_uids(folder) == set(first["sops"] + second["sops"])


def test_unknown_destination_answers_a801_at_once(front, clean_orthanc_farm, tmp_path):
    study = upload_study(clean_orthanc_farm[0], images=1)
    started = time.monotonic()
    run = movescu(
        front.port,
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={study['study']}",
        destination="NOBODY",
    )
    assert run.status == 0xA801, run.output
    assert time.monotonic() - started < 3


def test_move_between_pacs_updates_catalog(front, clean_orthanc_farm):
    study = upload_study(clean_orthanc_farm[0], images=2)
    run = movescu(
        front.port,
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={study['study']}",
        destination="PROD_PACS_1",
    )
    assert run.status == 0x0000, run.output
    assert set(study["sops"]) <= set(clean_orthanc_farm[2].instance_sop_uids())
    holders = {row.server_name for row in front.catalog.where_study(study["study"])}
    assert holders == {"Test PACS 1", "Prod PACS 1"}


def test_source_down_fails_clearly_without_hanging(
    farm_config, router_port, clean_orthanc_farm, tmp_path
):
    dead_port = free_ports(1)[0]

    def add_dead_server(document):
        document["servers"].append(
            {
                "name": "Dead PACS",
                "ae_title": "DEAD_PACS",
                "host": "127.0.0.1",
                "port": dead_port,
                "environment": "test",
                "move_routing": {"WORKSTATION": "WORKSTATION"},
            }
        )

    edit_config(farm_config, add_dead_server)
    with running_front(farm_config, router_port) as front:
        study_uid = "1.2.826.0.1.3680043.8.498.999" + str(dead_port)
        front.catalog.record_study_seen("Dead PACS", study_uid, "found")
        started = time.monotonic()
        run = movescu(front.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}")
    assert time.monotonic() - started < 15
    assert run.status == 0xA702, run.output
    assert "Dead PACS" in run.error_comment and "cannot connect" in run.error_comment


def test_inactive_server_still_serves_its_history(
    farm_config, router_port, clean_orthanc_farm, workstation_port, tmp_path
):
    study = upload_study(clean_orthanc_farm[1], images=1)

    def deactivate(document):
        document["servers"][1]["active"] = False

    edit_config(farm_config, deactivate)
    with running_front(farm_config, router_port) as front:
        front.catalog.record_study_seen("Test PACS 2", study["study"], "found")
        with workstation(workstation_port, tmp_path / "ws") as folder:
            run = movescu(
                front.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study['study']}"
            )
    assert run.status == 0x0000, run.output
    assert received_sop_uids(folder) == set(study["sops"])


def test_cancel_mid_move_answers_fe00(front, clean_orthanc_farm, workstation_port, tmp_path):
    from pydicom import Dataset
    from pynetdicom import AE

    study = upload_study(clean_orthanc_farm[0], images=30)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study["study"]
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    with workstation(workstation_port, tmp_path / "ws"):
        assoc = ae.associate("127.0.0.1", front.port, ae_title="DICOMROUTER")
        assert assoc.is_established
        statuses = []
        for status, _identifier in assoc.send_c_move(
            identifier, "WORKSTATION", StudyRootQueryRetrieveInformationModelMove, msg_id=7
        ):
            statuses.append(int(status.Status))
            if len(statuses) == 2:
                assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelMove)
        assoc.release()
    assert statuses[-1] in (0xFE00, 0x0000), (
        statuses
    )  # Orthanc may finish before it reads the cancel


def test_get_study_with_getscu(front, clean_orthanc_farm, tmp_path):
    first = upload_study(clean_orthanc_farm[0], series=2, images=2)
    second = upload_study(clean_orthanc_farm[1], study_uid=first["study"], images=1)
    run = getscu(
        front.port,
        tmp_path / "got",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={first['study']}",
    )
    assert run.status == 0x0000, run.output
    assert run.count("Completed") == 5
    assert received_sop_uids(tmp_path / "got") == set(first["sops"] + second["sops"])


def test_get_one_series_with_getscu(front, clean_orthanc_farm, tmp_path):
    study = upload_study(clean_orthanc_farm[2], series=2, images=2)
    run = getscu(
        front.port,
        tmp_path / "got",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study['study']}",
        f"SeriesInstanceUID={study['series'][0]}",
    )
    assert run.status == 0x0000, run.output
    assert received_sop_uids(tmp_path / "got") == set(study["sops"][:2])


def _drop_routes(farm_config, source_index: int, *destinations: str) -> None:
    def drop(document):
        for destination in destinations:
            del document["servers"][source_index]["move_routing"][destination]

    edit_config(farm_config, drop)


def test_relay_to_workstation_at_each_level(
    farm_config, router_port, clean_orthanc_farm, workstation_port, tmp_path
):
    study = upload_study(clean_orthanc_farm[0], series=2, images=2)
    _drop_routes(farm_config, 0, "WORKSTATION")
    requests_log = tmp_path / "storescp.log"
    with running_front(farm_config, router_port) as front:
        with workstation(workstation_port, tmp_path / "ws", log_path=requests_log) as folder:
            whole = movescu(
                front.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study['study']}"
            )
            assert whole.status == 0x0000, whole.output
            assert whole.count("Completed") == 4
            assert received_sop_uids(folder) == set(study["sops"])
            # Relayed sub-operations name the caller's C-MOVE (PS3.7 9.1.1.1).
            dump = requests_log.read_text(errors="replace")
            originators = re.findall(r"Move Originator AE Title\s*:\s*(\S+)", dump)
            assert originators == [WORKSTATION_AE] * 4, dump[-2000:]
            assert len(re.findall(r"Move Originator ID\s*:\s*\d+", dump)) == 4
            image = movescu(
                front.port,
                "QueryRetrieveLevel=IMAGE",
                f"StudyInstanceUID={study['study']}",
                f"SeriesInstanceUID={study['series'][1]}",
                f"SOPInstanceUID={study['sops'][3]}",
            )
    assert image.status == 0x0000, image.output
    assert image.count("Completed") == 1


def test_relay_between_pacs_updates_catalog(farm_config, router_port, clean_orthanc_farm):
    study = upload_study(clean_orthanc_farm[0], images=2)
    _drop_routes(farm_config, 0, "Prod PACS 2")
    with running_front(farm_config, router_port) as front:
        run = movescu(
            front.port,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study['study']}",
            destination="PROD_PACS_2",
        )
        holders = {row.server_name for row in front.catalog.where_study(study["study"])}
    assert run.status == 0x0000, run.output
    assert set(study["sops"]) <= set(clean_orthanc_farm[3].instance_sop_uids())
    assert holders == {"Test PACS 1", "Prod PACS 2"}


def test_relay_to_a_destination_that_is_down_counts_each_instance_failed(
    farm_config, router_port, clean_orthanc_farm
):
    study = upload_study(clean_orthanc_farm[0], images=3)
    _drop_routes(farm_config, 0, "WORKSTATION")
    with running_front(farm_config, router_port) as front:  # no storescp listens
        run = movescu(front.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study['study']}")
    assert run.status != 0x0000, run.output
    assert run.count("Failed") == 3
    assert not run.count("Completed")


def test_relay_passes_a_large_instance_on_intact(farm_config, router_port, clean_orthanc_farm):
    # 512 KiB of pixels: more than one PDU each way (router.max_pdu_size is 256 KiB).
    ds = make_test_instance(rows=512, cols=512)
    clean_orthanc_farm[0].upload(instance_bytes(ds))
    _drop_routes(farm_config, 0, "Prod PACS 2")
    with running_front(farm_config, router_port) as front:
        run = movescu(
            front.port,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={ds.StudyInstanceUID}",
            destination="PROD_PACS_2",
        )
    assert run.status == 0x0000, run.output
    relayed = dcmread(BytesIO(clean_orthanc_farm[3].download_instance(ds.SOPInstanceUID)))
    assert relayed.PixelData == ds.PixelData
    assert relayed.PatientName == ds.PatientName


def test_destination_the_caller_may_not_send_to_is_refused(
    farm_config, router_port, clean_orthanc_farm
):
    study = upload_study(clean_orthanc_farm[0], images=1)
    edit_config(
        farm_config,
        lambda document: document["clients"][0].update(move_destinations=["WORKSTATION"]),
    )
    with running_front(farm_config, router_port) as front:
        run = movescu(
            front.port,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study['study']}",
            destination="PROD_PACS_1",
        )
    assert run.status == 0xC001, run.output
    assert "may not send to PROD_PACS_1" in run.error_comment
    assert study["sops"][0] not in clean_orthanc_farm[2].instance_sop_uids()


@pytest.mark.slow
def test_get_returns_a_large_instance_intact(front, clean_orthanc_farm, tmp_path):
    """The C-GET SCP holds instances on disk and sends them without re-encoding their values."""
    ds = make_test_instance(rows=512, cols=512)  # 512 KiB of pixel data, read from the held file
    ds.PixelData = bytes(range(256)) * (512 * 512 * 2 // 256)
    clean_orthanc_farm[0].upload(instance_bytes(ds))
    run = getscu(front.port, tmp_path / "got", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ds.StudyInstanceUID}")
    assert run.status == 0x0000, run.output
    received = list((tmp_path / "got").iterdir())
    assert len(received) == 1
    got = dcmread(received[0])
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert got.PixelData == ds.PixelData
    spool_tmp = front.config.router.spool / "tmp"
    assert not any(path.name.startswith("get-") for path in spool_tmp.iterdir()), "held files are removed"
