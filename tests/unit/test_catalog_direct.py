"""The C-STORE path's catalog transaction on kept DB-API connections (catalog.direct), on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from io import BytesIO
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from structlog.testing import capture_logs

from dicomrouter.catalog import Catalog
from dicomrouter.catalog import direct as catalog_direct
from dicomrouter.catalog import sqlite as catalog_sqlite
from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.direct import DirectConnections
from dicomrouter.catalog.models import ForwardJob, Server
from dicomrouter.catalog.schema import upgrade
from dicomrouter.catalog.upserts import record_stored
from dicomrouter.config import ForwardingConfig, parse_config
from dicomrouter.routing.access import Caller
from dicomrouter.store import acks as store_acks
from dicomrouter.store.acks import AckRecorder
from dicomrouter.store.queue import ForwardQueue, NewJob
from dicomrouter.store.receive import OUT_OF_RESOURCES, SUCCESS, ReceiveService, delivered_copies
from dicomrouter.store.spool import Spool
from tests.support.configs import base_document
from tests.unit import test_catalog as shared

# The parametrized database fixtures (SQLite file / PostgreSQL schema) of test_catalog.
url, engine, catalog = shared.url, shared.engine, shared.catalog

CT = "1.2.840.10008.5.1.4.1.1.2"


def break_connection(engine: sa.Engine, connection) -> None:
    """What a restarted PostgreSQL or a lost socket does to a kept connection (SQLite: it is closed)."""
    if engine.dialect.name == "sqlite":
        connection.close()
        return
    admin = sa.create_engine(engine.url)  # not the engine under test: its checkouts are counted
    try:
        with admin.connect() as session:
            session.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": connection.info.backend_pid})
    finally:
        admin.dispose()


def test_a_broken_connection_is_dropped_and_replaced_not_reused(catalog: Catalog, engine: sa.Engine) -> None:
    handed_out = []  # the DB-API connections the engine handed to DirectConnections
    sa.event.listen(engine, "checkout", lambda dbapi_connection, _record, _proxy: handed_out.append(dbapi_connection))
    direct = DirectConnections(engine)
    try:
        for _ in range(3):
            with direct.begin() as transaction:
                assert delivered_copies(transaction, "1.2.3") == {}
        assert len(handed_out) == 1, "one connection, kept between transactions"
        (first,) = handed_out
        break_connection(engine, first)
        with pytest.raises(Exception), direct.begin() as transaction:  # noqa: B017 (sqlite3 or psycopg's error)
            delivered_copies(transaction, "1.2.3")
        for _ in range(2):
            with direct.begin() as transaction:
                assert delivered_copies(transaction, "1.2.3") == {}
        assert len(handed_out) == 2 and handed_out[1] is not first, "a fresh connection, then kept"
        if engine.dialect.name == "postgresql":
            assert first.closed
    finally:
        direct.close()


def test_a_connection_broken_while_idle_is_replaced_before_use(
    catalog: Catalog, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's pre-ping, for a kept connection: after a lull, a restarted server costs no failed store."""
    handed_out = []
    sa.event.listen(engine, "checkout", lambda dbapi_connection, _record, _proxy: handed_out.append(dbapi_connection))
    direct = DirectConnections(engine)
    try:
        with direct.begin() as transaction:
            delivered_copies(transaction, "1.2.3")
        break_connection(engine, handed_out[0])
        monkeypatch.setattr(catalog_direct, "PING_AFTER_IDLE_S", 0.0)  # it has lain idle long enough
        with direct.begin() as transaction:
            assert delivered_copies(transaction, "1.2.3") == {}
        assert len(handed_out) == 2
    finally:
        direct.close()


def test_a_failed_transaction_writes_nothing_and_the_next_one_runs(catalog: Catalog, engine: sa.Engine) -> None:
    direct = DirectConnections(engine)
    insert = sa.insert(ForwardJob.__table__).values(
        sop_instance_uid=sa.bindparam("uid"), spool_path="/spool/x", sha256="ab", size_bytes=1, destination="pacs1",
        state="pending", attempts=0, next_attempt_at=sa.func.now(), created_at=sa.func.now(),
        updated_at=sa.func.now(), header=sa.literal_column("'{}'"),
    )
    try:
        with pytest.raises(RuntimeError), direct.begin() as transaction:
            transaction.execute(insert, {"uid": "1.2.3.1"})
            raise RuntimeError("the receive failed after its first write")
        with direct.begin() as transaction:
            transaction.execute(insert, {"uid": "1.2.3.2"})
    finally:
        direct.close()
    with engine.connect() as connection:
        uids = connection.scalars(sa.select(ForwardJob.sop_instance_uid)).all()
    assert uids == ["1.2.3.2"]


