"""Roles and environments through the whole router (build_app) with DCMTK tools and real Orthanc,
and the audit rows every association and operation leaves."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid

from dicomrouter.app import RouterApp, build_app
from dicomrouter.cli.main import cli
from dicomrouter.config import load_config
from tests.support.find_support import findscu, unique, upload_study
from tests.support.move_support import received_sop_uids, workstation
from tests.support.orthanc_fixtures import make_test_instance, write_instance
from tests.support.router_process import run_dcmtk
from tests.support.store_helpers import edit_config

pytestmark = pytest.mark.slow

# Callers added to the farm config (WORKSTATION there has every role but admin).
TEST_WRITER = {"ae_title": "TESTWRITER", "host": "127.0.0.1", "roles": ["test_read", "test_write"]}
PROD_WRITER = {"ae_title": "PRODWRITER", "host": "127.0.0.1", "roles": ["prod_write"]}
TEST_READER = {"ae_title": "TESTREADER", "host": "127.0.0.1", "roles": ["test_read"]}
MOVER = {
    "ae_title": "MOVER", "host": "127.0.0.1", "roles": ["test_read", "prod_read", "test_write"],
    "move_destinations": ["WORKSTATION"],
}


@contextmanager
def running_app(config_path: Path, port: int) -> Iterator[RouterApp]:
    """The whole router, as `serve` builds it, in this process."""
    app = build_app(load_config(config_path), host="127.0.0.1", port=port, watch_file=False)
    app.start()
    try:
        yield app
    finally:
        app.stop(drain_timeout_s=5)


@pytest.fixture
def access_config(farm_config: Path) -> Path:
    def change(document):
        document["clients"] += [dict(TEST_WRITER), dict(PROD_WRITER), dict(TEST_READER), dict(MOVER)]
        document["routes"] = [{"name": "MR to prod", "match": {"Modality": "MR"}, "destinations": ["Prod PACS 1"]}]

    return edit_config(farm_config, change)


def settle(app: RouterApp, timeout_s: float = 30.0) -> None:
    """Wait for every association to end (stores are tallied until then), then for the audit writer."""
    deadline = time.monotonic() + timeout_s
    while app.front.active_associations() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert app.front.active_associations() == 0, "associations still open"
    assert app.audit.flush(timeout_s), "audit rows not written"


def audit_rows(app: RouterApp, **filters) -> list:
    settle(app)
    return app.catalog.audit_events(limit=1000, **filters)


def storescu_status(port: int, path: Path, calling_ae: str, called_ae: str = "DICOMROUTER") -> tuple[int | None, str]:
    result = run_dcmtk("storescu", "-d", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), str(path))
    output = result.stdout + result.stderr
    statuses = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", output)
    return (int(statuses[-1], 16) if statuses else None), output


def instance(folder: Path, modality: str) -> tuple[Path, str]:
    study_uid = generate_uid()
    ds = make_test_instance(study_uid=study_uid, modality=modality, rows=8, cols=8)
    return write_instance(folder / f"{modality}-{ds.SOPInstanceUID}.dcm", ds), study_uid


def spooled_files(config_path: Path) -> list[Path]:
    spool = load_config(config_path).router.spool
    return [p for p in (spool / "objects").rglob("*") if p.is_file()]


def run_cli(config_path: Path, *args: str):
    result = CliRunner().invoke(cli, ["--config", str(config_path), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


# ----------------------------------------------------------------------------- C-STORE


def test_store_needs_write_on_the_target_environment(access_config, router_port, clean_orthanc_farm, tmp_path):
    farm = clean_orthanc_farm
    prod_2_ae = farm[3].spec.ae_title
    with running_app(access_config, router_port) as app:
        cases = {
            "called AE": (instance(tmp_path, "CT"), "TESTWRITER", prod_2_ae, "Prod PACS 2"),
            "rule": (instance(tmp_path, "MR"), "TESTWRITER", "DICOMROUTER", "Prod PACS 1"),
            "primary": (instance(tmp_path, "CT"), "PRODWRITER", "DICOMROUTER", "Test PACS 1"),
        }
        for how, ((path, study_uid), calling_ae, called_ae, server) in cases.items():
            status, output = storescu_status(router_port, path, calling_ae, called_ae)
            assert status == 0x0124, f"via {how}: {output}"
            assert app.queue.counts() == {}, f"via {how}: a job was queued"
            assert spooled_files(access_config) == [], f"via {how}: something was spooled"
            rows = audit_rows(app, study_uid=study_uid)
            assert [(r.operation, r.outcome, r.calling_ae, r.servers) for r in rows] == [
                ("store", "refused", calling_ae, server)
            ], how
            assert f"{calling_ae} may not write to {server}" in rows[0].detail
            assert rows[0].counts == {"instances": 1}

        # Control: the same caller may store to its own environment.
        path, study_uid = instance(tmp_path, "CT")
        status, output = storescu_status(router_port, path, "TESTWRITER")
        assert status == 0x0000, output
        assert app.forwarder.wait_until_idle(60)
        rows = audit_rows(app, study_uid=study_uid)
        assert [(r.operation, r.outcome, r.servers) for r in rows] == [("store", "success", "Test PACS 1")]
        accepted = audit_rows(app, calling_ae="PRODWRITER", operation="association")
        assert [(r.outcome, r.address, r.called_ae) for r in accepted] == [("accepted", "127.0.0.1", "DICOMROUTER")]
    assert farm[2].instance_sop_uids() == [] and farm[3].instance_sop_uids() == []


# ----------------------------------------------------------------------------- C-FIND


def test_find_by_a_test_only_caller_never_reaches_prod(access_config, router_port, clean_orthanc_farm, tmp_path):
    farm = clean_orthanc_farm
    patient_id = unique("ENV")
    test_study = upload_study(farm[0], patient_id=patient_id)
    upload_study(farm[2], patient_id=patient_id)
    upload_study(farm[3], patient_id=patient_id)
    with running_app(access_config, router_port) as app:
        run = findscu(router_port, "QueryRetrieveLevel=STUDY", f"PatientID={patient_id}", aet="TESTREADER", tmp=tmp_path)
        assert run.values("StudyInstanceUID") == [test_study["study"]]
        # Calling a prod server's own AE title does not get round the environment check.
        refused = findscu(
            router_port, "QueryRetrieveLevel=STUDY", f"PatientID={patient_id}", aet="TESTREADER",
            aec=farm[2].spec.ae_title, tmp=tmp_path, debug=True,
        )
        assert refused.answers == [] and refused.status == 0xC001, refused.output
        rows = audit_rows(app, calling_ae="TESTREADER", operation="find")
    assert [r.outcome for r in rows] == ["success", "refused"]
    assert rows[0].servers == "Test PACS 1,Test PACS 2"  # every server it queried: no prod one
    assert rows[0].counts["answers"] == 1
    assert f"PatientID={patient_id}" in rows[0].detail
    assert "may not read prod" in rows[1].detail
    assert rows[1].called_ae == farm[2].spec.ae_title


# ----------------------------------------------------------------------------- C-MOVE


def movescu_as(port: int, calling_ae: str, destination: str, study_uid: str):
    result = run_dcmtk(
        "movescu", "-d", "-aet", calling_ae, "-aec", "DICOMROUTER", "-aem", destination, "-S",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port),
    )
    output = result.stdout + result.stderr
    statuses = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", output)
    return (int(statuses[-1], 16) if statuses else None), output


def test_move_only_to_listed_destinations(access_config, router_port, clean_orthanc_farm, workstation_port, tmp_path):
    farm = clean_orthanc_farm
    study = upload_study(farm[0], images=2)
    with running_app(access_config, router_port) as app:
        # MOVER may write to test servers, but its move_destinations list only WORKSTATION.
        status, output = movescu_as(router_port, "MOVER", farm[1].spec.ae_title, study["study"])
        assert status == 0xC001, output
        status, output = movescu_as(router_port, "MOVER", "ELSEWHERE", study["study"])
        assert status == 0xA801, output  # no open relay: an unknown AE is never a destination
        with workstation(workstation_port, tmp_path / "ws") as folder:
            status, output = movescu_as(router_port, "MOVER", "WORKSTATION", study["study"])
            assert status == 0x0000, output
        rows = audit_rows(app, calling_ae="MOVER", operation="move")
    assert received_sop_uids(folder) == set(study["sops"])
    assert farm[1].instance_sop_uids() == []
    assert [r.outcome for r in rows] == ["refused", "refused", "success"]
    assert "not in its move_destinations" in rows[0].detail
    assert "ELSEWHERE" in rows[1].detail and "unknown move destination" in rows[1].detail
    assert rows[2].study_uid == study["study"] and rows[2].servers == "Test PACS 1"
    assert rows[2].counts == {"completed": 2, "failed": 0, "warning": 0}
    assert "to WORKSTATION" in rows[2].detail


# ----------------------------------------------------------------------------- associations, echo, `audit`


def test_associations_echo_and_the_audit_command(access_config, router_port, tmp_path):
    with running_app(access_config, router_port) as app:
        ok = run_dcmtk("echoscu", "-aet", "TESTREADER", "-aec", "DICOMROUTER", "127.0.0.1", str(router_port))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        rejected = run_dcmtk("echoscu", "-aet", "STRANGER", "-aec", "DICOMROUTER", "127.0.0.1", str(router_port))
        assert rejected.returncode != 0
        wrong_called = run_dcmtk("echoscu", "-aet", "TESTREADER", "-aec", "NOT_ME", "127.0.0.1", str(router_port))
        assert wrong_called.returncode != 0
        path, study_uid = instance(tmp_path, "CT")
        assert storescu_status(router_port, path, "TESTWRITER")[0] == 0x0000
        settle(app)

    everything = json.loads(run_cli(access_config, "audit", "--json").stdout)
    summary = [(e["operation"], e["outcome"], e["calling_ae"]) for e in everything]
    assert summary[:4] == [
        ("association", "accepted", "TESTREADER"),
        ("echo", "success", "TESTREADER"),
        ("association", "rejected", "STRANGER"),
        ("association", "rejected", "TESTREADER"),
    ]
    assert ("store", "success", "TESTWRITER") in summary
    stranger = json.loads(run_cli(access_config, "audit", "--json", "--ae", "STRANGER").stdout)
    assert len(stranger) == 1
    assert stranger[0]["address"] == "127.0.0.1"
    assert "not a configured client" in stranger[0]["detail"]
    assert stranger[0]["node"]  # which router node admitted or refused it
    not_me = [e for e in everything if e["calling_ae"] == "TESTREADER" and e["outcome"] == "rejected"]
    assert not_me[0]["called_ae"] == "NOT_ME"
    by_study = json.loads(run_cli(access_config, "audit", "--json", "--study", study_uid).stdout)
    assert sorted((e["operation"], e["servers"], e["counts"]) for e in by_study) == [
        ("deliver", ["Test PACS 1"], {"instances": 1}),  # when it reached the PACS
        ("store", ["Test PACS 1"], {"instances": 1}),
    ]
    assert json.loads(run_cli(access_config, "audit", "--json", "--since", "2000-01-01").stdout) == everything
    future = json.loads(run_cli(access_config, "audit", "--json", "--since", "2999-01-01T00:00").stdout)
    assert future == []
    table = run_cli(access_config, "audit", "--ae", "STRANGER").stdout
    assert "association" in table and "rejected" in table and "STRANGER" in table


def test_echo_is_answered_while_the_catalog_is_locked(access_config, router_port):
    """A busy database delays the audit rows; it never holds up the DICOM operation."""
    with running_app(access_config, router_port) as app:
        catalog_file = Path(str(app.config.router.catalog).removeprefix("sqlite:///"))
        before = len(audit_rows(app))
        locker = sqlite3.connect(catalog_file, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")  # e.g. a long admin transaction on the catalog
            for _ in range(3):
                echo = run_dcmtk("echoscu", "-aet", "TESTREADER", "-aec", "DICOMROUTER", "127.0.0.1", str(router_port))
                assert echo.returncode == 0, echo.stdout + echo.stderr
            assert app.audit.backlog > 0  # recorded, not yet written
            locker.execute("ROLLBACK")
        finally:
            locker.close()
        rows = audit_rows(app)
    new = [(r.operation, r.outcome) for r in rows[before:]]
    assert new == [("association", "accepted"), ("echo", "success")] * 3
