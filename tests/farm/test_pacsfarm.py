"""The real Orthanc test farm: start, store, query, stop, busy ports, detached CLI."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicomrouter import pacsfarm
from dicomrouter.pacsfarm import (
    ORTHANC_BINARY,
    OrthancFarm,
    OrthancServer,
    OrthancSpec,
    PortBusyError,
    free_ports,
    port_is_free,
    start_free_farm,
)
from tests.support.orthanc_fixtures import instance_bytes, make_test_instance, write_instance

# The fixtures come from the main conftest.py (`from tests.support.orthanc_fixtures import *`); without it, from here.
if not hasattr(sys.modules.get("tests.conftest"), "orthanc_farm"):
    from tests.support.orthanc_fixtures import (  # noqa: F401
        clean_orthanc_farm,
        orthanc_farm,
        router_port,
        workstation_port,
    )

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not ORTHANC_BINARY.exists(), reason=f"Orthanc not installed ({ORTHANC_BINARY})"
    ),
]

STORESCU = Path("/usr/bin/storescu")
MOVESCU = Path("/usr/bin/movescu")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def run_dcmtk(tool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool with TCP_NODELAY=1; fail the test with its output if it fails."""
    if not tool.exists():
        pytest.skip(f"DCMTK is not installed ({tool} missing; apt-get install dcmtk)")
    result = subprocess.run(
        [str(tool), *args],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
    )
    assert result.returncode == 0, f"{tool.name} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_farm_servers_know_each_other(orthanc_farm: OrthancFarm, router_port: int) -> None:
    """Each server answers with its AE title and lists the others, the router and WORKSTATION."""
    assert [s.spec.environment for s in orthanc_farm] == ["test", "test", "prod", "prod"]
    all_aes = {s.spec.ae_title for s in orthanc_farm}
    assert all_aes == {"TEST_PACS_1", "TEST_PACS_2", "PROD_PACS_1", "PROD_PACS_2"}
    for server in orthanc_farm:
        assert server.system()["DicomAet"] == server.spec.ae_title
        modalities = set(server.get_json("/modalities"))
        assert modalities == (all_aes - {server.spec.ae_title}) | {"DICOMROUTER", "WORKSTATION"}
        assert server.get_json("/modalities/DICOMROUTER/configuration")["Port"] == router_port
        assert {server.spec.dicom_port, server.spec.http_port}.isdisjoint({4242, 8042, 11112})


def test_storescu_instance_shows_in_rest(clean_orthanc_farm: OrthancFarm, tmp_path: Path) -> None:
    """An instance sent with DCMTK storescu is visible through the REST helpers of that server only."""
    target = clean_orthanc_farm["Test PACS 2"]
    ds = make_test_instance(patient_id="FARM001")
    path = write_instance(tmp_path / "one.dcm", ds)
    run_dcmtk(
        STORESCU,
        "-aet",
        "WORKSTATION",
        "-aec",
        target.spec.ae_title,
        "127.0.0.1",
        str(target.spec.dicom_port),
        str(path),
    )

    assert target.study_uids() == [ds.StudyInstanceUID]
    assert target.instance_sop_uids() == [ds.SOPInstanceUID]
    assert target.instance_count() == 1
    stored = pydicom.dcmread(io.BytesIO(target.download_instance(ds.SOPInstanceUID)))
    assert stored.PatientID == "FARM001"
    assert stored.PixelData == ds.PixelData
    for other in clean_orthanc_farm:
        if other is not target:
            assert other.instance_count() == 0


def test_upload_download_delete(clean_orthanc_farm: OrthancFarm) -> None:
    """upload() stores, download_instance() returns the file, delete_all() empties the server."""
    server = clean_orthanc_farm["PROD_PACS_1"]
    study = pydicom.uid.generate_uid()
    datasets = [
        make_test_instance(study_uid=study, instance_number=n, modality="MR") for n in (1, 2, 3)
    ]
    for ds in datasets:
        assert server.upload(instance_bytes(ds))["Status"] == "Success"
    assert server.wait_for_instance_count(3, timeout=5) == 3
    assert server.study_uids() == [study]
    assert sorted(server.instance_sop_uids()) == sorted(ds.SOPInstanceUID for ds in datasets)
    with pytest.raises(KeyError):
        server.download_instance("1.2.3.4.5.6.7.8.9")
    server.delete_all()
    assert server.instance_count() == 0


