"""What the forwarding queue holds, summed per destination and per study, for `queue list` and `catalog where`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomrouter.catalog.db import SQLITE_BEGIN
from dicomrouter.catalog.models import ForwardDestination, ForwardJob
from dicomrouter.store.queue import CLAIMED, DEAD, DONE, PENDING


@dataclass
class DestinationBacklog:
    """One destination's part of the queue: what waits, since when, and why."""

    destination: str
    pending: int = 0  # waiting (not yet sent, or to be retried)
    sending: int = 0  # claimed by a node, in flight
    dead: int = 0
    oldest: datetime | None = None  # when the oldest job still waiting was queued
    next_attempt: datetime | None = None  # the earliest time a waiting job is due
    unreachable_since: datetime | None = None
    failed_connects: int = 0  # in the current outage
    last_error: str | None = None
    suspended_at: datetime | None = None  # in maintenance (`queue suspend`) since
    suspended_by: str | None = None

    @property
    def waiting(self) -> int:
        return self.pending + self.sending

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("oldest", "next_attempt", "unreachable_since", "suspended_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


@dataclass
class StudyBacklog:
    """One study's jobs for one destination."""

    destination: str
    study_uid: str | None
    pending: int = 0
    sending: int = 0
    dead: int = 0
    done: int = 0
    oldest: datetime | None = None  # the oldest job not yet delivered (pending, sending or dead)
    last_error: str | None = None

    @property
    def waiting(self) -> int:
        return self.pending + self.sending

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["oldest"] = self.oldest.isoformat() if self.oldest else None
        return data


def _read(sessions: sessionmaker[Session]) -> Session:
    session = sessions()
    session.connection(execution_options={SQLITE_BEGIN: "DEFERRED"})
    return session


def _older(a: datetime | None, b: datetime | None) -> datetime | None:
    return min((x for x in (a, b) if x is not None), default=None)


def destination_backlogs(sessions: sessionmaker[Session]) -> list[DestinationBacklog]:
    """Every destination with jobs not delivered, or an outage on record, by name."""
    with _read(sessions) as session:
        rows = session.execute(
            select(
                ForwardJob.destination,
                ForwardJob.state,
                func.count(),
                func.min(ForwardJob.created_at),
                func.min(ForwardJob.next_attempt_at),
            )
            .where(ForwardJob.state.in_((PENDING, CLAIMED, DEAD)))
            .group_by(ForwardJob.destination, ForwardJob.state)
        ).all()
        outages = {row.destination: row for row in session.scalars(select(ForwardDestination))}
        backlogs: dict[str, DestinationBacklog] = {}
        for destination, state, count, oldest, next_attempt in rows:
            backlog = backlogs.setdefault(destination, DestinationBacklog(destination))
            if state == DEAD:
                backlog.dead = count
                continue
            if state == PENDING:
                backlog.pending = count
                backlog.next_attempt = next_attempt
            else:
                backlog.sending = count
            backlog.oldest = _older(backlog.oldest, oldest)
        for name, outage in outages.items():
            if outage.unreachable_since is not None:
                backlog = backlogs.setdefault(name, DestinationBacklog(name))
                backlog.unreachable_since = outage.unreachable_since
                backlog.failed_connects = outage.failed_connects
                backlog.last_error = outage.last_error
                # The lane's own next try (the jobs' times are only when each may go again).
                backlog.next_attempt = outage.next_attempt_at or backlog.next_attempt
            if outage.suspended_at is not None:
                backlog = backlogs.setdefault(name, DestinationBacklog(name))
                backlog.suspended_at = outage.suspended_at
                backlog.suspended_by = outage.suspended_by
        for backlog in backlogs.values():
            if backlog.last_error is None:
                states = (PENDING, CLAIMED) if backlog.waiting else (DEAD,)
                backlog.last_error = session.scalar(
                    select(ForwardJob.last_error)
                    .where(
                        ForwardJob.destination == backlog.destination,
                        ForwardJob.state.in_(states),
                        ForwardJob.last_error.is_not(None),
                    )
                    .order_by(ForwardJob.updated_at.desc())
                    .limit(1)
                )
    return sorted(backlogs.values(), key=lambda b: b.destination)


def study_backlogs(
    sessions: sessionmaker[Session], study_uid: str | None = None, limit: int = 200
) -> list[StudyBacklog]:
    """Per (destination, study): jobs waiting or dead, oldest first; with `study_uid`, that study's jobs in every state."""
    with _read(sessions) as session:
        return study_backlogs_in(session, study_uid, limit)


def study_backlogs_in(session: Session, study_uid: str | None = None, limit: int = 200) -> list[StudyBacklog]:
    """study_backlogs inside the caller's transaction."""
    states = (PENDING, CLAIMED, DEAD) + ((DONE,) if study_uid else ())
    query = (
        select(
            ForwardJob.destination,
            ForwardJob.study_uid,
            ForwardJob.state,
            func.count(),
            func.min(ForwardJob.created_at),
            func.max(ForwardJob.last_error),
        )
        .where(ForwardJob.state.in_(states))
        .group_by(ForwardJob.destination, ForwardJob.study_uid, ForwardJob.state)
    )
    if study_uid:
        query = query.where(ForwardJob.study_uid == study_uid)
    rows = session.execute(query).all()
    backlogs: dict[tuple[str, str | None], StudyBacklog] = {}
    for destination, study, state, count, oldest, last_error in rows:
        backlog = backlogs.setdefault((destination, study), StudyBacklog(destination, study))
        field_name = {PENDING: "pending", CLAIMED: "sending", DEAD: "dead", DONE: "done"}[state]
        setattr(backlog, field_name, count)
        if state != DONE:
            backlog.oldest = _older(backlog.oldest, oldest)
            backlog.last_error = backlog.last_error or last_error
    ordered = sorted(
        backlogs.values(), key=lambda b: (b.oldest is None, b.oldest or datetime.max, b.destination)
    )
    return ordered[:limit]


def instance_jobs(
    sessions: sessionmaker[Session], dead: bool, study_uid: str | None = None, limit: int = 200
) -> list[ForwardJob]:
    """The jobs themselves, one per instance and destination (waiting, or dead), oldest first."""
    states = (DEAD,) if dead else (PENDING, CLAIMED)
    query = (
        select(ForwardJob).where(ForwardJob.state.in_(states)).order_by(ForwardJob.id).limit(limit)
    )
    if study_uid:
        query = query.where(ForwardJob.study_uid == study_uid)
    with _read(sessions) as session:
        jobs = list(session.scalars(query))
        session.expunge_all()
    return jobs
