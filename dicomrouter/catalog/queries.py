"""The catalog service: mirror servers, learn where studies live, answer where they are."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import delete, exists, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicomrouter.catalog import reads, writes
from dicomrouter.catalog.db import SQLITE_BEGIN, engine_of, read_plain, writer_of
from dicomrouter.catalog.models import (
    LEARNED_BY,
    AuditEvent,
    Instance,
    InstanceLocation,
    Server,
    utcnow,
)
from dicomrouter.catalog.plain import Reader, pause_before_retry, transient
from dicomrouter.catalog.reads import AuditRow, StudyLocationRow
from dicomrouter.catalog.statements import statements_of
from dicomrouter.catalog.upserts import (
    ServerSync,
    StoredInstance,
    UnknownServer,
    ensure_study,
    record_stored,
    required,
    server_id_of,
    sync_servers,
    touch_study_location,
)
from dicomrouter.catalog.values import modality_set
from dicomrouter.catalog.writes import audit_values
from dicomrouter.config import Config

__all__ = ["Catalog", "ServerSync", "StoredInstance", "StudyLocationRow", "UnknownServer", "audit_values"]

T = TypeVar("T")


class Catalog:
    """Catalog reads and writes, each in its own short transaction, safe across threads."""

    def __init__(self, sessions: sessionmaker[Session], attempts: int = 5):
        self.sessions = sessions
        self.attempts = attempts

    # ----------------------------------------------------------------- servers

    def sync_servers(self, config: Config) -> ServerSync:
        """Mirror config.servers by name; servers gone from the config stay, marked deleted."""
        return self._write(lambda session: sync_servers(session, config))

    def studies_per_server(self) -> dict[str, int]:
        """Number of studies known on every server in the catalog (0 included)."""
        return self.read_plain(reads.studies_per_server)

    # ----------------------------------------------------------------- studies

    def where_study(self, study_uid: str) -> list[StudyLocationRow]:
        """The servers known to hold the study, first learned first (deleted ones included)."""
        return self.read_plain(lambda reader: reads.study_location_rows(reader, study_uid))

    def instances_per_server(self, study_uid: str) -> dict[str, int]:
        """How many instances of the study each server acknowledged (servers that hold none left out)."""
        return self.read_plain(lambda reader: reads.instance_counts(reader, study_uid))

    def record_study_seen(
        self,
        server_name: str,
        study_uid: str,
        learned_by: str,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Note that a server holds a study (C-FIND answer, C-MOVE); attrs as in a C-FIND."""
        self.record_studies_seen(
            server_name, learned_by, [{**(attrs or {}), "StudyInstanceUID": study_uid}]
        )

    def record_studies_seen(
        self, server_name: str, learned_by: str, studies: Iterable[Mapping[str, Any]]
    ) -> None:
        """record_study_seen for many studies (e.g. one C-FIND answer) in one transaction."""
        if learned_by not in LEARNED_BY:
            raise ValueError(f"learned_by={learned_by!r}; use one of {', '.join(LEARNED_BY)}")
        rows = sorted(studies, key=lambda attrs: required(attrs, "StudyInstanceUID"))

        def work(session: Session) -> None:
            statements = statements_of(session)
            server_id = server_id_of(statements, server_name)
            now = utcnow()
            for attrs in rows:
                study_id = ensure_study(
                    statements, attrs, modality_set(attrs.get("ModalitiesInStudy"))
                )
                touch_study_location(statements, study_id, server_id, learned_by, now)

        self._write(work)

    # ----------------------------------------------------------------- instances

    def record_instance_stored(
        self,
        server_name: str,
        attrs: Mapping[str, Any],
        sop_class_uid: str | None,
        transfer_syntax_uid: str | None,
        size: int | None,
        sha256: str | None,
    ) -> None:
        """Record that `server_name` acknowledged an instance; idempotent."""
        item = StoredInstance(attrs, sop_class_uid, transfer_syntax_uid, size, sha256)
        self.record_instances_stored(server_name, [item])

    def record_instances_stored(self, server_name: str, items: Iterable[StoredInstance]) -> None:
        """record_instance_stored for many instances on one server, in one transaction."""
        # One order for every writer, so concurrent batches lock rows in the same order.
        ordered = sorted(
            items,
            key=lambda i: (
                required(i.attrs, "StudyInstanceUID"),
                required(i.attrs, "SeriesInstanceUID"),
                required(i.attrs, "SOPInstanceUID"),
            ),
        )
        if not ordered:
            return
        self._write(lambda session: record_stored(session, server_name, ordered))

    def server_has_instance(self, server_name: str, sop_instance_uid: str) -> bool:
        """True when `server_name` acknowledged the instance (no need to send it again)."""

        def work(session: Session) -> bool:
            query = select(
                exists()
                .where(InstanceLocation.instance_id == Instance.id)
                .where(InstanceLocation.server_id == Server.id)
                .where(Instance.sop_instance_uid == sop_instance_uid)
                .where(Server.name == server_name)
            )
            return bool(session.scalar(query))

        return self._read(work)

    # ----------------------------------------------------------------- audit

    def add_audit(self, operation: str, outcome: str, **fields: Any) -> int:
        """Append one audit event (fields as `audit_values` takes them) and return its id."""
        values = audit_values(operation, outcome, **fields)
        return self._write(lambda connection: writes.add_audit(writer_of(connection), values), core=True)

    def add_audit_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append many audit events (each as `audit_values` makes them) in one transaction."""
        if rows:
            self._write(lambda connection: writes.add_audit_rows(writer_of(connection), rows), core=True)

    def prune_audit(self, before: datetime, batch: int = 5000) -> int:
        """Delete audit rows older than `before`, `batch` per transaction; returns how many."""

        def work(session: Session) -> int:
            ids = list(session.scalars(select(AuditEvent.id).where(AuditEvent.at < before).limit(batch)))
            if ids:
                session.execute(delete(AuditEvent).where(AuditEvent.id.in_(ids)))
            return len(ids)

        deleted = 0
        while True:
            count = self._write(work)
            deleted += count
            if count < batch:
                return deleted

    def audit_events(self, **filters: Any) -> list[AuditRow]:
        """The newest audit events matching every filter given, oldest first: reads.audit_events's
        filters (since, calling_ae, study_uid, operation) and limit."""
        return self.read_plain(lambda reader: reads.audit_events(reader, **filters))

    # ----------------------------------------------------------------- transactions

    def write(self, work: Callable[[Session], T]) -> T:
        """Run `work` in one write transaction (retried on deadlock); for services joining writes."""
        return self._write(work)

    def _write(self, work: Callable[[Any], T], core: bool = False) -> T:
        """Run `work` in a transaction, retrying deadlocks and lock timeouts."""
        for attempt in range(1, self.attempts + 1):
            try:
                if core:
                    with engine_of(self.sessions).begin() as connection:
                        return work(connection)
                with self.sessions.begin() as session:
                    return work(session)
            except OperationalError as exc:
                if attempt == self.attempts or not _transient(exc):
                    raise
                pause_before_retry(attempt)
        raise AssertionError("unreachable")

    def read(self, work: Callable[[Session], T]) -> T:
        """Run read-only `work` in one transaction: several queries, one snapshot, one round of connecting."""
        return self._read(work)

    def read_plain(self, work: Callable[[Reader], T]) -> T:
        """Run plain-SQL read `work` (catalog/reads.py, store/queue_report.py) in one transaction."""
        return read_plain(self.sessions, work)

    def _read(self, work: Callable[[Session], T]) -> T:
        """Run read-only `work`; on SQLite it does not take the write lock."""
        with self.sessions() as session:
            session.connection(execution_options={SQLITE_BEGIN: "DEFERRED"})
            return work(session)


# --------------------------------------------------------------------- helpers


def _transient(exc: OperationalError) -> bool:
    """A deadlock, serialization failure or busy SQLite: worth running the transaction again."""
    return transient(exc.orig)