def test_cmove_between_farm_servers(clean_orthanc_farm: OrthancFarm) -> None:
    """A C-MOVE to another farm server works: each server knows the others as destinations."""
    source, destination = clean_orthanc_farm["TEST_PACS_1"], clean_orthanc_farm["PROD_PACS_2"]
    ds = make_test_instance()
    source.upload(instance_bytes(ds))
    run_dcmtk(
        MOVESCU, "-S", "-aet", "WORKSTATION", "-aec", source.spec.ae_title, "-aem", destination.spec.ae_title,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
        "127.0.0.1", str(source.spec.dicom_port),
    )  # fmt: skip
    assert destination.wait_for_instance_count(1, timeout=10) == 1
    assert destination.instance_sop_uids() == [ds.SOPInstanceUID]


def test_stop_one_server_while_others_run(tmp_path: Path) -> None:
    """Stopping one server frees its ports and leaves the others answering."""
    with start_free_farm(tmp_path, ("test", "test", "prod")) as farm:
        first, *others = farm
        pid = first.pid
        first.stop()
        assert not first.is_running() and first.pid is None
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Orthanc" not in Path(f"/proc/{pid}/cmdline").read_text()
        )
        assert port_is_free(first.spec.dicom_port) and port_is_free(first.spec.http_port)
        assert not first.pid_path.exists()
        for server in others:
            assert server.is_running()
            assert server.system()["DicomAet"] == server.spec.ae_title
        first.start()
        assert first.system()["DicomAet"] == first.spec.ae_title
    assert not any(server.is_running() for server in farm)


def test_farm_refuses_busy_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy DICOM or HTTP port makes start fail with PortBusyError and leaves nothing running."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = blocker.getsockname()[1]
        dicom, http = free_ports(2)
        lone = OrthancServer(OrthancSpec("Busy", "BUSY", busy, http), tmp_path / "busy")
        with pytest.raises(PortBusyError, match=str(busy)):
            lone.start()
        assert not lone.is_running()

        monkeypatch.setattr(pacsfarm, "port_is_free", lambda port: True)  # let Orthanc hit it
        with pytest.raises(PortBusyError, match="already in use"):
            lone.start()
        assert not lone.is_running()
        monkeypatch.undo()

        farm = OrthancFarm.on_free_ports(tmp_path / "farm", ("test", "prod"))
        farm.servers[1].spec.http_port = busy
        with pytest.raises(PortBusyError):
            with farm:
                pytest.fail("the farm started although a port is busy")
        assert not any(server.is_running() for server in farm)
        assert port_is_free(farm[0].spec.dicom_port)


def test_cli_start_status_stop_detached(tmp_path: Path) -> None:
    """The CLI starts the four servers detached, reports them, and stops them from pid files."""
    ports = free_ports(10)
    base = [sys.executable, "-m", "dicomrouter.pacsfarm"]
    options = [
        "--base-dir", str(tmp_path),
        "--dicom-ports", ",".join(map(str, ports[:4])),
        "--http-ports", ",".join(map(str, ports[4:8])),
        "--router-port", str(ports[8]),
        "--workstation-port", str(ports[9]),
    ]  # fmt: skip

    def cli(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, command, *options], capture_output=True, text=True, timeout=120
        )

    try:
        started = cli("start")
        assert started.returncode == 0, started.stderr
        assert started.stdout.count(" up ") == 4
        status = cli("status")
        assert status.returncode == 0 and status.stdout.count(" up ") == 4
        assert all(
            (tmp_path / slug / "orthanc.pid").exists() for slug in ("test-pacs-1", "prod-pacs-2")
        )
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    status = cli("status")
    assert status.returncode == 3 and status.stdout.count(" down ") == 4
    assert all(port_is_free(port) for port in ports[:8])
    assert cli("clean").returncode == 0
    assert not (tmp_path / "test-pacs-1").exists()
