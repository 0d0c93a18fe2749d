"""What an admin does to the queue: suspend and resume a destination, reroute its jobs elsewhere."""

from __future__ import annotations

import threading
import time
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomrouter.catalog.db import SQLITE_BEGIN
from dicomrouter.catalog.models import ForwardDestination, ForwardJob, utcnow
from dicomrouter.store.queue import DEAD, PENDING

_destinations = ForwardDestination.__table__
_d = _destinations.c


class Suspensions:
    """Destinations in maintenance, kept in the catalog so the CLI and every router node agree."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions
        self._cache: dict[str, datetime] = {}
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def suspend(self, destination: str, by: str) -> bool:
        """Suspend; False when it already was."""
        now = utcnow()
        with self.sessions.begin() as session:
            changed = session.execute(
                update(_destinations)
                .where(_d.destination == destination, _d.suspended_at.is_(None))
                .values(suspended_at=now, suspended_by=by, updated_at=now)
            ).rowcount
            if changed:
                return True
            if session.scalar(select(_d.id).where(_d.destination == destination)) is not None:
                return False
            try:
                with session.begin_nested():
                    session.execute(
                        insert(_destinations).values(
                            destination=destination,
                            failed_connects=0,
                            suspended_at=now,
                            suspended_by=by,
                            updated_at=now,
                        )
                    )
            except IntegrityError:  # another process added the row meanwhile: try again
                return self.suspend(destination, by)
        return True

    def resume(self, destination: str) -> bool:
        """Resume; False when it was not suspended."""
        with self.sessions.begin() as session:
            return bool(
                session.execute(
                    update(_destinations)
                    .where(_d.destination == destination, _d.suspended_at.is_not(None))
                    .values(suspended_at=None, suspended_by=None, updated_at=utcnow())
                ).rowcount
            )

    def all(self) -> dict[str, tuple[datetime, str | None]]:
        """Every suspended destination: since when, and by whom."""
        with self.sessions() as session:
            session.connection(execution_options={SQLITE_BEGIN: "DEFERRED"})
            rows = session.execute(
                select(_d.destination, _d.suspended_at, _d.suspended_by).where(
                    _d.suspended_at.is_not(None)
                )
            ).all()
        return {name: (at, by) for name, at, by in rows}

    def is_suspended(self, destination: str, max_age_s: float) -> bool:
        """From a copy read at most `max_age_s` ago: one query per interval for all the lanes together."""
        with self._lock:
            if time.monotonic() - self._read_at > max_age_s:
                try:
                    self._cache = {name: at for name, (at, _by) in self.all().items()}
                except Exception:  # the catalog is down: keep what we knew (claims fail anyway)
                    pass
                self._read_at = time.monotonic()
            return destination in self._cache


def reroute(sessions: sessionmaker[Session], source: str, target: str, dead: bool) -> int:
    """Give `target` the jobs waiting for `source` (and its dead letters with `dead`); returns how many.

    Jobs being sent right now stay with `source`. A rerouted job starts afresh: attempts 0, due now.
    """
    states = (PENDING, DEAD) if dead else (PENDING,)
    now = utcnow()
    with sessions.begin() as session:
        return (
            session.execute(
                update(ForwardJob)
                .where(ForwardJob.destination == source, ForwardJob.state.in_(states))
                .values(
                    destination=target,
                    state=PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    lease_until=None,
                    claimed_by=None,
                    last_error=f"rerouted from {source}",
                    last_status=None,
                    updated_at=now,
                )
            ).rowcount
            or 0
        )
