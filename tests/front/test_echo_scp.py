"""The router as a C-ECHO SCP: DCMTK echoscu against `dicomrouter serve`, admission at association time."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomrouter.cli.main import cli
from dicomrouter.config import load_config
from dicomrouter.pacsfarm import free_ports
from tests.support.configs import base_document, write_document
from tests.support.pdus import A_ASSOCIATE_RJ, associate_rq
from tests.support.raw_peer import RawPeer
from tests.support.router_process import RouterProcess, run_dcmtk
from tests.support.scu_sockets import OUTGOING_SOCKET_HANDLERS

ROUTER_AE = "DICOMROUTER"


def dead_port_servers() -> list[dict]:
    """Servers nobody listens for: the echo front needs none of them."""
    first, second, third = free_ports(3)
    return [
        {"name": "Test PACS 1", "ae_title": "TEST_PACS_1", "host": "127.0.0.1", "port": first,
         "environment": "test", "active": True, "primary": True, "deleted": False},
        {"name": "Prod PACS 1", "ae_title": "PROD_PACS_1", "host": "127.0.0.1", "port": second,
         "environment": "prod", "active": True, "primary": False, "deleted": False},
        {"name": "Far PACS", "ae_title": "FAR_PACS", "host": "127.0.0.2", "port": third,
         "environment": "prod", "active": True, "primary": False, "deleted": False},
    ]


def write_router_config(
    folder: Path, accept_unknown_callers: bool = False, router: dict | None = None
) -> tuple[Path, int]:
    """A config with WORKSTATION (from 127.0.0.1) and REMOTE (only from 127.0.0.2), catalog upgraded.

    `router` overrides keys of the `router` section (limits, timeouts).
    """
    port = free_ports(1)[0]
    document = base_document(port, dead_port_servers())
    document["router"]["accept_unknown_callers"] = accept_unknown_callers
    document["router"].update(router or {})
    document["clients"].append({"ae_title": "REMOTE", "host": "127.0.0.2", "roles": ["test_read"]})
    document["clients"].append({"ae_title": "ANYWHERE", "roles": ["test_read"]})
    folder.mkdir(parents=True, exist_ok=True)
    path = write_document(folder / "dicomrouter.yaml", document)
    result = CliRunner().invoke(cli, ["--config", str(path), "db", "upgrade"])
    assert result.exit_code == 0, result.output
    return path, port


def echoscu(port: int, calling_ae: str, called_ae: str = ROUTER_AE):
    return run_dcmtk("echoscu", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), timeout=30)


def log_events(router: RouterProcess, event: str) -> list[dict]:
    events = []
    for line in router.log_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                events.append(record)
    return events


def wait_for_event(router: RouterProcess, event: str, timeout: float = 5.0, **fields) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for record in log_events(router, event):
            if all(record.get(key) == value for key, value in fields.items()):
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event} {fields} in the log:\n{router.log_tail()}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    path, port = write_router_config(tmp_path_factory.mktemp("echo-scp"))
    with RouterProcess(path, port) as process:
        yield process


@pytest.mark.slow
def test_known_client_echo_succeeds(router):
    result = echoscu(router.port, "WORKSTATION")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for_event(router, "association_accepted", calling_ae="WORKSTATION", address="127.0.0.1")


@pytest.mark.slow
def test_client_without_host_may_call_from_anywhere(router):
    result = echoscu(router.port, "ANYWHERE")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_a_server_ae_is_a_known_called_ae(router):
    result = echoscu(router.port, "WORKSTATION", called_ae="TEST_PACS_1")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_unknown_calling_ae_rejected_and_logged(router):
    result = echoscu(router.port, "STRANGER")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Association Rejected" in output
    assert "Calling AE Title Not Recognized" in output
    record = wait_for_event(router, "association_rejected", calling_ae="STRANGER")
    assert record["address"] == "127.0.0.1"
    assert "STRANGER" in record["reason"]


@pytest.mark.slow
def test_client_from_the_wrong_host_rejected(router):
    result = echoscu(router.port, "REMOTE")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in output
    record = wait_for_event(router, "association_rejected", calling_ae="REMOTE")
    assert record["address"] == "127.0.0.1"
    assert "127.0.0.2" in record["reason"]


@pytest.mark.slow
def test_server_ae_only_from_its_own_host(router):
    # A PACS may call in under its own AE title (C-MOVE sub-operations), from its own host only.
    result = echoscu(router.port, "TEST_PACS_1")
    assert result.returncode == 0, result.stdout + result.stderr
    far = echoscu(router.port, "FAR_PACS")
    assert far.returncode != 0
    assert "Calling AE Title Not Recognized" in far.stdout + far.stderr
    record = wait_for_event(router, "association_rejected", calling_ae="FAR_PACS")
    assert "127.0.0.2" in record["reason"]


@pytest.mark.slow
def test_unknown_called_ae_rejected(router):
    result = echoscu(router.port, "WORKSTATION", called_ae="NOT_ME")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in output
    record = wait_for_event(router, "association_rejected", called_ae="NOT_ME")
    assert record["calling_ae"] == "WORKSTATION"


@pytest.mark.slow
def test_accept_unknown_callers(tmp_path):
    path, port = write_router_config(tmp_path, accept_unknown_callers=True)
    with RouterProcess(path, port) as router:
        result = echoscu(port, "STRANGER")
        assert result.returncode == 0, result.stdout + result.stderr
        record = wait_for_event(router, "association_accepted", calling_ae="STRANGER")
        assert record["caller_kind"] == "unknown"
        # A known client's host restriction still holds.
        assert echoscu(port, "REMOTE").returncode != 0
        # So does the called AE check.
        assert echoscu(port, "STRANGER", called_ae="NOT_ME").returncode != 0


@pytest.mark.slow
def test_sigterm_stops_quickly_with_exit_code_0(tmp_path):
    path, port = write_router_config(tmp_path)
    router = RouterProcess(path, port).start()  # its readiness probe leaves a never-associated connection
    try:
        assert echoscu(port, "WORKSTATION").returncode == 0
        idle = socket.create_connection(("127.0.0.1", port))  # connected, never associates
        started = time.monotonic()
        exit_code = router.stop(timeout=10)
        elapsed = time.monotonic() - started
        idle.close()
    finally:
        router.kill()
    assert exit_code == 0, router.log_tail()
    assert elapsed < 3.0, f"SIGTERM took {elapsed:.1f} s"
    wait_for_event(router, "router_stopped")


def test_accepted_socket_has_tcp_nodelay(tmp_path):
    """In-process front: the socket it accepted has Nagle off, and echoes on it succeed."""
    from dicomrouter.app import build_app

    path, _port = write_router_config(tmp_path)
    app = build_app(load_config(path), host="127.0.0.1", port=0, watch_file=False)
    app.start()
    try:
        client = AE(ae_title="WORKSTATION")
        client.add_requested_context(Verification)
        assoc = client.associate(
            "127.0.0.1", app.front.bound_port, ae_title=ROUTER_AE, evt_handlers=OUTGOING_SOCKET_HANDLERS
        )
        assert assoc.is_established
        try:
            accepted = app.front.table.everyone()
            assert len(accepted) == 1
            server_socket = accepted[0].sock
            assert server_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            for _ in range(3):
                status = assoc.send_c_echo()
                assert status and status.Status == 0x0000
        finally:
            assoc.release()
    finally:
        app.stop(drain_timeout_s=5)


@pytest.mark.slow
def test_client_from_its_own_host_accepted_and_spoofed_ae_rejected(router):
    """REMOTE may call only from 127.0.0.2: accepted from there, rejected from 127.0.0.1 (spoofing)."""
    client = AE(ae_title="REMOTE")
    client.add_requested_context(Verification)
    assoc = client.associate("127.0.0.1", router.port, ae_title=ROUTER_AE, bind_address=("127.0.0.2", 0))
    assert assoc.is_established
    assoc.release()
    with RawPeer(router.port) as spoofed:  # from 127.0.0.1
        spoofed.send(associate_rq("REMOTE", ROUTER_AE))
        answer = spoofed.read_pdu(timeout=10)
    # A-ASSOCIATE-RJ: rejected permanent, service user, calling AE title not recognised
    assert answer == (A_ASSOCIATE_RJ, b"\x00\x01\x01\x03")
