"""The catalog database on SQLite and PostgreSQL: migrations, servers, studies, concurrency."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from dicomrouter.catalog import (
    Catalog,
    SchemaNeedsUpgrade,
    StoredInstance,
    make_engine,
    require_current_schema,
    schema_state,
    session_factory,
    upgrade,
)
from dicomrouter.catalog.models import (
    AuditEvent,
    Base,
    ForwardJob,
    Server,
)
from dicomrouter.catalog.schema import head_revision
from dicomrouter.config import parse_config

PG_ADMIN_URL = os.environ.get(
    "DICOMROUTER_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TABLES = {
    "servers",
    "patients",
    "studies",
    "series",
    "instances",
    "study_locations",
    "instance_locations",
    "forward_jobs",
    "forward_destinations",
    "audit_events",
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def url(catalog_url: str) -> str:
    """An empty database on SQLite and on PostgreSQL (tests/conftest.py)."""
    return catalog_url


@pytest.fixture
def engine(url: str) -> Iterator[sa.Engine]:
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def catalog(engine: sa.Engine) -> Catalog:
    upgrade(engine)
    catalog = Catalog(session_factory(engine))
    catalog.sync_servers(make_config(["pacs1", "pacs2", "pacs3"]))
    return catalog


def make_config(
    names: list[str], ports: dict[str, int] | None = None, deleted: tuple[str, ...] = ()
):
    """A validated config with one server per name, the first primary."""
    servers = [
        {
            "name": name,
            "ae_title": name.upper(),
            "host": "127.0.0.1",
            "port": (ports or {}).get(name, 4242 + index),
            "environment": "test",
            "active": name not in deleted,
            "primary": index == 0,
            "deleted": name in deleted,
        }
        for index, name in enumerate(names)
    ]
    return parse_config({"servers": servers}, Path("/nonexistent/dicomrouter.yaml"))


def attrs(
    study: str, series: str = "1", sop: str = "1", modality: str = "CT", **extra: Any
) -> dict[str, Any]:
    """Attributes of one instance, UIDs derived from short names."""
    values = {
        "PatientID": "PAT1",
        "IssuerOfPatientID": None,
        "PatientName": "Doe^Jane",
        "PatientBirthDate": "19700102",
        "StudyInstanceUID": f"1.2.3.{study}",
        "StudyDate": "20240131",
        "AccessionNumber": f"ACC{study}",
        "StudyDescription": "CHEST",
        "SeriesInstanceUID": f"1.2.3.{study}.{series}",
        "Modality": modality,
        "SeriesNumber": series,
        "SOPInstanceUID": f"1.2.3.{study}.{series}.{sop}",
    }
    values.update(extra)
    return values


def stored(study: str, series: str = "1", sop: str = "1", **extra: Any) -> StoredInstance:
    return StoredInstance(
        attrs(study, series, sop, **extra),
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.1.2.1",
        1234,
        "ab" * 32,
    )


def count(engine: sa.Engine, model: type[Base]) -> int:
    with engine.connect() as connection:
        return connection.scalar(sa.select(sa.func.count()).select_from(model))


# --------------------------------------------------------------------------- schema


def test_upgrade_from_empty_to_head(url: str) -> None:
    assert schema_state(url) == (None, head_revision())
    upgrade(url)  # from a URL string: opens and disposes its own engine
    assert schema_state(url) == (head_revision(), head_revision())
    upgrade(url)  # already at head: nothing to do
    engine = make_engine(url)
    try:
        assert TABLES <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_models_and_migrations_agree(engine: sa.Engine) -> None:
    upgrade(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_concurrent_upgrades(url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def run() -> None:
        try:
            barrier.wait(timeout=30)
            upgrade(url)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert schema_state(url) == (head_revision(), head_revision())


def test_require_current_schema(engine: sa.Engine) -> None:
    with pytest.raises(SchemaNeedsUpgrade, match="run: dicomrouter --config FILE db upgrade"):
        require_current_schema(engine)
    upgrade(engine)
    require_current_schema(engine)


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'deep' / 'er' / 'c.db'}")
    try:
        with engine.connect() as connection:
            pragma = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
            }
        assert pragma == {
            "journal_mode": "wal",
            "foreign_keys": 1,
            "busy_timeout": 30000,
            "synchronous": 1,
        }
        assert (tmp_path / "deep" / "er" / "c.db").exists()
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- servers


def test_sync_servers_keeps_removed_servers_as_deleted(engine: sa.Engine) -> None:
    upgrade(engine)
    catalog = Catalog(session_factory(engine))
    first = catalog.sync_servers(make_config(["pacs1", "pacs2", "pacs3"]))
    assert first.added == ("pacs1", "pacs2", "pacs3")
    assert catalog.sync_servers(make_config(["pacs1", "pacs2", "pacs3"])).updated == ()

    change = catalog.sync_servers(make_config(["pacs1", "pacs3"], ports={"pacs3": 5000}))
    assert (change.added, change.updated, change.deleted) == ((), ("pacs3",), ("pacs2",))

    with session_factory(engine)() as session:
        rows = {s.name: s for s in session.scalars(sa.select(Server))}
    assert set(rows) == {"pacs1", "pacs2", "pacs3"}
    assert (rows["pacs2"].deleted, rows["pacs2"].active, rows["pacs2"].primary) == (
        True,
        False,
        False,
    )
    assert rows["pacs3"].port == 5000 and not rows["pacs3"].deleted
    assert rows["pacs1"].primary and rows["pacs1"].updated_at.tzinfo == UTC

    # Deleted in the YAML (soft-deleted there) is mirrored too, and comes back when restored.
    catalog.sync_servers(make_config(["pacs1", "pacs2", "pacs3"], deleted=("pacs2",)))
    assert catalog.sync_servers(make_config(["pacs1", "pacs2", "pacs3"])).updated == ("pacs2",)


# --------------------------------------------------------------------------- counts, queue, audit


def test_studies_per_server(catalog: Catalog) -> None:
    assert catalog.studies_per_server() == {"pacs1": 0, "pacs2": 0, "pacs3": 0}
    catalog.record_instances_stored("pacs1", [stored("1"), stored("1", sop="2"), stored("2")])
    catalog.record_instance_stored("pacs2", attrs("1"), None, None, None, None)
    catalog.record_study_seen("pacs2", "1.2.3.3", "found")
    assert catalog.studies_per_server() == {"pacs1": 2, "pacs2": 2, "pacs3": 0}


def test_forward_job_round_trip(catalog: Catalog) -> None:
    due = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    with catalog.sessions.begin() as session:
        session.add(
            ForwardJob(
                sop_instance_uid="1.2.3.4",
                spool_path="/spool/ab/cd.dcm",
                sha256="cd" * 32,
                size_bytes=5_000_000_000,
                destination="pacs2",
                next_attempt_at=due,
                header={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"},
            )
        )
    with catalog.sessions() as session:
        job = session.scalars(sa.select(ForwardJob)).one()
        later = session.scalars(
            sa.select(ForwardJob).where(ForwardJob.next_attempt_at > due - timedelta(seconds=1))
        ).all()
        earlier = session.scalars(
            sa.select(ForwardJob).where(ForwardJob.next_attempt_at < due)
        ).all()
    assert (job.state, job.attempts, job.size_bytes, job.header["SOPClassUID"]) == (
        "pending",
        0,
        5_000_000_000,
        "1.2.840.10008.5.1.4.1.1.2",
    )
    assert job.next_attempt_at == due and job.next_attempt_at.tzinfo == UTC
    assert (len(later), len(earlier)) == (1, 0)
    with (
        pytest.raises(sa.exc.StatementError, match="naive datetime"),
        catalog.sessions.begin() as session,
    ):
        session.execute(sa.update(ForwardJob).values(next_attempt_at=datetime(2030, 1, 1)))


def test_add_audit(catalog: Catalog, engine: sa.Engine) -> None:
    first = catalog.add_audit(
        "find",
        "success",
        calling_ae="WS1",
        address="10.0.0.1:4000",
        servers=["pacs1", "pacs2"],
        counts={"matches": 3},
    )
    second = catalog.add_audit("store", "failure", study_uid="1.2.3", detail="pacs2 refused")
    assert second > first
    with session_factory(engine)() as session:
        event = session.get(AuditEvent, first)
    assert event is not None
    assert (event.servers, event.counts, event.calling_ae) == ("pacs1,pacs2", {"matches": 3}, "WS1")
    assert event.at.tzinfo == UTC


# --------------------------------------------------------------------------- forwarding outages


def test_outage_book_keeps_the_start_of_an_outage_until_the_destination_answers(catalog: Catalog) -> None:
    from dicomrouter.store.outages import OutageBook

    book = OutageBook(catalog.sessions)
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert book.note_reachable("pacs1") is None  # no outage on record: nothing to log
    since = book.note_unreachable("pacs1", "unreachable: refused", later)
    assert book.note_unreachable("pacs1", "unreachable: timed out", later) == since
    row = book.all()["pacs1"]
    assert (row.failed_connects, row.last_error, row.unreachable_since) == (2, "unreachable: timed out", since)
    assert book.note_reachable("pacs1") == since
    assert book.unreachable_since("pacs1") is None and book.all()["pacs1"].recovered_at is not None
    again = book.note_unreachable("pacs1", "unreachable: refused", later)
    assert again > since and book.all()["pacs1"].failed_connects == 1  # a new outage counts afresh


def test_queue_report_sums_per_destination_and_study(catalog: Catalog) -> None:
    from dicomrouter.catalog.db import engine_of
    from dicomrouter.catalog.direct import DirectConnections
    from dicomrouter.config import ForwardingConfig
    from dicomrouter.store.outages import OutageBook
    from dicomrouter.store.queue import ForwardQueue, NewJob
    from dicomrouter.store.queue_report import destination_backlogs, instance_jobs, study_backlogs

    queue = ForwardQueue(catalog.sessions, "node", ForwardingConfig())
    header = {"SOPClassUID": "1.2", "TransferSyntaxUID": "1.2.840.10008.1.2.1"}
    jobs = [
        NewJob(f"1.{i}", f"/spool/{i}", f"h{i}", 1, "pacs1", None, None, {**header, "StudyInstanceUID": "9.1"})
        for i in range(5)
    ] + [NewJob("2.1", "/spool/x", "hx", 1, "pacs2", None, None, {**header, "StudyInstanceUID": "9.2"})]
    direct = DirectConnections(engine_of(catalog.sessions))
    with direct.begin() as transaction:
        queue.enqueue(transaction, jobs)
    direct.close()
    retry_at = datetime.now(UTC) + timedelta(seconds=30)
    OutageBook(catalog.sessions).note_unreachable("pacs1", "unreachable: refused", retry_at)
    by_destination = {b.destination: b for b in catalog.read_plain(destination_backlogs)}
    assert (by_destination["pacs1"].pending, by_destination["pacs1"].failed_connects) == (5, 1)
    assert by_destination["pacs1"].last_error == "unreachable: refused"
    assert by_destination["pacs1"].next_attempt == retry_at  # the lane's next try, not the jobs' due times
    assert by_destination["pacs2"].unreachable_since is None and by_destination["pacs2"].pending == 1
    studies = {(b.destination, b.study_uid): b.pending for b in catalog.read_plain(study_backlogs)}
    assert studies == {("pacs1", "9.1"): 5, ("pacs2", "9.2"): 1}
    assert [b.study_uid for b in catalog.read_plain(lambda r: study_backlogs(r, study_uid="9.2"))] == ["9.2"]
    assert len(catalog.read_plain(lambda r: instance_jobs(r, dead=False, study_uid="9.1", limit=3))) == 3


def test_plain_reads_give_what_the_models_give(catalog: Catalog, url: str) -> None:
    """The read commands read without SQLAlchemy: timestamps, JSON and text come back as the ORM's
    column types give them, on the CLI's own connection as on the router's."""
    from dataclasses import astuple, fields

    from dicomrouter.catalog import reads
    from dicomrouter.catalog.models import CommitmentRequest, StudyLocation
    from dicomrouter.catalog.plain import open_reader
    from dicomrouter.store.queue_report import JobRow, instance_jobs

    moment = datetime(2025, 3, 1, 12, 30, 15, 120000, tzinfo=UTC)
    catalog.record_study_seen("pacs2", "9.9", "found")
    catalog.add_audit(
        "store", "success", calling_ae="MOD", servers=["pacs1", "pacs2"], study_uid="9.9",
        counts={"stored": 2, "why": ["a", 1]}, detail="d\x1b", at=moment,
    )
    catalog.add_audit("echo", "success", at=moment.astimezone(timezone(timedelta(hours=5))))
    with catalog.sessions.begin() as session:
        session.add(ForwardJob(
            sop_instance_uid="9.9.1", spool_path="x", sha256="0" * 64, size_bytes=1, destination="pacs1",
            created_at=moment, next_attempt_at=moment + timedelta(microseconds=1), last_error="é",
            header={"StudyInstanceUID": "9.9", "n": [1, "a"]}, study_uid="9.9",
        ))
        session.add(CommitmentRequest(
            transaction_uid="2.25.9", calling_ae="MOD", called_ae="R", address="a", instances=[["1.2", "9.9.1"]],
            received_at=moment, deadline_at=moment + timedelta(hours=1), failures={"9.9.1": [274, "why"]},
            event_type=2, reported_at=moment + timedelta(seconds=3), reported_how="new association",
        ))
    with catalog.sessions() as session:
        events = session.scalars(sa.select(AuditEvent).order_by(AuditEvent.id)).all()
        jobs = session.scalars(sa.select(ForwardJob)).all()
        requests = session.scalars(sa.select(CommitmentRequest)).all()
        locations = session.scalars(sa.select(StudyLocation)).all()
        expected = (
            [tuple(getattr(e, f.name) for f in fields(reads.AuditRow)) for e in events],
            [tuple(getattr(j, f.name) for f in fields(JobRow)) for j in jobs],
            [tuple(getattr(r, f.name) for f in fields(reads.CommitmentRow)) for r in requests],
            [("pacs2", "found", location.first_seen, location.last_seen) for location in locations],
        )

    def read(reader) -> tuple:
        return (
            [astuple(e) for e in reads.audit_events(reader)],
            [astuple(j) for j in instance_jobs(reader, dead=False)],
            [astuple(r) for r in reads.commitment_requests(reader, pending_only=True)],
            [tuple(row) for row in reads.study_location_rows(reader, "9.9")],
        )

    through_router = catalog.read_plain(read)
    with open_reader(url) as reader:
        through_cli = read(reader)
    assert through_router == expected
    assert through_cli == expected
    assert [event[1].isoformat() for event in through_cli[0]] == [e.at.isoformat() for e in events]
    assert through_cli[0][1][-1] is None  # no counts: JSON null
