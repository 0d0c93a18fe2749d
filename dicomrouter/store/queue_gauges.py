"""The forwarding queue at a glance, read when Prometheus scrapes: one grouped query, no write lock."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomrouter.catalog.db import SQLITE_BEGIN, engine_of
from dicomrouter.catalog.models import ForwardDestination, ForwardJob
from dicomrouter.store.queue import CLAIMED, DEAD, PENDING

_jobs = ForwardJob.__table__.c
_OPEN_STATES = (PENDING, CLAIMED, DEAD)
_BY_DESTINATION = (
    select(_jobs.destination, _jobs.state, func.count(), func.min(_jobs.created_at))
    .where(_jobs.state.in_(_OPEN_STATES))
    .group_by(_jobs.destination, _jobs.state)
)
# A spool file may serve several destinations: count each file once.
_SPOOL_FILES = select(distinct(_jobs.spool_path).label("path"), _jobs.size_bytes).where(
    _jobs.state.in_(_OPEN_STATES)
)
_SUSPENDED = select(ForwardDestination.destination).where(
    ForwardDestination.suspended_at.is_not(None)
)
_SPOOL_BYTES = select(func.coalesce(func.sum(_SPOOL_FILES.subquery().c.size_bytes), 0))


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


def read_queue_gauges(sessions: sessionmaker[Session]) -> QueueGauges:
    """Jobs per destination and state, the oldest waiting job of each, the spool bytes they hold, suspensions."""
    gauges = QueueGauges()
    with engine_of(sessions).connect() as connection:
        connection = connection.execution_options(**{SQLITE_BEGIN: "DEFERRED"})
        for destination, state, count, oldest in connection.execute(_BY_DESTINATION):
            gauges.jobs[(destination, state)] = count
            if state != DEAD and oldest is not None:
                oldest = _aware(oldest)
                known = gauges.oldest_waiting.get(destination)
                gauges.oldest_waiting[destination] = min(known, oldest) if known else oldest
        gauges.spool_bytes = int(connection.execute(_SPOOL_BYTES).scalar() or 0)
        gauges.suspended = set(connection.execute(_SUSPENDED).scalars())
    return gauges
