"""No statement of the C-STORE path, of `catalog where` or of the pruner reads a table whole.

A catalog holds a million instances and as many finished jobs after a busy week: a statement
that scans any of its tables costs time that grows with it. SQLite plans without statistics
(a router never runs ANALYZE) as it would for a large table, so an empty catalog shows the plans.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.direct import DirectConnections
from dicomrouter.catalog.models import Base, utcnow
from dicomrouter.catalog.queries import Catalog, audit_values
from dicomrouter.catalog.reads import audit_events, commitment_requests
from dicomrouter.catalog.schema import upgrade
from dicomrouter.config import ForwardingConfig, parse_config
from dicomrouter.store.acks import AckRecorder
from dicomrouter.store.queue import ForwardQueue, NewJob
from dicomrouter.store.queue_gauges import QueueGaugeReader
from dicomrouter.store.queue_report import destination_backlogs, instance_jobs, study_backlogs
from dicomrouter.store.receive import delivered_copies
from tests.support.configs import base_document

# Tables that grow with what the router has seen (servers and forward_destinations stay small).
GROWING = sorted(
    set(Base.metadata.tables) - {"servers", "forward_destinations", "destination_capabilities"}
)
FULL_SCAN = re.compile(rf"\bSCAN ({'|'.join(GROWING)})\b")
# The history is the finished jobs: an index search by state alone, for states that include
# 'done', reads all of it.
BY_STATE_ONLY = re.compile(r"\bSEARCH forward_jobs USING (COVERING )?INDEX \w+ \(state=\?\)")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'catalog.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@contextmanager
def traced(engine: sa.Engine) -> Iterator[list[str]]:
    """Every statement SQLite runs on the engine's connections, as run (parameters in), whether
    through the engine or on a DB-API connection taken from it (catalog.direct)."""
    seen: list[str] = []

    def trace(dbapi_connection, _record) -> None:
        dbapi_connection.set_trace_callback(seen.append)

    engine.dispose()  # connections made from now on are traced
    sa.event.listen(engine, "connect", trace)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "connect", trace)
        engine.dispose()


def statements_of(engine: sa.Engine) -> list[str]:
    """The statements the store path, `catalog where` and the pruner run."""
    sessions = session_factory(engine)
    catalog = Catalog(sessions)
    servers = [
        {
            "name": "pacs1",
            "ae_title": "PACS1",
            "host": "127.0.0.1",
            "port": 4242,
            "environment": "test",
            "active": True,
            "primary": True,
            "deleted": False,
        }
    ]
    config = parse_config(base_document(servers=servers), Path("router.yaml"))
    catalog.sync_servers(config)
    queue = ForwardQueue(sessions, "node", ForwardingConfig())
    header = {
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "TransferSyntaxUID": "1.2.840.10008.1.2.1",
        "StudyInstanceUID": "1.2.3",
        "SeriesInstanceUID": "1.2.3.4",
        "SOPInstanceUID": "1.2.3.4.5",
        "PatientID": "P1",
        "Modality": "CT",
    }
    direct = DirectConnections(engine)
    with traced(engine) as seen:
        with direct.begin() as transaction:  # the receive transaction
            delivered_copies(transaction, "1.2.3.4.5")
            queue.destinations_with_open_jobs(transaction, "ab" * 32, ["pacs1"])
            queue.enqueue(
                transaction,
                [
                    NewJob(
                        "1.2.3.4.5", "/spool/a.dcm", "ab" * 32, 10, "pacs1", "MOD", "ROUTER", header
                    )
                ],
            )
        jobs = queue.claim("pacs1", 16)
        assert jobs
        record_acks = AckRecorder(catalog, queue)  # what the ack writer runs per batch
        record_acks(config.servers[0], jobs)
        record_acks.close()
        catalog.record_instance_stored(  # the importer's and the learners' path, through a Session
            "pacs1", {**header, "SOPInstanceUID": "1.2.3.4.6"}, header["SOPClassUID"], None, 10, None
        )
        catalog.add_audit_rows(
            [audit_values("store", "success", calling_ae="MOD", study_uid="1.2.3")]
        )
        queue.open_count("pacs1")
        queue.destinations_with_work()  # what Forwarder.wait_until_idle polls
        QueueGaugeReader(sessions).read()
        catalog.where_study("1.2.3")
        catalog.instances_per_server("1.2.3")
        catalog.read_plain(lambda reader: study_backlogs(reader, study_uid="1.2.3"))
        # `queue list` (but its summary counts every job by state), `audit`, `commitments list`
        catalog.read_plain(destination_backlogs)
        catalog.read_plain(lambda reader: instance_jobs(reader, dead=True, study_uid="1.2.3"))
        catalog.read_plain(lambda reader: audit_events(reader, since=utcnow(), study_uid="1.2.3"))
        catalog.read_plain(lambda reader: commitment_requests(reader, pending_only=True))
        queue.prune_done(timedelta(days=7))
        catalog.prune_audit(utcnow() - timedelta(days=30))
    direct.close()
    return seen


def test_no_statement_scans_a_growing_table(engine: sa.Engine) -> None:
    scans = []
    statements = statements_of(engine)
    assert any("INSERT INTO forward_jobs" in statement for statement in statements)  # the store path was traced
    for statement in statements:
        if (
            not statement.lstrip()
            .upper()
            .startswith(("SELECT", "UPDATE", "DELETE", "INSERT", "WITH"))
        ):
            continue
        with engine.connect() as connection:
            cursor = connection.connection.driver_connection.cursor()
            plan = [row[-1] for row in cursor.execute(f"EXPLAIN QUERY PLAN {statement}")]
        reads_history = "'done'" in statement
        if any(
            FULL_SCAN.search(step) or (reads_history and BY_STATE_ONLY.search(step))
            for step in plan
        ):
            scans.append(f"{' '.join(statement.split())[:200]}\n    " + "\n    ".join(plan))
    assert not scans, "statements that read a whole table:\n" + "\n".join(scans)


def test_the_duplicate_check_of_each_store_reads_open_jobs_by_content(engine: sa.Engine) -> None:
    """Not every open job of the destination (a backlog of thousands during an outage)."""
    queue = ForwardQueue(session_factory(engine), "node", ForwardingConfig())
    direct = DirectConnections(engine)
    with traced(engine) as seen, direct.begin() as transaction:
        queue.destinations_with_open_jobs(transaction, "ab" * 32, ["pacs1"])
        queue.destinations_with_open_jobs(transaction, "ab" * 32, ["pacs1", "pacs2"])
    direct.close()
    selects = [statement for statement in seen if statement.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 3  # one per destination
    with engine.connect() as connection:
        cursor = connection.connection.driver_connection.cursor()
        for statement in selects:
            plan = " ".join(row[-1] for row in cursor.execute(f"EXPLAIN QUERY PLAN {statement}"))
            assert "ix_forward_jobs_open_sha256" in plan, plan
