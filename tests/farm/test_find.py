"""Federated C-FIND through the router against four real Orthancs, DCMTK findscu as the workstation."""

from __future__ import annotations

import struct
import time

import pytest
from pydicom import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from structlog.testing import capture_logs

from dicomrouter.net.upper_layer import parse_command
from tests.support.configs import base_document, write_document
from tests.support.find_peers import SilentPeer, SlowFindPeer, dead_port, server_entry
from tests.support.find_support import edit_config, findscu, running_front, unique, upload_study
from tests.support.orthanc_fixtures import ROUTER_AE, WORKSTATION_AE
from tests.support.pdus import (
    A_RELEASE_RP,
    IMPLICIT_VR_LE,
    P_DATA_TF,
    RELEASE_RQ,
    find_command,
    p_data,
)
from tests.support.raw_peer import RawPeer
from tests.support.router_process import run_dcmtk

slow = pytest.mark.slow


@pytest.fixture
def front(farm_config, router_port):
    with running_front(farm_config, router_port) as running:
        yield running


def _study_answer(uid: str) -> Dataset:
    answer = Dataset()
    answer.QueryRetrieveLevel = "STUDY"
    answer.StudyInstanceUID = uid
    answer.PatientName = "Slow^Peer"
    return answer


# --------------------------------------------------------------------------- levels and matching


@slow
def test_every_level_in_both_models(clean_orthanc_farm, front, tmp_path):
    farm = clean_orthanc_farm
    pid = unique("LVL")
    first = upload_study(farm[0], patient_id=pid, patient_name="Level^Anna", series=2, images=2, study_date="20230510")
    second = upload_study(farm[1], patient_id=pid, patient_name="Level^Anna", study_date="20240220")
    port = front.port

    patients = findscu(port, "QueryRetrieveLevel=PATIENT", f"PatientID={pid}", "PatientName", model="-P", tmp=tmp_path)
    assert patients.final == "Success"
    assert [str(a.PatientName) for a in patients.answers] == ["Level^Anna"]  # on two servers, one patient
    assert all(a.RetrieveAETitle == ROUTER_AE for a in patients.answers)

    for model in ("-P", "-S"):
        studies = findscu(port, "QueryRetrieveLevel=STUDY", f"PatientID={pid}", "StudyInstanceUID", model=model, tmp=tmp_path)
        assert studies.values("StudyInstanceUID") == sorted([first["study"], second["study"]])
        series = findscu(
            port, "QueryRetrieveLevel=SERIES", f"PatientID={pid}", f"StudyInstanceUID={first['study']}",
            "SeriesInstanceUID", model=model, tmp=tmp_path,
        )
        assert series.values("SeriesInstanceUID") == sorted(first["series"])
        images = findscu(
            port, "QueryRetrieveLevel=IMAGE", f"PatientID={pid}", f"StudyInstanceUID={first['study']}",
            f"SeriesInstanceUID={first['series'][0]}", "SOPInstanceUID", model=model, tmp=tmp_path,
        )
        assert images.values("SOPInstanceUID") == sorted(first["sops"][:2])
        assert all(a.RetrieveAETitle == ROUTER_AE for a in images.answers)


