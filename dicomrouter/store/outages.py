"""Since when each destination has been unreachable, kept in the catalog for the CLI and restarts."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomrouter.catalog.db import SQLITE_BEGIN
from dicomrouter.catalog.models import ForwardDestination, utcnow

_table = ForwardDestination.__table__
_c = _table.c


class OutageBook:
    """Reads and writes forward_destinations; each call is one short transaction."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def note_unreachable(self, destination: str, error: str, next_attempt_at: datetime) -> datetime:
        """Count a failed connection; returns since when the destination has been unreachable."""
        now = utcnow()
        values = {
            "failed_connects": _c.failed_connects + 1,
            "last_error": error[:2000],
            "last_failure_at": now,
            "next_attempt_at": next_attempt_at,
            "updated_at": now,
        }
        for _ in range(2):  # a second node may insert the row between our update and insert
            with self.sessions.begin() as session:
                session.execute(
                    update(_table)
                    .where(_c.destination == destination, _c.unreachable_since.is_(None))
                    .values(unreachable_since=now, failed_connects=0)
                )
                changed = session.execute(
                    update(_table).where(_c.destination == destination).values(**values)
                ).rowcount
                if not changed:
                    try:
                        with session.begin_nested():
                            session.execute(
                                insert(_table).values(
                                    destination=destination,
                                    unreachable_since=now,
                                    failed_connects=1,
                                    last_error=error[:2000],
                                    last_failure_at=now,
                                    next_attempt_at=next_attempt_at,
                                    updated_at=now,
                                )
                            )
                    except IntegrityError:
                        continue
                since = session.scalar(
                    select(_c.unreachable_since).where(_c.destination == destination)
                )
            return since or now
        return now

    def note_reachable(self, destination: str) -> datetime | None:
        """The destination answered: end its outage; returns when the outage began (None: there was none)."""
        now = utcnow()
        with self.sessions.begin() as session:
            since = session.scalar(
                select(_c.unreachable_since).where(_c.destination == destination)
            )
            if since is None:
                return None
            session.execute(
                update(_table)
                .where(_c.destination == destination)
                .values(
                    unreachable_since=None, next_attempt_at=None, recovered_at=now, updated_at=now
                )
            )
        return since

    def unreachable_since(self, destination: str) -> datetime | None:
        with self.sessions() as session:
            session.connection(execution_options={SQLITE_BEGIN: "DEFERRED"})
            return session.scalar(select(_c.unreachable_since).where(_c.destination == destination))

    def all(self) -> dict[str, ForwardDestination]:
        """Every destination's row, by name."""
        with self.sessions() as session:
            session.connection(execution_options={SQLITE_BEGIN: "DEFERRED"})
            rows = list(session.scalars(select(ForwardDestination)))
            session.expunge_all()
        return {row.destination: row for row in rows}
