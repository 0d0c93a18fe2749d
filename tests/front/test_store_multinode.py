"""Two router processes on one PostgreSQL catalog share the forwarding queue; no job is sent twice."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from dicomrouter.pacsfarm import free_ports
from tests.conftest import upgrade_catalog
from tests.support.configs import write_document
from tests.support.orthanc_fixtures import make_test_instance, write_instance
from tests.support.router_process import RouterProcess, dcmtk, dcmtk_env, wait_for_port
from tests.support.store_helpers import FAST_FORWARDING

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _document(catalog_url: str, router_port: int, destination_port: int, spool: Path) -> dict:
    return {
        "router": {
            "ae_title": "DICOMROUTER",
            "host": "127.0.0.1",
            "port": router_port,
            "catalog": catalog_url,
            "spool": str(spool),
            "forwarding": dict(FAST_FORWARDING),
        },
        "servers": [
            {
                "name": "Archive",
                "ae_title": "ARCHIVE",
                "host": "127.0.0.1",
                "port": destination_port,
                "environment": "test",
                "active": True,
                "primary": True,
            }
        ],
        "clients": [
            {"ae_title": "WORKSTATION", "host": "127.0.0.1", "roles": ["test_read", "test_write"]}
        ],
        "routes": [],
    }


def test_two_routers_share_one_queue_without_duplicates(pg_database, tmp_path):
    catalog_url = pg_database.render_as_string(hide_password=False)
    port_a, port_b, archive_port = free_ports(3)
    spool = tmp_path / "shared-spool"  # several nodes share the spool (e.g. a network file system)
    config_a = write_document(
        tmp_path / "a.yaml", _document(catalog_url, port_a, archive_port, spool)
    )
    config_b = write_document(
        tmp_path / "b.yaml", _document(catalog_url, port_b, archive_port, spool)
    )
    upgrade_catalog(config_a)
    received = tmp_path / "received"
    received.mkdir()
    archive_log = open(tmp_path / "storescp.log", "w")
    archive = subprocess.Popen(
        [
            dcmtk("storescp"),
            "-v",
            "-aet",
            "ARCHIVE",
            "-od",
            str(received),
            "-uf",
            str(archive_port),
        ],
        stdout=archive_log,
        stderr=subprocess.STDOUT,
        env=dcmtk_env(),
    )
    routers = [RouterProcess(config_a, port_a), RouterProcess(config_b, port_b)]
    try:
        wait_for_port(archive_port)
        for router in routers:
            router.start()
        study = generate_uid()
        batches = []
        for name in ("a", "b"):
            folder = tmp_path / f"in-{name}"
            folder.mkdir()
            batches.append(
                [
                    str(
                        write_instance(
                            folder / f"{i}.dcm",
                            make_test_instance(study_uid=study, instance_number=i),
                        )
                    )
                    for i in range(40)
                ]
            )
        senders = [
            subprocess.Popen(
                [
                    dcmtk("storescu"),
                    "-aet",
                    "WORKSTATION",
                    "-aec",
                    "DICOMROUTER",
                    "127.0.0.1",
                    str(port),
                    *files,
                ],
                env=dcmtk_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for port, files in zip((port_a, port_b), batches, strict=True)
        ]
        assert [s.wait(timeout=120) for s in senders] == [0, 0]
        # Wait for the event itself: every job marked done (after its send), whatever the time it takes.
        deadline = time.monotonic() + 60
        listing = routers[0].cli("queue", "list").stdout
        while "queue: done 80" not in listing and time.monotonic() < deadline:
            time.sleep(0.2)
            listing = routers[0].cli("queue", "list").stdout
        assert "queue: done 80" in listing, listing
        # Node ids are host:pid:token; a router of several workers is several nodes, all its processes.
        processes = [{router.process.pid, *router.worker_pids()} for router in routers]
        engine = sa.create_engine(pg_database)
        with engine.connect() as connection:
            nodes = (
                connection.execute(sa.text("SELECT DISTINCT claimed_by FROM forward_jobs"))
                .scalars()
                .all()
            )
        engine.dispose()
        forwarded_by = {
            index for index, pids in enumerate(processes) for node in nodes if node and int(node.split(":")[1]) in pids
        }
        assert forwarded_by == {0, 1}, f"both routers forwarded from the shared queue: {nodes}, {processes}"
    finally:
        for router in routers:
            router.stop()
        archive.terminate()
        archive.wait(timeout=10)
        archive_log.close()
    log = (tmp_path / "storescp.log").read_text(errors="replace")
    assert log.count("Received Store Request") == 80, "every instance exactly once"
    assert len(list(received.iterdir())) == 80
