"""Retrieving a study that several PACS hold, whole or in parts (issue 12, items 1-3).

Real Orthanc servers behind the router, DCMTK movescu / getscu as the workstation and DCMTK
storescp as the C-MOVE destination, whose log counts every instance that arrives.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid

from dicomrouter.cli.main import cli
from dicomrouter.cli.move import move_command
from dicomrouter.pacsfarm import OrthancServer
from tests.support.find_support import edit_config, running_front
from tests.support.move_support import getscu, make_series, movescu, received_sop_uids, workstation
from tests.support.orthanc_fixtures import instance_bytes

pytestmark = pytest.mark.slow

if move_command.name not in cli.commands:
    cli.add_command(move_command)


@pytest.fixture
def front(farm_config, router_port):
    with running_front(farm_config, router_port) as running:
        yield running


def upload(server: OrthancServer, instances) -> None:
    for ds in instances:
        server.upload(instance_bytes(ds))


def sop_uids(instances) -> set[str]:
    return {ds.SOPInstanceUID for ds in instances}


def arrivals(storescp_log: Path) -> int:
    """Instances storescp received, duplicates included (it overwrites the file of a duplicate)."""
    return len(re.findall(r"Received Store Request", storescp_log.read_text(errors="replace")))


def test_study_held_whole_by_two_pacs_is_sent_once(
    front, clean_orthanc_farm, workstation_port, tmp_path
):
    study_uid = generate_uid()
    series = make_series(study_uid, 4)
    upload(clean_orthanc_farm[0], series)
    upload(clean_orthanc_farm[1], series)
    log = tmp_path / "storescp.log"
    with workstation(workstation_port, tmp_path / "ws", log_path=log) as folder:
        run = movescu(front.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}")
    assert run.status == 0x0000, run.output
    assert (run.count("Completed"), run.count("Failed"), run.count("Warning")) == (4, 0, 0)
    assert received_sop_uids(folder) == sop_uids(series)
    assert arrivals(log) == 4


def test_partial_copy_is_not_taken_when_a_whole_one_exists(
    front, clean_orthanc_farm, workstation_port, tmp_path
):
    """The primary holds 3 of 5 images, Test PACS 2 all 5: the 5 come from Test PACS 2, once."""
    study_uid = generate_uid()
    series = make_series(study_uid, 5)
    upload(clean_orthanc_farm[0], series[:3])
    upload(clean_orthanc_farm[1], series)
    front.catalog.record_study_seen(
        "Test PACS 1", study_uid, "found"
    )  # the catalog knows only the primary
    log = tmp_path / "storescp.log"
    with workstation(workstation_port, tmp_path / "ws", log_path=log) as folder:
        run = movescu(front.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}")
    assert run.status == 0x0000, run.output
    assert (run.count("Completed"), run.count("Failed"), run.count("Warning")) == (5, 0, 0)
    assert received_sop_uids(folder) == sop_uids(series)
    assert arrivals(log) == 5


def test_split_study_is_moved_whole(front, clean_orthanc_farm, workstation_port, tmp_path):
    """One series on Test PACS 1 (the catalog knows), another only on Test PACS 2 (it does not)."""
    study_uid = generate_uid()
    first, second = make_series(study_uid, 3), make_series(study_uid, 3, series_number=2)
    upload(clean_orthanc_farm[0], first)
    upload(clean_orthanc_farm[1], second)
    front.catalog.record_study_seen("Test PACS 1", study_uid, "found")
    log = tmp_path / "storescp.log"
    with workstation(workstation_port, tmp_path / "ws", log_path=log) as folder:
        run = movescu(front.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}")
    assert run.status == 0x0000, run.output
    assert run.count("Completed") == 6
    assert received_sop_uids(folder) == sop_uids(first + second)
    assert arrivals(log) == 6


def test_split_study_with_an_overlap_takes_each_series_once(
    front, clean_orthanc_farm, workstation_port, tmp_path
):
    """Series A on both (whole), B only on Test PACS 2, C only on the primary: 3 series, each once."""
    study_uid = generate_uid()
    a, b, c = (make_series(study_uid, 2, series_number=n) for n in (1, 2, 3))
    upload(clean_orthanc_farm[0], a + c)
    upload(clean_orthanc_farm[1], a + b)
    log = tmp_path / "storescp.log"
    with workstation(workstation_port, tmp_path / "ws", log_path=log) as folder:
        run = movescu(front.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}")
    assert run.status == 0x0000, run.output
    assert (run.count("Completed"), run.count("Failed"), run.count("Warning")) == (6, 0, 0)
    assert received_sop_uids(folder) == sop_uids(a + b + c)
    assert arrivals(log) == 6


def test_get_split_study_with_copies_returns_each_instance_once(
    front, clean_orthanc_farm, tmp_path
):
    study_uid = generate_uid()
    a, b = make_series(study_uid, 3), make_series(study_uid, 2, series_number=2)
    upload(clean_orthanc_farm[0], a)
    upload(clean_orthanc_farm[1], a + b)
    front.catalog.record_study_seen("Test PACS 1", study_uid, "found")
    run = getscu(
        front.port, tmp_path / "got", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"
    )
    assert run.status == 0x0000, run.output
    assert (run.count("Completed"), run.count("Failed"), run.count("Warning")) == (5, 0, 0)
    assert received_sop_uids(tmp_path / "got") == sop_uids(a + b)
    assert len(re.findall(r"Received C-STORE Request", run.output)) == 5, run.output[-3000:]


def test_patient_level_move_asks_only_servers_holding_something(
    front, clean_orthanc_farm, workstation_port, tmp_path
):
    """Orthanc answers 0xC000 to a C-MOVE matching nothing: the empty servers are not asked."""
    patient_id = "PAT" + generate_uid()[-10:]
    study = make_series(generate_uid(), 2, patient_id=patient_id)
    other_study = make_series(generate_uid(), 1, patient_id=patient_id)
    upload(clean_orthanc_farm[0], study)
    upload(clean_orthanc_farm[2], other_study)
    with workstation(workstation_port, tmp_path / "ws") as folder:
        run = movescu(
            front.port, "QueryRetrieveLevel=PATIENT", f"PatientID={patient_id}", model="-P"
        )
    assert run.status == 0x0000, run.output
    assert (run.count("Completed"), run.count("Failed"), run.count("Warning")) == (3, 0, 0)
    assert received_sop_uids(folder) == sop_uids(study + other_study)


def test_patient_level_get_asks_only_servers_holding_something(front, clean_orthanc_farm, tmp_path):
    patient_id = "PAT" + generate_uid()[-10:]
    study = make_series(generate_uid(), 2, patient_id=patient_id)
    upload(clean_orthanc_farm[1], study)
    run = getscu(
        front.port,
        tmp_path / "got",
        "QueryRetrieveLevel=PATIENT",
        f"PatientID={patient_id}",
        model="-P",
    )
    assert run.status == 0x0000, run.output
    assert run.count("Completed") == 2
    assert received_sop_uids(tmp_path / "got") == sop_uids(study)


def test_move_command_sends_a_study_held_twice_once(
    farm_config, clean_orthanc_farm, workstation_port, tmp_path
):
    study_uid = generate_uid()
    a, b = make_series(study_uid, 4), make_series(study_uid, 2, series_number=2)
    upload(clean_orthanc_farm[0], a[:2] + b)  # the primary: half of A, all of B
    upload(clean_orthanc_farm[1], a)  # Test PACS 2: all of A
    log = tmp_path / "storescp.log"
    with workstation(workstation_port, tmp_path / "ws", log_path=log) as folder:
        result = CliRunner().invoke(
            cli,
            ["--config", str(farm_config), "move", study_uid, "--to", "WORKSTATION"],
            catch_exceptions=False,
        )
    assert result.exit_code == 0, result.output
    assert "6 completed, 0 failed, 0 warning" in result.output
    assert "copies differ" in result.output
    assert received_sop_uids(folder) == sop_uids(a + b)
    assert arrivals(log) == 6


def test_move_to_an_inactive_server_is_refused(farm_config, router_port, clean_orthanc_farm):
    study_uid = generate_uid()
    series = make_series(study_uid, 1)
    upload(clean_orthanc_farm[0], series)

    def deactivate(document):
        document["servers"][1]["active"] = False

    edit_config(farm_config, deactivate)
    with running_front(farm_config, router_port) as front:
        run = movescu(
            front.port,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study_uid}",
            destination="TEST_PACS_2",
        )
    assert run.status == 0x0124, run.output
    assert "inactive" in run.error_comment and "Test PACS 2" in run.error_comment
    assert not clean_orthanc_farm[1].instance_sop_uids()


def test_a_copy_that_refuses_the_move_gives_way_to_another_whole_copy(
    farm_config, router_port, clean_orthanc_farm, workstation_port, tmp_path
):
    """The primary answers 0xC000 (it does not know the AE its move_routing names): Test PACS 2,
    holding the same series as completely, sends them instead, once."""
    study_uid = generate_uid()
    series = make_series(study_uid, 4)
    upload(clean_orthanc_farm[0], series)
    upload(clean_orthanc_farm[1], series)
    edit_config(
        farm_config,
        lambda document: document["servers"][0]["move_routing"].update(WORKSTATION="NOBODY_KNOWN"),
    )
    log = tmp_path / "storescp.log"
    with running_front(farm_config, router_port) as front:
        with workstation(workstation_port, tmp_path / "ws", log_path=log) as folder:
            run = movescu(front.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}")
    assert run.status == 0x0000, run.output
    assert (run.count("Completed"), run.count("Failed"), run.count("Warning")) == (4, 0, 0)
    assert received_sop_uids(folder) == sop_uids(series)
    assert arrivals(log) == 4