def test_an_expanding_in_runs_padded_and_in_runs_of_at_most_max_expanded(
    catalog: Catalog, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    servers = Server.__table__.c
    names = sa.select(servers.name).where(servers.id.in_(sa.bindparam("ids", expanding=True)))
    direct = DirectConnections(engine)
    try:
        with direct.begin() as transaction:
            ids = [row[0] for row in transaction.execute(sa.select(servers.id).order_by(servers.name), {})]
            assert sorted(transaction.execute(names, {"ids": ids})) == [("pacs1",), ("pacs2",), ("pacs3",)]  # as 4
            assert transaction.execute(names, {"ids": ids[1:2]}) == [("pacs2",)]
            assert transaction.execute(names, {"ids": []}) == []
            monkeypatch.setattr(catalog_direct, "MAX_EXPANDED", 2)
            assert sorted(transaction.execute(names, {"ids": ids})) == [("pacs1",), ("pacs2",), ("pacs3",)]  # 2 + 1
    finally:
        direct.close()


def test_acks_are_recorded_on_kept_connections_retried_when_the_catalog_is_locked(
    catalog: Catalog, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = ForwardQueue(catalog.sessions, "node", ForwardingConfig())
    header = {"SOPClassUID": CT, "TransferSyntaxUID": ExplicitVRLittleEndian, "StudyInstanceUID": "1.2.3",
              "SeriesInstanceUID": "1.2.3.4", "PatientID": "P1", "Modality": "CT"}
    new_jobs = [
        NewJob(f"1.2.3.4.{i}", f"/spool/{i}.dcm", f"{i}" * 64, 10, "pacs1", "MOD", "ROUTER", {**header, "SOPInstanceUID": f"1.2.3.4.{i}"})
        for i in range(3)
    ]
    direct = DirectConnections(engine)
    with direct.begin() as transaction:
        jobs = queue.enqueue(transaction, new_jobs, claim_for={"pacs1"})
    direct.close()
    locked = iter([sqlite3.OperationalError("database is locked")])  # what psycopg's deadlock is retried as too

    def record_stored_once_locked(*args) -> None:
        for error in locked:
            raise error
        record_stored(*args)

    monkeypatch.setattr(store_acks, "record_stored", record_stored_once_locked)
    through_engine: list[str] = []

    def count(_connection, _cursor, statement, *_args) -> None:
        through_engine.append(statement)

    record_acks = AckRecorder(catalog, queue)
    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        paths = record_acks(shared.make_config(["pacs1"]).servers[0], jobs)
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
        record_acks.close()
    assert through_engine == [], "the ack writer's transaction runs on its own connection"
    assert paths == [f"/spool/{i}.dcm" for i in range(3)]
    assert catalog.instances_per_server("1.2.3") == {"pacs1": 3}
    assert [state for _, state, _, _ in job_rows(engine)] == ["done"] * 3


def encoded_instance() -> tuple[str, bytes]:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CT, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CT, ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "LOCKED", "CT"
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return ds.SOPInstanceUID, buffer.getvalue()


def receive_service(
    url: str, tmp_path: Path, handoff=None
) -> tuple[ReceiveService, sa.Engine, Caller, Spool]:
    """A receive service on the catalog at `url` (upgraded, servers synced), with routes to both test servers."""
    document = base_document()
    document["router"].update(catalog=url, spool=str(tmp_path / "spool"))
    document["routes"] = [{"name": "both", "match": {"Modality": "CT"}, "destinations": ["Test PACS 1", "Prod PACS 1"]}]
    document["clients"][0]["roles"] = ["test_write", "prod_write"]
    config = parse_config(document, tmp_path / "router.yaml")
    engine = make_engine(config.router.catalog)
    upgrade(engine)
    sessions = session_factory(engine)
    Catalog(sessions).sync_servers(config)
    spool = Spool(config.router.spool)
    queue = ForwardQueue(sessions, "node", ForwardingConfig())
    service = ReceiveService(lambda: config, spool, queue, sessions, notify=lambda _name: None, handoff=handoff)
    client = config.client("WORKSTATION")
    caller = Caller("WORKSTATION", "127.0.0.1", "client", client.roles, client=client)
    return service, engine, caller, spool


def job_rows(engine: sa.Engine) -> list[tuple]:
    table = ForwardJob.__table__.c
    with engine.connect() as connection:
        query = sa.select(table.destination, table.state, table.claimed_by, table.lease_until.is_not(None))
        return sorted(connection.execute(query.order_by(table.destination)).all())


def test_one_job_per_destination_claimed_on_insert_for_the_forwarder_once_committed(url: str, tmp_path: Path) -> None:
    given = []

    class Forwarder:  # store.receive.Handoff
        def take_direct(self, destination: str) -> bool:
            return destination == "Test PACS 1"

        def give(self, destination: str, jobs, claimed_at: float) -> None:
            given.append((destination, [job.sop_instance_uid for job in jobs], job_rows(engine)))

    service, engine, caller, _spool = receive_service(url, tmp_path, Forwarder())
    sop_uid, encoded = encoded_instance()
    try:
        result = service.receive(caller, "DICOMROUTER", sop_uid, encoded)
        assert (result.status, set(result.destinations)) == (SUCCESS, {"Test PACS 1", "Prod PACS 1"})
        jobs = [("Prod PACS 1", "pending", None, False), ("Test PACS 1", "claimed", "node", True)]
        assert given == [("Test PACS 1", [sop_uid], jobs)]  # handed over after the commit: visible to others
        again = service.receive(caller, "DICOMROUTER", sop_uid, encoded)  # the same bytes, jobs still open
        assert (again.status, again.destinations) == (SUCCESS, ())
        assert job_rows(engine) == jobs and len(given) == 1
    finally:
        service.close()
        engine.dispose()


def test_jobs_for_several_destinations_go_in_together(url: str, tmp_path: Path) -> None:
    """No destination taken straight away: one INSERT for them all (executemany)."""
    service, engine, caller, _spool = receive_service(url, tmp_path)
    sop_uid, encoded = encoded_instance()
    try:
        assert service.receive(caller, "DICOMROUTER", sop_uid, encoded).status == SUCCESS
        assert job_rows(engine) == [("Prod PACS 1", "pending", None, False), ("Test PACS 1", "pending", None, False)]
        # Due at once (timestamps written as the engine writes them), the header back as JSON.
        [job] = ForwardQueue(session_factory(engine), "node", ForwardingConfig()).claim("Test PACS 1", 5)
        assert (job.sop_instance_uid, job.header["SOPInstanceUID"], job.sop_class_uid) == (sop_uid, sop_uid, CT)
    finally:
        service.close()
        engine.dispose()


def test_a_locked_catalog_answers_out_of_resources_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite busy past its timeout: 0xA700 and the same log line as any catalog failure; then it recovers."""
    monkeypatch.setattr(catalog_sqlite, "SQLITE_BUSY_TIMEOUT_MS", 200)  # read as each connection is made
    database = tmp_path / "catalog.db"
    service, engine, caller, spool = receive_service(f"sqlite:///{database}", tmp_path)
    sop_uid, encoded = encoded_instance()
    blocker = sqlite3.connect(database, isolation_level=None)  # another writer, not queued on our lock
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with capture_logs() as logs:
            result = service.receive(caller, "DICOMROUTER", sop_uid, encoded)
        assert (result.status, result.comment) == (OUT_OF_RESOURCES, "cannot queue the instance: OperationalError")
        [refused] = [entry for entry in logs if entry["event"] == "store_refused"]
        assert refused["reason"] == "catalog unavailable" and refused["log_level"] == "error"
        assert list(Path(spool.objects).rglob("*.dcm")) == []
        blocker.rollback()
        assert service.receive(caller, "DICOMROUTER", sop_uid, encoded).status == SUCCESS
        assert len(job_rows(engine)) == 2
    finally:
        blocker.close()
        service.close()
        engine.dispose()
