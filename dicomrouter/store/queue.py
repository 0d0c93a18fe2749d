"""The forwarding queue in the catalog: one job per (instance, destination), atomic claims."""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from dicomrouter.catalog.db import SQLITE_BEGIN, engine_of, read_plain, write_plain
from dicomrouter.catalog.direct import DirectTransaction
from dicomrouter.catalog.models import ForwardJob
from dicomrouter.catalog.statements import Statements, statements_of
from dicomrouter.catalog.states import CLAIMED, DEAD, DONE, PENDING
from dicomrouter.config import ForwardingConfig
from dicomrouter.store import queue_actions
from dicomrouter.store.queue_report import job_counts

# Statements on the C-STORE path, run on a DB-API connection (catalog.direct) with their SQL compiled once.
_NEW_JOB_COLUMNS = (
    "sop_instance_uid", "spool_path", "sha256", "size_bytes", "destination", "state", "attempts",
    "next_attempt_at", "created_at", "updated_at", "calling_ae", "called_ae", "header", "study_uid",
    "claimed_by", "lease_until",
)
_INSERT_JOB = insert(ForwardJob.__table__).values({name: bindparam(name) for name in _NEW_JOB_COLUMNS})
_INSERT_JOB_RETURNING_ID = _INSERT_JOB.returning(ForwardJob.__table__.c.id)
# One destination per statement: no expanding IN, whose SQL would be rendered per C-STORE. States as
# literals, so the partial index of open jobs by sha256 (migration 0009) serves it.
_OPEN_JOBS = select(ForwardJob.destination).where(
    ForwardJob.sha256 == bindparam("sha256"),
    ForwardJob.destination == bindparam("destination"),
    ForwardJob.state.in_([literal_column(f"'{PENDING}'"), literal_column(f"'{CLAIMED}'")]),
)
_jobs = ForwardJob.__table__.c
_DUE = or_(
    and_(_jobs.state == PENDING, _jobs.next_attempt_at <= bindparam("now")),
    and_(_jobs.state == CLAIMED, _jobs.lease_until < bindparam("now")),
)
_CLAIM_CANDIDATES = (
    select(_jobs.id)
    .where(_jobs.destination == bindparam("destination"), _DUE)
    .order_by(_jobs.id)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)
_CLAIM = (
    update(ForwardJob.__table__)
    .where(_jobs.id.in_(bindparam("ids", expanding=True)), _DUE)
    .values(state=CLAIMED, claimed_by=bindparam("node"), lease_until=bindparam("new_lease"), updated_at=bindparam("now"))
    .returning(
        _jobs.id,
        _jobs.sop_instance_uid,
        _jobs.spool_path,
        _jobs.sha256,
        _jobs.size_bytes,
        _jobs.destination,
        _jobs.attempts,
        _jobs.header,
    )
)
_COMPLETE = (
    update(ForwardJob.__table__)
    .where(_jobs.id.in_(bindparam("ids", expanding=True)), _jobs.claimed_by == bindparam("node"))
    .values(state=DONE, lease_until=None, updated_at=bindparam("now"), last_error=None)
)
# `state = 'done'` spelled out, not bound: only then do SQLite and PostgreSQL's generic plans see
# that the partial index ix_forward_jobs_done_updated_at (finished jobs only) answers it.
_FINISHED = _jobs.state == literal_column(f"'{DONE}'")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class NewJob:
    sop_instance_uid: str
    spool_path: str
    sha256: str
    size_bytes: int
    destination: str
    calling_ae: str | None
    called_ae: str | None
    header: dict[str, Any]


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    sop_instance_uid: str
    spool_path: str
    sha256: str
    size_bytes: int
    destination: str
    attempts: int
    header: dict[str, Any]

    @property
    def sop_class_uid(self) -> str:
        return self.header["SOPClassUID"]

    @property
    def transfer_syntax_uid(self) -> str:
        return self.header["TransferSyntaxUID"]