@slow
def test_wildcards_date_ranges_and_uid_lists(clean_orthanc_farm, front, tmp_path):
    farm = clean_orthanc_farm
    pid = unique("MATCH")
    a = upload_study(farm[0], patient_id=pid, patient_name="Wild^Card", study_date="20230105", series=1, images=3)
    b = upload_study(farm[2], patient_id=pid, patient_name="Wild^Other", study_date="20230620")
    c = upload_study(farm[3], patient_id=pid, patient_name="Tame^Card", study_date="20240101")
    port = front.port

    wild = findscu(port, "QueryRetrieveLevel=STUDY", "PatientName=Wild*", f"PatientID={pid[:6]}*", "StudyInstanceUID", tmp=tmp_path)
    assert wild.values("StudyInstanceUID") == sorted([a["study"], b["study"]])

    ranged = findscu(port, "QueryRetrieveLevel=STUDY", f"PatientID={pid}", "StudyDate=20230101-20231231", "StudyInstanceUID", tmp=tmp_path)
    assert ranged.values("StudyInstanceUID") == sorted([a["study"], b["study"]])
    open_ended = findscu(port, "QueryRetrieveLevel=STUDY", f"PatientID={pid}", "StudyDate=20230601-", "StudyInstanceUID", tmp=tmp_path)
    assert open_ended.values("StudyInstanceUID") == sorted([b["study"], c["study"]])

    listed = findscu(port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={a['study']}\\{c['study']}", "PatientID", tmp=tmp_path)
    assert listed.values("StudyInstanceUID") == sorted([a["study"], c["study"]])
    sops = findscu(
        port, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={a['study']}", f"SeriesInstanceUID={a['series'][0]}",
        f"SOPInstanceUID={a['sops'][0]}\\{a['sops'][2]}", tmp=tmp_path,
    )
    assert sops.values("SOPInstanceUID") == sorted([a["sops"][0], a["sops"][2]])


# --------------------------------------------------------------------------- merge and access


@slow
def test_study_on_two_servers_is_answered_once(clean_orthanc_farm, front, tmp_path):
    farm = clean_orthanc_farm
    pid = unique("DUP")
    shared = upload_study(farm[0], patient_id=pid, images=2, study_description="from the primary")
    upload_study(farm[2], study_uid=shared["study"], patient_id=pid, images=1, study_description="from prod")
    run = findscu(
        front.port, "QueryRetrieveLevel=STUDY", f"PatientID={pid}", "StudyDescription",
        "NumberOfStudyRelatedInstances", tmp=tmp_path,
    )
    assert run.final == "Success"
    assert len(run.answers) == 1
    answer = run.answers[0]
    assert answer.StudyInstanceUID == shared["study"]
    assert answer.RetrieveAETitle == ROUTER_AE
    # one copy's count, never the sum of both copies
    assert (str(answer.StudyDescription), int(answer.NumberOfStudyRelatedInstances)) in (
        ("from the primary", 2),
        ("from prod", 1),
    )
    deadline = time.monotonic() + 10  # the catalog learns off the answer's path, when queries pause
    while len(front.catalog.where_study(shared["study"])) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {row.server_name for row in front.catalog.where_study(shared["study"])} == {farm[0].spec.name, farm[2].spec.name}
    assert {row.learned_by for row in front.catalog.where_study(shared["study"])} == {"found"}


@slow
def test_test_roles_never_see_prod_and_query_servers_narrow(clean_orthanc_farm, farm_config, router_port, tmp_path):
    farm = clean_orthanc_farm
    pid = unique("ROLE")
    test_study = upload_study(farm[0], patient_id=pid)
    other_test = upload_study(farm[1], patient_id=pid)
    upload_study(farm[2], patient_id=pid)
    upload_study(farm[3], patient_id=pid)

    def add_clients(document):
        document["clients"].append({"ae_title": "TESTONLY", "host": "127.0.0.1", "roles": ["test_read"]})
        document["clients"].append(
            {"ae_title": "NARROW", "host": "127.0.0.1", "roles": ["test_read", "prod_read"], "query_servers": [farm[0].spec.name]}
        )

    edit_config(farm_config, add_clients)
    with running_front(farm_config, router_port) as running:
        everyone = findscu(running.port, "QueryRetrieveLevel=STUDY", f"PatientID={pid}", tmp=tmp_path)
        assert len(everyone.answers) == 4
        test_only = findscu(running.port, "QueryRetrieveLevel=STUDY", f"PatientID={pid}", aet="TESTONLY", tmp=tmp_path)
        assert test_only.values("StudyInstanceUID") == sorted([test_study["study"], other_test["study"]])
        narrow = findscu(running.port, "QueryRetrieveLevel=STUDY", f"PatientID={pid}", aet="NARROW", tmp=tmp_path)
        assert narrow.values("StudyInstanceUID") == [test_study["study"]]
        virtual = findscu(
            running.port, "QueryRetrieveLevel=STUDY", f"PatientID={pid}", aec=farm[1].spec.ae_title, tmp=tmp_path
        )
        assert virtual.values("StudyInstanceUID") == [other_test["study"]]
        assert virtual.answers[0].RetrieveAETitle == farm[1].spec.ae_title


# --------------------------------------------------------------------------- failures


@slow
def test_stopped_and_hung_servers_leave_the_others_answering(clean_orthanc_farm, farm_config, router_port, tmp_path):
    farm = clean_orthanc_farm
    pid = unique("PART")
    study = upload_study(farm[0], patient_id=pid)
    hung = SilentPeer().start()

    def add_faults(document):
        document["router"]["find_timeout"] = 1.5
        document["servers"].append(server_entry("Stopped PACS", "STOPPED_PACS", dead_port()))
        document["servers"].append(server_entry("Hung PACS", "HUNG_PACS", hung.port))

    edit_config(farm_config, add_faults)
    try:
        with running_front(farm_config, router_port) as running, capture_logs() as logs:
            started = time.monotonic()
            run = findscu(running.port, "QueryRetrieveLevel=STUDY", f"PatientID={pid}", tmp=tmp_path)
            elapsed = time.monotonic() - started
    finally:
        hung.stop()
    assert run.final == "Success"
    assert run.values("StudyInstanceUID") == [study["study"]]
    assert elapsed < 1.5 * 1.1 + 0.3  # the hung server costs its timeout, no more
    failed = {e["server"]: e for e in logs if e["event"] == "find_server_failed"}
    assert set(failed) == {"Stopped PACS", "Hung PACS"}
    assert failed["Stopped PACS"]["log_level"] == "warning"
    assert failed["Stopped PACS"]["state"] == "unreachable"
    assert failed["Hung PACS"]["state"] == "timeout"


@slow
def test_every_server_unreachable_is_a_failure_naming_them(tmp_path, router_port):
    document = base_document(router_port, servers=[
        {**server_entry("Alpha", "ALPHA", dead_port()), "primary": True},
        server_entry("Beta", "BETA", dead_port(), "prod"),
    ])
    document["clients"][0]["roles"] = ["test_read", "prod_read"]
    config_path = write_document(tmp_path / "dead.yaml", document)
    with running_front(config_path, router_port, with_catalog=False) as running:
        run = findscu(running.port, "QueryRetrieveLevel=STUDY", "PatientID=*", debug=True, tmp=tmp_path)
        assert run.answers == []
        assert run.status == 0xA700
        assert run.error_comment == "unreachable: Alpha, Beta"  # details in the log; LO holds 64
        assert run_dcmtk("echoscu", "-aet", WORKSTATION_AE, "-aec", ROUTER_AE, "127.0.0.1", str(running.port)).returncode == 0


@slow
def test_malformed_identifier_is_refused_and_the_router_keeps_serving(clean_orthanc_farm, front, tmp_path):
    pid = unique("BAD")
    study = upload_study(clean_orthanc_farm[0], patient_id=pid)
    bad_level = findscu(front.port, "QueryRetrieveLevel=PATIENT", debug=True, tmp=tmp_path)  # not in study root
    assert bad_level.status == 0xA900
    no_level = findscu(front.port, f"PatientID={pid}", debug=True, tmp=tmp_path)
    assert no_level.status == 0xA900

    with RawPeer(front.port) as peer:
        peer.associate(
            WORKSTATION_AE, ROUTER_AE, abstract_syntax=StudyRootQueryRetrieveInformationModelFind,
            transfer_syntaxes=(IMPLICIT_VR_LE,),
        )
        peer.send(p_data(1, find_command(StudyRootQueryRetrieveInformationModelFind, 7), True))
        peer.send(p_data(1, b"\x08\x00\x52\x00\xff\xff\xff\x7fSTUDY garbage", False))  # length past the end
        assert final_find_status(peer) == 0xA900
        # The association goes on: a well-formed query on it is answered.
        patient_id = pid.encode() + b" " * (len(pid) % 2)
        identifier = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY \x10\x00\x20\x00" + struct.pack("<I", len(patient_id))
        peer.send(p_data(1, find_command(StudyRootQueryRetrieveInformationModelFind, 8), True))
        peer.send(p_data(1, identifier + patient_id, False))
        assert final_find_status(peer) == 0x0000
        peer.send(RELEASE_RQ)
        assert peer.read_pdu() == (A_RELEASE_RP, bytes(4))
    assert run_dcmtk("echoscu", "-aet", WORKSTATION_AE, "-aec", ROUTER_AE, "127.0.0.1", str(front.port)).returncode == 0
    good = findscu(front.port, "QueryRetrieveLevel=STUDY", f"PatientID={pid}", tmp=tmp_path)
    assert good.values("StudyInstanceUID") == [study["study"]]


def final_find_status(peer: RawPeer) -> int:
    """The status of the first C-FIND-RSP that is not pending (answers and their identifiers skipped)."""
    command = b""
    while (answer := peer.read_pdu(timeout=30)) is not None:
        assert answer[0] == P_DATA_TF, answer
        body, offset = answer[1], 0
        while offset < len(body):
            length, header = int.from_bytes(body[offset : offset + 4], "big"), body[offset + 5]
            fragment = body[offset + 6 : offset + 4 + length]
            offset += 4 + length
            if header & 1:
                command += fragment
                if header & 2:
                    status = struct.unpack("<H", parse_command(command)[0x0900])[0]
                    command = b""
                    if status not in (0xFF00, 0xFF01):
                        return status
    raise AssertionError("the router closed the association before its final C-FIND-RSP")


# --------------------------------------------------------------------------- cancel, limits, worklist


@slow
def test_cancel_stops_the_fan_out(clean_orthanc_farm, farm_config, router_port, tmp_path):
    pid = unique("CAN")
    upload_study(clean_orthanc_farm[0], patient_id=pid)
    slow_peer = SlowFindPeer("SLOW_PACS", [_study_answer(f"1.2.3.{i}") for i in range(50)], delay_s=0.3, interval_s=0.2).start()
    edit_config(farm_config, lambda d: d["servers"].append(server_entry("Slow PACS", "SLOW_PACS", slow_peer.port)))
    try:
        with running_front(farm_config, router_port) as running:
            started = time.monotonic()
            run = findscu(running.port, "QueryRetrieveLevel=STUDY", "PatientID", extra=("--cancel", "1"), tmp=tmp_path)
            elapsed = time.monotonic() - started
            deadline = time.monotonic() + 3
            while (slow_peer.cancelled == 0 or slow_peer.released == 0) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        slow_peer.stop()
    assert "Cancel" in run.final
    assert len(run.answers) == 1
    assert elapsed < 2.0  # not the slow peer's 10 s of answers
    assert slow_peer.cancelled == 1  # the router passed the C-CANCEL on
    assert slow_peer.released == 1  # and released the association


@slow
def test_results_are_capped(clean_orthanc_farm, farm_config, router_port, tmp_path):
    pid = unique("CAP")
    for server in clean_orthanc_farm:
        upload_study(server, patient_id=pid)
    edit_config(farm_config, lambda d: d["router"].__setitem__("max_find_results", 3))
    with running_front(farm_config, router_port) as running:
        run = findscu(running.port, "QueryRetrieveLevel=STUDY", f"PatientID={pid}", debug=True, tmp=tmp_path)
    assert len(run.answers) == 3
    assert run.status == 0xA700
    assert "more than 3" in run.error_comment


@slow
def test_worklist_goes_to_worklist_servers_only(clean_orthanc_farm, farm_config, router_port, tmp_path):
    item = Dataset()
    item.PatientName = "Work^List"
    item.PatientID = "WL1"
    item.AccessionNumber = "ACC-WL-1"
    step = Dataset()
    step.Modality = "CT"
    step.ScheduledStationAETitle = "CT1"
    item.ScheduledProcedureStepSequence = [step]
    upload_study(clean_orthanc_farm[0], patient_id="WL1")  # Q/R data is not worklist data
    peer = SlowFindPeer("RIS", [item]).start()
    edit_config(farm_config, lambda d: d["servers"].append(server_entry("RIS", "RIS", peer.port, worklist=True)))
    try:
        with running_front(farm_config, router_port) as running:
            run = findscu(
                running.port, "PatientName", "PatientID", "AccessionNumber",
                "ScheduledProcedureStepSequence[0].Modality", model="-W", tmp=tmp_path,
            )
    finally:
        peer.stop()
    assert run.final == "Success"
    assert [str(a.AccessionNumber) for a in run.answers] == ["ACC-WL-1"]
    assert run.answers[0].ScheduledProcedureStepSequence[0].Modality == "CT"
    assert "RetrieveAETitle" not in run.answers[0]
    assert peer.queries == 1


# --------------------------------------------------------------------------- character sets


@slow
def test_latin1_and_utf8_names_come_back_intact(clean_orthanc_farm, front, tmp_path):
    farm = clean_orthanc_farm
    pid = unique("CS")
    names = {
        "ISO_IR 100": "Müller^Jürgen",
        "ISO_IR 192": "Øster^Zoë",
    }
    uids = {}
    for index, (charset, name) in enumerate(names.items()):
        uids[upload_study(farm[index], patient_id=pid, patient_name=name, charset=charset)["study"]] = name
    cyrillic = upload_study(farm[2], patient_id=pid, patient_name="Иванов^Иван", charset="ISO_IR 192")
    run = findscu(front.port, "QueryRetrieveLevel=STUDY", f"PatientID={pid}", "PatientName", tmp=tmp_path)
    assert run.final == "Success"
    got = {a.StudyInstanceUID: str(a.PatientName) for a in run.answers}
    for uid, name in uids.items():
        assert got[uid] == name
    direct = findscu(
        farm[2].spec.dicom_port, "QueryRetrieveLevel=STUDY", f"PatientID={pid}", "PatientName",
        aec=farm[2].spec.ae_title, tmp=tmp_path,
    )
    # whatever the PACS answers for a name outside Latin-1, the router passes on unchanged
    assert got[cyrillic["study"]] == str(direct.answers[0].PatientName)


# --------------------------------------------------------------------------- CLI


@slow
def test_cli_find_merges_and_reports_servers(clean_orthanc_farm, farm_config, tmp_path):
    import json

    from click.testing import CliRunner

    from dicomrouter.cli.common import CliState
    from dicomrouter.cli.find import find_command

    farm = clean_orthanc_farm
    pid = unique("CLI")
    shared = upload_study(farm[0], patient_id=pid, accession_number="ACC-PRIMARY", study_description="")
    upload_study(farm[2], study_uid=shared["study"], patient_id=pid, accession_number="ACC-PROD",
                 study_description="described on prod")
    only_prod = upload_study(farm[3], patient_id=pid)
    edit_config(farm_config, lambda d: d["servers"].append(server_entry("Stopped PACS", "STOPPED_PACS", dead_port())))
    runner = CliRunner()

    result = runner.invoke(find_command, ["-k", f"PatientID={pid}"], obj=CliState(farm_config))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    shared_line = next(line for line in lines if shared["study"] in line)
    assert "ACC-PRIMARY" in shared_line and "described on prod" in shared_line
    assert shared_line.rstrip().endswith(f"{farm[0].spec.name}, {farm[2].spec.name}")
    assert any(only_prod["study"] in line for line in lines)
    assert "failed: Stopped PACS: unreachable" in result.output
    assert any(line.startswith("Test PACS 2") and " ok " in line for line in lines)  # timing table

    as_json = runner.invoke(
        find_command, ["--json", "--level", "SERIES", "-k", f"StudyInstanceUID={shared['study']}", "--server", farm[2].spec.name],
        obj=CliState(farm_config),
    )
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.output)
    assert document["outcome"] == "complete"
    assert [a["servers"] for a in document["answers"]] == [[farm[2].spec.name]]
    assert [s["server"] for s in document["servers"]] == [farm[2].spec.name]

    refused = runner.invoke(find_command, ["--as", "NOBODY"], obj=CliState(farm_config))
    assert refused.exit_code != 0 and "NOBODY" in refused.output
