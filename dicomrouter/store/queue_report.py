"""What the forwarding queue holds, summed per destination and per study, for `queue list` and `catalog where`.

Plain SQL on a `catalog.plain.Reader`: the CLI reads without SQLAlchemy, the HTTP API and the
status page through Catalog.read_plain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from dicomrouter.catalog.plain import Reader, utc_moment
from dicomrouter.catalog.states import CLAIMED, DEAD, DONE, PENDING


def sql_states(*states: str) -> str:
    """States as SQL literals: SQLite uses a partial index only for a condition written out."""
    return ", ".join(f"'{state}'" for state in states)


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


@dataclass(frozen=True)
class JobRow:
    """One forwarding job as `queue list --instances` shows it (columns of models.ForwardJob)."""

    id: int
    destination: str
    state: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    header: dict[str, Any]
    sop_instance_uid: str
    last_error: str | None
    claimed_by: str | None


def _older(a: datetime | None, b: datetime | None) -> datetime | None:
    return min((x for x in (a, b) if x is not None), default=None)


def job_counts(reader: Reader, done_cap: int | None = None) -> dict[str, int]:
    """How many jobs are in each state (states without any left out), by state name; with `done_cap`,
    finished jobs are counted up to `done_cap` + 1 only (what the catalog keeps of them can be millions)."""
    counts = dict(
        reader.rows(
            f"SELECT state, count(*) FROM forward_jobs WHERE state IN ({sql_states(PENDING, CLAIMED, DEAD)})"
            " GROUP BY state"
        )
    )
    # Through an index of `state` either way; bounded, it reads at most done_cap + 1 of its entries.
    counts[DONE] = reader.scalar(
        f"SELECT count(*) FROM (SELECT 1 FROM forward_jobs WHERE state = '{DONE}'"
        + (" LIMIT :limit" if done_cap is not None else "")
        + ") AS finished",
        **({"limit": done_cap + 1} if done_cap is not None else {}),
    )
    return {state: count for state, count in sorted(counts.items()) if count}


def destination_backlogs(reader: Reader) -> list[DestinationBacklog]:
    """Every destination with jobs not delivered, or an outage on record, by name."""
    rows = reader.rows(
        "SELECT destination, state, count(*), min(created_at), min(next_attempt_at) FROM forward_jobs"
        f" WHERE state IN ({sql_states(PENDING, CLAIMED, DEAD)}) GROUP BY destination, state"
    )
    outages = reader.rows(
        "SELECT destination, unreachable_since, failed_connects, last_error, next_attempt_at, suspended_at,"
        " suspended_by FROM forward_destinations"
    )
    backlogs: dict[str, DestinationBacklog] = {}
    for destination, state, count, oldest, next_attempt in rows:
        backlog = backlogs.setdefault(destination, DestinationBacklog(destination))
        if state == DEAD:
            backlog.dead = count
            continue
        if state == PENDING:
            backlog.pending = count
            backlog.next_attempt = utc_moment(next_attempt)
        else:
            backlog.sending = count
        backlog.oldest = _older(backlog.oldest, utc_moment(oldest))
    for name, unreachable_since, failed_connects, last_error, next_attempt_at, suspended_at, suspended_by in outages:
        if unreachable_since is not None:
            backlog = backlogs.setdefault(name, DestinationBacklog(name))
            backlog.unreachable_since = utc_moment(unreachable_since)
            backlog.failed_connects = failed_connects
            backlog.last_error = last_error
            # The lane's own next try (the jobs' times are only when each may go again).
            backlog.next_attempt = utc_moment(next_attempt_at) or backlog.next_attempt
        if suspended_at is not None:
            backlog = backlogs.setdefault(name, DestinationBacklog(name))
            backlog.suspended_at = utc_moment(suspended_at)
            backlog.suspended_by = suspended_by
    for backlog in backlogs.values():
        if backlog.last_error is None:
            states = (PENDING, CLAIMED) if backlog.waiting else (DEAD,)
            backlog.last_error = reader.scalar(
                "SELECT last_error FROM forward_jobs"
                f" WHERE destination = :destination AND state IN ({sql_states(*states)}) AND last_error IS NOT NULL"
                " ORDER BY updated_at DESC LIMIT 1",
                destination=backlog.destination,
            )
    return sorted(backlogs.values(), key=lambda b: b.destination)


def study_backlogs(reader: Reader, study_uid: str | None = None, limit: int = 200) -> list[StudyBacklog]:
    """Per (destination, study): jobs waiting or dead, oldest first; with `study_uid`, that study's jobs in every state."""
    states = (PENDING, CLAIMED, DEAD) + ((DONE,) if study_uid else ())
    rows = reader.rows(
        "SELECT destination, study_uid, state, count(*), min(created_at), max(last_error) FROM forward_jobs"
        f" WHERE state IN ({sql_states(*states)})"
        + (" AND study_uid = :study_uid" if study_uid else "")
        + " GROUP BY destination, study_uid, state",
        **({"study_uid": study_uid} if study_uid else {}),
    )
    backlogs: dict[tuple[str, str | None], StudyBacklog] = {}
    for destination, study, state, count, oldest, last_error in rows:
        backlog = backlogs.setdefault((destination, study), StudyBacklog(destination, study))
        field_name = {PENDING: "pending", CLAIMED: "sending", DEAD: "dead", DONE: "done"}[state]
        setattr(backlog, field_name, count)
        if state != DONE:
            backlog.oldest = _older(backlog.oldest, utc_moment(oldest))
            backlog.last_error = backlog.last_error or last_error
    ordered = sorted(
        backlogs.values(), key=lambda b: (b.oldest is None, b.oldest or datetime.max, b.destination)
    )
    return ordered[:limit]


def instance_jobs(reader: Reader, dead: bool, study_uid: str | None = None, limit: int = 200) -> list[JobRow]:
    """The jobs themselves, one per instance and destination (waiting, or dead), oldest first."""
    states = (DEAD,) if dead else (PENDING, CLAIMED)
    rows = reader.rows(
        "SELECT id, destination, state, attempts, created_at, next_attempt_at, header, sop_instance_uid,"
        f" last_error, claimed_by FROM forward_jobs WHERE state IN ({sql_states(*states)})"
        + (" AND study_uid = :study_uid" if study_uid else "")
        + " ORDER BY id LIMIT :limit",
        **({"study_uid": study_uid} if study_uid else {}),
        limit=limit,
    )
    return [
        JobRow(*row[:4], utc_moment(row[4]), utc_moment(row[5]), reader.json(row[6]), *row[7:])
        for row in rows
    ]
