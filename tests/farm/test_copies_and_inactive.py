"""What the router says about differing copies and inactive servers (issue 12, items 4-5).

Real Orthanc servers, `dicomrouter find`, DCMTK findscu / echoscu / storescu against `dicomrouter serve`.
"""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid

from dicomrouter.cli.common import CliState
from dicomrouter.cli.find import find_command
from tests.support.find_support import edit_config, findscu, running_front, unique
from tests.support.move_support import make_series
from tests.support.orthanc_fixtures import (
    ROUTER_AE,
    WORKSTATION_AE,
    instance_bytes,
    make_test_instance,
    write_instance,
)
from tests.support.router_process import RouterProcess, run_dcmtk

pytestmark = pytest.mark.slow


def upload_copies(servers_and_counts, patient_id: str) -> tuple[str, list]:
    """One study of one series; server i gets the first count_i of its instances."""
    study_uid = generate_uid()
    instances = make_series(
        study_uid, max(count for _server, count in servers_and_counts), patient_id=patient_id
    )
    for server, count in servers_and_counts:
        for ds in instances[:count]:
            server.upload(instance_bytes(ds))
    return study_uid, instances


def test_cli_find_shows_each_copy_and_flags_the_incomplete_one(
    clean_orthanc_farm, farm_config, router_port, tmp_path
):
    farm = clean_orthanc_farm
    pid = unique("COPY")
    # The primary holds the incomplete copy: its values must not hide the whole one.
    study_uid, _ = upload_copies([(farm[0], 3), (farm[1], 5)], pid)
    runner = CliRunner()
    result = runner.invoke(
        find_command, ["-k", f"StudyInstanceUID={study_uid}"], obj=CliState(farm_config)
    )
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if study_uid in line)
    assert row.rstrip().endswith("Test PACS 1 (3, incomplete), Test PACS 2 (5)"), row
    assert " 5 " in row  # NumberOfStudyRelatedInstances: the most complete copy's
    assert "copies differ for 1 of 1" in result.output

    as_json = runner.invoke(
        find_command, ["--json", "-k", f"StudyInstanceUID={study_uid}"], obj=CliState(farm_config)
    )
    answer = json.loads(as_json.output)["answers"][0]
    assert answer["instances"] == {"Test PACS 1": 3, "Test PACS 2": 5}
    assert answer["incomplete"] == ["Test PACS 1"]
    assert answer["attributes"]["NumberOfStudyRelatedInstances"] == "5"

    same_uid, _ = upload_copies([(farm[0], 2), (farm[2], 2)], pid)
    same = runner.invoke(
        find_command, ["-k", f"StudyInstanceUID={same_uid}"], obj=CliState(farm_config)
    )
    row = next(line for line in same.output.splitlines() if same_uid in line)
    assert row.rstrip().endswith("Test PACS 1, Prod PACS 1") and "copies differ" not in same.output

    # The DICOM answer carries the most complete copy too.
    with running_front(farm_config, router_port) as front:
        run = findscu(
            front.port,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study_uid}",
            "NumberOfStudyRelatedInstances",
            tmp=tmp_path,
        )
    assert run.final == "Success" and len(run.answers) == 1
    assert int(run.answers[0].NumberOfStudyRelatedInstances) == 5


def test_cli_find_says_which_inactive_servers_it_skipped(clean_orthanc_farm, farm_config):
    farm = clean_orthanc_farm
    pid = unique("INACT")
    study_uid, _ = upload_copies([(farm[1], 1)], pid)
    edit_config(farm_config, lambda document: document["servers"][1].update(active=False))
    runner = CliRunner()
    result = runner.invoke(find_command, ["-k", f"PatientID={pid}"], obj=CliState(farm_config))
    assert result.exit_code == 0, result.output
    assert "0 answers from 3 servers" in result.output and "1 inactive not asked" in result.output
    assert "skipped: Test PACS 2: inactive; ask it with --server 'Test PACS 2'" in result.output
    asked = runner.invoke(
        find_command,
        ["-k", f"PatientID={pid}", "--server", "Test PACS 2"],
        obj=CliState(farm_config),
    )
    assert asked.exit_code == 0, asked.output
    assert study_uid in asked.output


def test_echo_and_store_to_an_inactive_server_are_refused_with_the_reason(
    clean_orthanc_farm, farm_config, router_port, tmp_path
):
    edit_config(farm_config, lambda document: document["servers"][1].update(active=False))
    instance = write_instance(tmp_path / "one.dcm", make_test_instance())
    router = RouterProcess(farm_config, router_port)
    router.start()
    try:
        echo = run_dcmtk(
            "echoscu",
            "-d",
            "-aet",
            WORKSTATION_AE,
            "-aec",
            "TEST_PACS_2",
            "127.0.0.1",
            str(router_port),
        )
        store = run_dcmtk(
            "storescu",
            "-d",
            "-aet",
            WORKSTATION_AE,
            "-aec",
            "TEST_PACS_2",
            "127.0.0.1",
            str(router_port),
            str(instance),
        )
        fine = run_dcmtk(
            "echoscu", "-aet", WORKSTATION_AE, "-aec", ROUTER_AE, "127.0.0.1", str(router_port)
        )
    finally:
        router.stop()
    reason = "server 'Test PACS 2' (TEST_PACS_2) is inactive"
    echo_out, store_out = echo.stdout + echo.stderr, store.stdout + store.stderr
    assert re.search(r"Echo Response \(.*0x0?124\)", echo_out) and reason in echo_out, echo_out[
        -2000:
    ]
    assert (
        "DIMSE Status                  : 0x0124: Refused: Not authorized" in store_out
        and reason in store_out
    ), store_out[-2000:]
    assert fine.returncode == 0
    log = router.log_text()
    assert "echo_refused" in log and "store_refused" in log and reason in log
    assert not clean_orthanc_farm[1].instance_sop_uids()
