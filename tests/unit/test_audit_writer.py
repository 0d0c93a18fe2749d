"""The audit writer: record() never waits for the database; rows arrive once it answers again."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from dicomrouter.audit import AssociationAudit, AuditTrail
from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.models import AuditEvent
from dicomrouter.catalog.queries import Catalog
from dicomrouter.catalog.schema import upgrade


class FlakySink:
    """Fails while `down` is set (like a database that went away), records what it wrote."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.attempts = 0
        self.written: list[dict] = []
        self.failed_once = threading.Event()

    def __call__(self, rows) -> None:
        self.attempts += 1
        if self.down.is_set():
            self.failed_once.set()
            raise sa.exc.OperationalError("INSERT", {}, Exception("connection refused"))
        self.written.extend(rows)


class GatedSink:
    """Blocks inside the write until released (a database hanging on a lock)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.written: list[dict] = []

    def __call__(self, rows) -> None:
        self.entered.set()
        self.release.wait()
        self.written.extend(rows)


def test_rows_recorded_while_the_database_is_down_arrive_when_it_returns():
    sink = FlakySink()
    sink.down.set()
    trail = AuditTrail(sink, node="test-node", retry_initial_s=0.01, retry_max_s=0.05).start()
    try:
        trail.record("echo", "success", calling_ae="WS1", address="127.0.0.1")
        assert sink.failed_once.wait(10)
        for index in range(3):
            trail.record("store", "success", calling_ae="WS1", study_uid=f"1.2.{index}", counts={"instances": 1})
        assert sink.written == []
        assert trail.backlog == 4
        sink.down.clear()
        assert trail.flush(30)
    finally:
        trail.stop()
    assert [row["operation"] for row in sink.written] == ["echo", "store", "store", "store"]
    assert [row["study_uid"] for row in sink.written[1:]] == ["1.2.0", "1.2.1", "1.2.2"]
    assert {row["node"] for row in sink.written} == {"test-node"}
    assert sink.written[0]["at"] <= sink.written[1]["at"]  # the time of the event, not of the insert
    assert trail.written == 4 and trail.backlog == 0


def test_record_does_not_wait_for_a_hanging_write():
    sink = GatedSink()
    trail = AuditTrail(sink).start()
    try:
        trail.record("association", "accepted", calling_ae="WS1")
        assert sink.entered.wait(10)  # the writer is stuck inside the database call
        # These calls return although the writer cannot make progress.
        for _ in range(100):
            trail.record("echo", "success", calling_ae="WS1")
        assert trail.backlog == 101
        sink.release.set()
        assert trail.flush(30)
    finally:
        sink.release.set()
        trail.stop()
    assert len(sink.written) == 101


def test_a_full_buffer_drops_and_says_how_many():
    sink = GatedSink()
    trail = AuditTrail(sink, capacity=3).start()
    try:
        trail.record("echo", "success")
        assert sink.entered.wait(10)
        for _ in range(4):  # 3 fit (one is being written), 2 are dropped
            trail.record("echo", "success")
        sink.release.set()
        assert trail.flush(30)
    finally:
        sink.release.set()
        trail.stop()
    lost = [row for row in sink.written if row["operation"] == "audit"]
    assert len(lost) == 1 and lost[0]["outcome"] == "dropped" and lost[0]["counts"] == {"rows": 2}
    assert len([row for row in sink.written if row["operation"] == "echo"]) == 3


def test_stores_of_one_association_are_tallied_per_study_and_outcome():
    rows: list[dict] = []
    trail = AuditTrail(rows.extend).start()
    try:
        audit = AssociationAudit(trail, "CT1", "DICOMROUTER", "10.0.0.5")
        for _ in range(3):
            audit.count_store("1.2.3", "success", ["Test PACS 1"], None)
        audit.count_store("1.2.3", "refused", ["Prod PACS 1"], "CT1 may not write to Prod PACS 1")
        audit.count_store("1.2.3", "refused", ["Prod PACS 1"], "another reason")
        audit.count_store("1.2.4", "success", ["Test PACS 2"], None)
        assert trail.flush(10) and rows == []  # nothing before the association ends
        audit.close()
        audit.close()  # a second close writes nothing twice
        assert trail.flush(10)
    finally:
        trail.stop()
    summary = {(r["study_uid"], r["outcome"]): r for r in rows}
    assert set(summary) == {("1.2.3", "success"), ("1.2.3", "refused"), ("1.2.4", "success")}
    refused = summary[("1.2.3", "refused")]
    assert refused["counts"] == {"instances": 2}
    assert refused["detail"] == "CT1 may not write to Prod PACS 1"
    assert (refused["calling_ae"], refused["called_ae"], refused["address"]) == ("CT1", "DICOMROUTER", "10.0.0.5")
    assert summary[("1.2.3", "success")]["counts"] == {"instances": 3}
    assert summary[("1.2.3", "success")]["servers"] == "Test PACS 1"


@pytest.fixture
def sqlite_catalog(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'catalog.db'}")
    upgrade(engine)
    yield Catalog(session_factory(engine)), tmp_path / "catalog.db"
    engine.dispose()


def test_locked_sqlite_catalog_delays_rows_without_losing_them(sqlite_catalog):
    catalog, path = sqlite_catalog
    trail = AuditTrail(catalog.add_audit_rows, retry_initial_s=0.05, retry_max_s=0.2).start()
    locker = sqlite3.connect(path, isolation_level=None)  # another process, holding the write lock
    try:
        locker.execute("BEGIN IMMEDIATE")
        trail.record("echo", "success", calling_ae="WS1")
        trail.record("find", "success", calling_ae="WS1", servers=["a", "b"], counts={"answers": 2})
        assert not trail.flush(0.5)  # nothing can be written while the lock is held
        locker.execute("ROLLBACK")
        assert trail.flush(60)
    finally:
        trail.stop()
        locker.close()
    with catalog.sessions() as session:
        events = session.scalars(sa.select(AuditEvent).order_by(AuditEvent.id)).all()
    assert [(e.operation, e.servers, e.counts) for e in events] == [
        ("echo", None, None),
        ("find", "a,b", {"answers": 2}),
    ]


def test_a_burst_of_rows_is_written_together_and_flush_does_not_linger():
    calls: list[int] = []
    written = threading.Event()

    def sink(rows) -> None:
        calls.append(len(rows))
        written.set()

    trail = AuditTrail(sink, linger_s=30).start()  # only a flush ends the wait here
    try:
        for _ in range(5):
            trail.record("echo", "success", calling_ae="WS1")
        assert not written.is_set()  # still gathering: the writer waits after the first row
        assert trail.flush(10)
        assert calls == [5]
    finally:
        trail.stop()
