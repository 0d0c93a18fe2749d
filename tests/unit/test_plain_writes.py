"""The CLI's plain-SQL writes (catalog/plain.py open_writer) store what the ORM stores, and take turns
with a router's writers as its engine does; `queue list`'s counts stay bounded."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from dicomrouter.catalog import writes
from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.models import AuditEvent, ForwardJob
from dicomrouter.catalog.plain import open_writer
from dicomrouter.catalog.schema import upgrade
from dicomrouter.catalog.sqlite import WriteLock, database_file
from dicomrouter.store import queue_actions
from dicomrouter.store.queue_report import job_counts
from tests.support.configs import base_document, write_document

ROOT = Path(__file__).resolve().parents[2]
_COLUMNS = "at, calling_ae, called_ae, address, node, operation, servers, study_uid, outcome, detail, CAST(counts AS TEXT)"


@pytest.mark.parametrize("counts", [None, {"instances": 2, "why": "x"}])
def test_audit_row_stored_as_the_orm_stores_it(catalog_url: str, counts: dict | None) -> None:
    upgrade(catalog_url)
    values = writes.audit_values(
        "config",
        "changed",
        node="cli someone@host",
        servers=["A", "B"],
        detail="edit",
        counts=counts,
        at=datetime(2026, 1, 2, 3, 4, 5, 60, tzinfo=UTC),
    )
    engine = make_engine(catalog_url)
    try:
        with session_factory(engine).begin() as session:
            session.add(AuditEvent(**values))
        with open_writer(catalog_url) as catalog:
            new_id = catalog.write(lambda writer: writes.add_audit(writer, values))
        with engine.connect() as connection:
            rows = connection.exec_driver_sql(
                f"SELECT id, {_COLUMNS} FROM audit_events ORDER BY id"
            ).all()
    finally:
        engine.dispose()
    assert [row[0] for row in rows] == [1, new_id] == [1, 2]
    assert tuple(rows[0][1:]) == tuple(rows[1][1:])


def test_suspension_by_the_cli_and_by_the_router_alike(catalog_url: str) -> None:
    upgrade(catalog_url)
    with open_writer(catalog_url) as catalog:
        assert catalog.write(lambda writer: queue_actions.suspend(writer, "PACS", "cli x"))
        assert not catalog.write(lambda writer: queue_actions.suspend(writer, "PACS", "cli x"))
        suspended = catalog.read(queue_actions.suspended)
        assert list(suspended) == ["PACS"] and suspended["PACS"][1] == "cli x"
        assert suspended["PACS"][0].tzinfo is UTC
        assert catalog.write(lambda writer: queue_actions.resume(writer, "PACS"))
        assert not catalog.write(lambda writer: queue_actions.resume(writer, "PACS"))
        assert catalog.read(queue_actions.suspended) == {}


def test_cli_write_waits_for_the_writers_lock(tmp_path: Path) -> None:
    """A router worker holding the SQLite writers' lock (a record lock on `<database>-writers`) holds
    back a write command, which goes on as soon as the lock is released."""
    document = base_document()
    document["router"]["catalog"] = f"sqlite:///{tmp_path / 'catalog.db'}"
    config_path = write_document(tmp_path / "router.yaml", document)
    upgrade(document["router"]["catalog"])
    lock = WriteLock(database_file(str(tmp_path / "catalog.db")))
    lock.acquire()
    try:
        command = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dicomrouter",
                "--config",
                str(config_path),
                "queue",
                "suspend",
                "Prod PACS 1",
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        time.sleep(1.0)
        assert command.poll() is None, "the command wrote while a router held the writers' lock"
    finally:
        lock.release()
        lock.close()
    printed, _ = command.communicate(timeout=60)
    assert command.returncode == 0 and "Prod PACS 1 suspended" in printed
    engine = make_engine(document["router"]["catalog"])
    try:
        with engine.connect() as connection:
            assert connection.execute(
                sa.text("SELECT suspended_by FROM forward_destinations")
            ).scalar()
    finally:
        engine.dispose()


def test_queue_counts_stop_counting_delivered_jobs_at_the_cap(catalog_url: str) -> None:
    upgrade(catalog_url)
    engine = make_engine(catalog_url)
    try:
        with session_factory(engine).begin() as session:
            for index, state in enumerate(["done"] * 5 + ["dead", "pending"]):
                session.add(
                    ForwardJob(
                        sop_instance_uid=f"1.2.{index}",
                        spool_path=f"{index}.dcm",
                        sha256=f"{index:064d}",
                        size_bytes=1,
                        destination="PACS",
                        header={},
                        state=state,
                    )
                )
    finally:
        engine.dispose()
    with open_writer(catalog_url) as catalog:
        assert catalog.read(job_counts) == {"dead": 1, "done": 5, "pending": 1}
        assert catalog.read(lambda reader: job_counts(reader, done_cap=3)) == {
            "dead": 1,
            "done": 4,
            "pending": 1,
        }
