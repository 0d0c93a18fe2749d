"""The forwarding queue at a glance, read when Prometheus scrapes, without SQLite's write lock.

A scrape every second must cost next to nothing even with a large backlog: the counts come from
the (state, destination, ...) index alone; the oldest waiting job of each destination is its
lowest id (ids grow with time), looked up by primary key. The bytes still held in the spool need
the rows themselves, so they are summed at most every `SPOOL_BYTES_MAX_AGE_S`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomrouter.catalog.db import SQLITE_BEGIN, engine_of
from dicomrouter.catalog.models import ForwardDestination, ForwardJob
from dicomrouter.store.queue import CLAIMED, DEAD, PENDING

SPOOL_BYTES_MAX_AGE_S = 30.0

_jobs = ForwardJob.__table__.c
_OPEN_STATES = (PENDING, CLAIMED, DEAD)
_BY_DESTINATION = (
    select(_jobs.destination, _jobs.state, func.count(), func.min(_jobs.id))
    .where(_jobs.state.in_(_OPEN_STATES))
    .group_by(_jobs.destination, _jobs.state)
)
_SUSPENDED = select(ForwardDestination.destination).where(
    ForwardDestination.suspended_at.is_not(None)
)
# A spool file may serve several destinations: count each file once.
_SPOOL_FILES = (
    select(_jobs.spool_path, _jobs.size_bytes)
    .where(_jobs.state.in_(_OPEN_STATES))
    .distinct()
    .subquery()
)
_SPOOL_BYTES = select(func.coalesce(func.sum(_SPOOL_FILES.c.size_bytes), 0))


@dataclass
class QueueGauges:
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (destination, state) -> jobs
    oldest_waiting: dict[str, datetime] = field(default_factory=dict)  # pending or claimed
    spool_bytes: int = 0  # bytes of the spool files open or dead jobs still need
    suspended: set[str] = field(default_factory=set)

    def destinations(self) -> set[str]:
        return {destination for destination, _ in self.jobs}


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class QueueGaugeReader:
    """Reads QueueGauges; keeps the spool byte sum between its refreshes."""

    def __init__(
        self, sessions: sessionmaker[Session], spool_bytes_max_age_s: float = SPOOL_BYTES_MAX_AGE_S
    ):
        self.sessions = sessions
        self.spool_bytes_max_age_s = spool_bytes_max_age_s
        self._spool_bytes = 0
        self._spool_bytes_at = float("-inf")
        self._lock = threading.Lock()

    def read(self) -> QueueGauges:
        gauges = QueueGauges()
        with engine_of(self.sessions).connect() as connection:
            connection = connection.execution_options(**{SQLITE_BEGIN: "DEFERRED"})
            first_ids: dict[int, str] = {}
            for destination, state, count, first_id in connection.execute(_BY_DESTINATION):
                gauges.jobs[(destination, state)] = count
                if state != DEAD and first_id is not None:
                    first_ids[first_id] = destination
            if first_ids:
                rows = connection.execute(
                    select(_jobs.id, _jobs.created_at).where(_jobs.id.in_(list(first_ids)))
                )
                for job_id, created_at in rows:
                    destination = first_ids[job_id]
                    created_at = _aware(created_at)
                    known = gauges.oldest_waiting.get(destination)
                    gauges.oldest_waiting[destination] = (
                        min(known, created_at) if known else created_at
                    )
            gauges.suspended = set(connection.execute(_SUSPENDED).scalars())
            gauges.spool_bytes = self._read_spool_bytes(connection)
        return gauges

    def _read_spool_bytes(self, connection: Connection) -> int:
        with self._lock:
            if time.monotonic() - self._spool_bytes_at >= self.spool_bytes_max_age_s:
                self._spool_bytes = int(connection.execute(_SPOOL_BYTES).scalar() or 0)
                self._spool_bytes_at = time.monotonic()
            return self._spool_bytes