def backoff_s(attempts: int, settings: ForwardingConfig, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter, never above the cap."""
    base = settings.retry_initial_s * settings.retry_multiplier ** max(0, attempts - 1)
    base = min(base, settings.retry_max_s)
    jitter = (rng or random).uniform(-settings.retry_jitter, settings.retry_jitter)
    return max(0.1, min(settings.retry_max_s, base * (1 + jitter)))


class ForwardQueue:
    """All reads and writes of forward_jobs; safe for several router processes on PostgreSQL."""

    def __init__(self, sessions: sessionmaker[Session], node_id: str, settings: ForwardingConfig):
        self.sessions = sessions
        self.node_id = node_id
        self.settings = settings

    # -- producing

    def enqueue(
        self, transaction: DirectTransaction, jobs: Sequence[NewJob], claim_for: Collection[str] = ()
    ) -> list[ClaimedJob]:
        """Add jobs inside the caller's transaction (committed together with the receive).

        Jobs for a destination in `claim_for` go in already claimed by this node, as `claim` would
        leave them, and come back as ClaimedJobs for the caller to hand to the forwarder once
        committed: no claim transaction for them. If this process dies first, their lease runs
        out and any node sends them, as with any claim.
        """
        if not jobs:
            return []
        now = utcnow()
        lease_until = now + timedelta(seconds=self.settings.lease_s)
        rows, claimed = [], []
        for job in jobs:
            row = {
                "sop_instance_uid": job.sop_instance_uid,
                "spool_path": job.spool_path,
                "sha256": job.sha256,
                "size_bytes": job.size_bytes,
                "destination": job.destination,
                "state": PENDING,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
                "updated_at": now,
                "calling_ae": job.calling_ae,
                "called_ae": job.called_ae,
                "header": job.header,
                "study_uid": job.header.get("StudyInstanceUID"),
                "claimed_by": None,
                "lease_until": None,
            }
            if job.destination in claim_for:
                row.update(state=CLAIMED, claimed_by=self.node_id, lease_until=lease_until)
                ((job_id,),) = transaction.execute(_INSERT_JOB_RETURNING_ID, row)
                claimed.append(
                    ClaimedJob(
                        job_id, job.sop_instance_uid, job.spool_path, job.sha256, job.size_bytes,
                        job.destination, 0, job.header,
                    )
                )
            else:
                rows.append(row)
        if rows:
            transaction.execute_many(_INSERT_JOB, rows)
        return claimed

    def destinations_with_open_jobs(
        self, transaction: DirectTransaction, sha256: str, destinations: Sequence[str]
    ) -> set[str]:
        """The destinations that already have a job queued for these exact bytes (not dead, not done)."""
        return {
            name
            for destination in destinations
            for (name,) in transaction.execute(_OPEN_JOBS, {"sha256": sha256, "destination": destination})
        }

    # -- consuming

    def claim(self, destination: str, limit: int) -> list[ClaimedJob]:
        """Take up to `limit` due jobs (or expired claims) for one destination; no job twice."""
        now = utcnow()
        with engine_of(self.sessions).begin() as session:  # Core: a claim runs for every few instances
            ids = list(session.scalars(_CLAIM_CANDIDATES, {"destination": destination, "now": now, "limit": limit}))
            if not ids:
                return []
            # The state condition again: on SQLite (no row locks) a racing claim changes 0 rows.
            claimed = session.execute(
                _CLAIM,
                {
                    "ids": ids,
                    "now": now,
                    "node": self.node_id,
                    "new_lease": now + timedelta(seconds=self.settings.lease_s),
                },
            ).all()
        jobs = [ClaimedJob(*row) for row in claimed]
        jobs.sort(key=lambda job: job.id)
        return jobs

    def complete(self, bind: Session | Connection | Statements, job_ids: Iterable[int]) -> None:
        """Mark this node's claims of `job_ids` done, in the caller's transaction."""
        ids = list(job_ids)
        if ids:
            statements_of(bind).execute(_COMPLETE, {"ids": ids, "node": self.node_id, "now": utcnow()})

    def unreferenced_paths(self, bind: Session | Connection | Statements, paths: Iterable[str]) -> list[str]:
        """Spool paths that no open or dead job needs any more (safe to delete), in the caller's transaction."""
        paths = list(paths)
        if not paths:
            return []
        return queue_actions.unreferenced_paths(statements_of(bind).reader(), paths)

    def fail(self, job: ClaimedJob, error: str, status: int | None, permanent: bool) -> str:
        """Count an attempt: retry later with backoff, or dead-letter. Returns the new state."""
        attempts = job.attempts + 1
        dead = permanent or attempts >= self.settings.max_attempts
        now = utcnow()
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_error": error[:2000],
            "last_status": status,
            "lease_until": None,
            "updated_at": now,
            "state": DEAD if dead else PENDING,
        }
        if not dead:
            values["next_attempt_at"] = now + timedelta(seconds=backoff_s(attempts, self.settings))
        with self.sessions.begin() as session:
            # Only our own claim: after its lease ran out another worker may own (or have finished) it.
            changed = session.execute(
                update(ForwardJob)
                .where(ForwardJob.id == job.id, ForwardJob.state == CLAIMED, ForwardJob.claimed_by == self.node_id)
                .values(**values)
            ).rowcount
        if not changed:
            return "lost-claim"
        return values["state"]

    def postpone(self, jobs: Sequence[ClaimedJob], delay_s: float, error: str) -> None:
        """Give claims back without counting an attempt (destination down before we tried them)."""
        if not jobs:
            return
        now = utcnow()
        with self.sessions.begin() as session:
            session.execute(
                update(ForwardJob)
                .where(
                    ForwardJob.id.in_([j.id for j in jobs]),
                    ForwardJob.state == CLAIMED,
                    ForwardJob.claimed_by == self.node_id,
                )
                .values(
                    state=PENDING,
                    lease_until=None,
                    next_attempt_at=now + timedelta(seconds=delay_s),
                    last_error=error[:2000],
                    updated_at=now,
                )
            )

    def release_claims(self) -> int:
        """On clean shutdown: give this node's claims back at once (a crash waits for the lease)."""
        with self.sessions.begin() as session:
            result = session.execute(
                update(ForwardJob)
                .where(ForwardJob.state == CLAIMED, ForwardJob.claimed_by == self.node_id)
                .values(state=PENDING, lease_until=None, updated_at=utcnow())
            )
            return result.rowcount or 0

    # -- inspection and admin

    def destinations_with_work(self) -> set[str]:
        with self.sessions() as session:
            return set(
                session.scalars(
                    select(ForwardJob.destination).where(ForwardJob.state.in_((PENDING, CLAIMED))).distinct()
                )
            )

    def open_count(self, destination: str) -> int:
        """Jobs for `destination` not yet delivered nor dead (pending, or claimed and in flight)."""
        with self.sessions() as session:
            session.connection(execution_options={SQLITE_BEGIN: "DEFERRED"})
            return session.scalar(
                select(func.count()).where(ForwardJob.destination == destination, ForwardJob.state.in_((PENDING, CLAIMED)))
            ) or 0

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state (as `queue list` shows them)."""
        return read_plain(self.sessions, job_counts)

    def retry(self, job_id: int | None = None, all_dead: bool = False) -> int:
        """Put dead (or waiting) jobs back to pending now, attempts reset."""
        return write_plain(self.sessions, lambda writer: queue_actions.retry(writer, job_id, all_dead))

    def purge_dead(self) -> list[str]:
        """Delete dead jobs; returns their spool paths that no other job needs (the caller deletes the files)."""
        return write_plain(self.sessions, queue_actions.purge_dead)

    def prune_done(self, older_than: timedelta, batch: int = 5000) -> int:
        """Delete jobs finished more than `older_than` ago, `batch` per transaction (short write locks)."""
        cutoff = utcnow() - older_than
        deleted = 0
        while True:
            with self.sessions.begin() as session:
                ids = list(
                    session.scalars(
                        select(ForwardJob.id).where(_FINISHED, ForwardJob.updated_at < cutoff).limit(batch)
                    )
                )
                if ids:
                    session.execute(delete(ForwardJob).where(ForwardJob.id.in_(ids), ForwardJob.state == DONE))
            deleted += len(ids)
            if len(ids) < batch:
                return deleted
