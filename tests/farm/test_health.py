"""`echo` and `health` against the real Orthanc farm, and against fake peers for timing and rejects."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomrouter.cli.main import cli
from tests.support.configs import base_document, write_document


def run(config_path: Path, *args: str):
    return CliRunner().invoke(cli, ["--config", str(config_path), *args], catch_exceptions=False)


def health_json(config_path: Path, *args: str) -> tuple[int, dict[str, dict]]:
    result = run(config_path, "health", "--json", *args)
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return result.exit_code, {row["name"]: row for row in rows}


@contextmanager
def stopped(server) -> Iterator[None]:
    """A farm server stopped for the block, always started again."""
    server.stop()
    try:
        yield
    finally:
        server.start()


# ----------------------------------------------------------------------------- real Orthanc farm


@pytest.mark.slow
def test_echo_and_health_with_one_server_stopped(farm_config, orthanc_farm):
    primary, down = orthanc_farm[0], orthanc_farm[3]
    with stopped(down):
        one = run(farm_config, "echo", primary.spec.name)
        assert one.exit_code == 0, one.output
        assert f"{primary.spec.name} ({primary.spec.ae_title}" in one.stdout
        assert "Success in" in one.stdout and " ms" in one.stdout

        failed = run(farm_config, "echo", down.spec.name)
        assert failed.exit_code == 1
        assert "unreachable" in failed.stdout

        every = run(farm_config, "echo", "--all")
        assert every.exit_code == 1  # one of them is down
        lines = every.stdout.splitlines()
        assert len(lines) == 4
        for server in orthanc_farm:
            line = next(line for line in lines if line.startswith(server.spec.name + " "))
            assert ("unreachable" in line) == (server is down), line
            assert ("Success in" in line) == (server is not down), line

        exit_code, rows = health_json(farm_config)
        assert exit_code == 0  # the primary is healthy
        assert set(rows) == {server.spec.name for server in orthanc_farm}
        for server in orthanc_farm:
            row = rows[server.spec.name]
            assert {"name", "ae_title", "status", "response_ms", "active", "primary"} <= row.keys()
            assert row["ae_title"] == server.spec.ae_title
            assert row["active"] is True
            assert row["primary"] is (server is primary)
            if server is down:
                assert row["status"] == "unreachable"
                assert row["response_ms"] is None
                assert row["reason"]
            else:
                assert row["status"] == "healthy", row
                assert isinstance(row["response_ms"], float) and 0 < row["response_ms"] < 1000
        table = run(farm_config, "health")
        assert table.exit_code == 0
        assert "unreachable" in table.stdout and "healthy" in table.stdout


@pytest.mark.slow
def test_health_fails_when_the_primary_is_down(farm_config, orthanc_farm):
    primary = orthanc_farm[0]
    with stopped(primary):
        exit_code, rows = health_json(farm_config)
        assert exit_code != 0
        assert rows[primary.spec.name]["status"] == "unreachable"
        assert rows[primary.spec.name]["primary"] is True
        assert sum(row["status"] == "healthy" for row in rows.values()) == 3
        table = run(farm_config, "health")
        assert table.exit_code != 0
        assert f"primary {primary.spec.name} is unreachable" in table.stderr


# ----------------------------------------------------------------------------- fake peers


@contextmanager
def blackhole() -> Iterator[int]:
    """A TCP port that accepts connections (kernel backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@contextmanager
def echo_scp(ae_title: str, require_calling_aet: list[str] | None = None) -> Iterator[int]:
    """A pynetdicom Verification SCP on a free port."""
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    if require_calling_aet:
        ae.require_calling_aet = require_calling_aet
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def server_entry(name: str, ae_title: str, port: int, primary: bool = False) -> dict:
    return {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": port,
            "environment": "test", "active": True, "primary": primary, "deleted": False}


def test_health_runs_in_parallel_and_reports_rejects(tmp_path):
    with ExitStack() as stack:
        healthy_port = stack.enter_context(echo_scp("FAKE_OK"))
        picky_port = stack.enter_context(echo_scp("FAKE_PICKY", require_calling_aet=["OTHER"]))
        silent_ports = [stack.enter_context(blackhole()) for _ in range(3)]
        document = base_document(servers=[
            server_entry("Healthy", "FAKE_OK", healthy_port, primary=True),
            server_entry("Picky", "FAKE_PICKY", picky_port),
            server_entry("Silent 1", "SILENT_1", silent_ports[0]),
            server_entry("Silent 2", "SILENT_2", silent_ports[1]),
            server_entry("Silent 3", "SILENT_3", silent_ports[2]),
        ])
        path = write_document(tmp_path / "dicomrouter.yaml", document)

        started = time.monotonic()
        exit_code, rows = health_json(path, "--timeout", "1")
        elapsed = time.monotonic() - started

    # One after the other, three silent servers alone would take 3 s.
    assert elapsed < 2.5, f"health took {elapsed:.1f} s: the silent servers were not checked in parallel"
    assert exit_code == 0
    assert rows["Healthy"]["status"] == "healthy"
    assert rows["Picky"]["status"] == "rejected"
    assert "calling AE title not recognised" in rows["Picky"]["reason"]
    for name in ("Silent 1", "Silent 2", "Silent 3"):
        assert rows[name]["status"] == "unreachable"
        assert rows[name]["response_ms"] is None
        assert "no answer to the association request" in rows[name]["reason"], rows[name]["reason"]


def test_echo_reports_a_rejected_association(tmp_path):
    with echo_scp("FAKE_PICKY", require_calling_aet=["OTHER"]) as port:
        document = base_document(servers=[server_entry("Picky", "FAKE_PICKY", port, primary=True)])
        path = write_document(tmp_path / "dicomrouter.yaml", document)
        result = run(path, "echo", "Picky", "--timeout", "2")
        assert result.exit_code == 1
        assert "rejected: calling AE title not recognised (permanent)" in result.stdout
        exit_code, rows = health_json(path, "--timeout", "2")
        assert exit_code != 0  # the primary rejects us
        assert rows["Picky"]["status"] == "rejected"


def test_echo_needs_a_name_or_all(tmp_path):
    path = write_document(tmp_path / "dicomrouter.yaml", base_document())
    assert run(path, "echo").exit_code == 2
    unknown = run(path, "echo", "Nope")
    assert unknown.exit_code == 1 and "no server named 'Nope'" in unknown.output
