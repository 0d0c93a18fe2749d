"""What an admin does to the queue, in plain SQL: suspend and resume a destination, reroute its jobs
elsewhere, send dead letters again or purge them.

Each runs on a `plain.Writer`: the CLI's own connection, without SQLAlchemy (`queue` commands), or
the router's, in its transactions (Suspensions, ForwardQueue.retry and purge_dead).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from dicomrouter.catalog.plain import Reader, Writer, utc_moment
from dicomrouter.catalog.states import CLAIMED, DEAD, PENDING
from dicomrouter.store.queue_report import sql_states

# Paths per `IN (...)` when looking for the jobs that still need spool files (SQLite allows 32766 parameters).
_PATHS_PER_QUERY = 500


def suspend(writer: Writer, destination: str, by: str) -> bool:
    """Suspend `destination` (its jobs wait, no attempt is spent); False when it already was."""
    now = datetime.now(UTC)
    while True:
        if writer.run(
            "UPDATE forward_destinations SET suspended_at = :now, suspended_by = :by, updated_at = :now"
            " WHERE destination = :destination AND suspended_at IS NULL",
            now=now,
            by=by,
            destination=destination,
        ):
            return True
        if writer.rows(
            "SELECT id FROM forward_destinations WHERE destination = :destination",
            destination=destination,
        ):
            return False
        # No row for it yet; another process may add one meanwhile: then go round again.
        if writer.run(
            "INSERT INTO forward_destinations (destination, failed_connects, suspended_at, suspended_by, updated_at)"
            " VALUES (:destination, 0, :now, :by, :now) ON CONFLICT (destination) DO NOTHING",
            destination=destination,
            now=now,
            by=by,
        ):
            return True


def resume(writer: Writer, destination: str) -> bool:
    """End `destination`'s maintenance; False when it was not suspended."""
    return bool(
        writer.run(
            "UPDATE forward_destinations SET suspended_at = NULL, suspended_by = NULL, updated_at = :now"
            " WHERE destination = :destination AND suspended_at IS NOT NULL",
            now=datetime.now(UTC),
            destination=destination,
        )
    )


def suspended(reader: Reader) -> dict[str, tuple[datetime, str | None]]:
    """Every suspended destination: since when, and by whom."""
    rows = reader.rows(
        "SELECT destination, suspended_at, suspended_by FROM forward_destinations WHERE suspended_at IS NOT NULL"
    )
    return {name: (utc_moment(at), by) for name, at, by in rows}


def reroute(writer: Writer, source: str, target: str, dead: bool) -> int:
    """Give `target` the jobs waiting for `source` (and its dead letters with `dead`); returns how many.

    Jobs being sent right now stay with `source`. A rerouted job starts afresh: attempts 0, due now.
    """
    now = datetime.now(UTC)
    return writer.run(
        "UPDATE forward_jobs SET destination = :target, state = :pending, attempts = 0, next_attempt_at = :now,"
        " lease_until = NULL, claimed_by = NULL, last_error = :last_error, last_status = NULL, updated_at = :now"
        f" WHERE destination = :source AND state IN ({sql_states(PENDING, DEAD) if dead else sql_states(PENDING)})",
        target=target,
        pending=PENDING,
        now=now,
        last_error=f"rerouted from {source}",
        source=source,
    )


def retry(writer: Writer, job_id: int | None = None, all_dead: bool = False) -> int:
    """Put dead (or waiting) jobs back to pending now, attempts reset: job `job_id`, or every dead one."""
    now = datetime.now(UTC)
    return writer.run(
        "UPDATE forward_jobs SET state = :pending, attempts = 0, next_attempt_at = :now, updated_at = :now"
        + (f" WHERE state = '{DEAD}'" if all_dead else " WHERE id = :job_id")
        + f" AND state IN ({sql_states(DEAD, PENDING)})",
        pending=PENDING,
        now=now,
        **({} if all_dead else {"job_id": job_id}),
    )


def dead_count(reader: Reader) -> int:
    """How many dead letters there are."""
    return reader.scalar(f"SELECT count(*) FROM forward_jobs WHERE state = '{DEAD}'")


def purge_dead(writer: Writer) -> list[str]:
    """Delete dead jobs; returns their spool paths that no other job needs (the caller deletes the files)."""
    paths = [
        row[0] for row in writer.rows(f"SELECT spool_path FROM forward_jobs WHERE state = '{DEAD}'")
    ]
    writer.run(f"DELETE FROM forward_jobs WHERE state = '{DEAD}'")
    return unreferenced_paths(writer, paths)


def unreferenced_paths(reader: Reader, paths: Iterable[str]) -> list[str]:
    """Spool paths that no open or dead job needs any more (safe to delete), sorted."""
    paths = sorted(set(paths))
    still_needed: set[str] = set()
    for start in range(0, len(paths), _PATHS_PER_QUERY):
        chunk = paths[start : start + _PATHS_PER_QUERY]
        names = [f"p{index}" for index in range(len(chunk))]
        still_needed.update(
            row[0]
            for row in reader.rows(
                f"SELECT spool_path FROM forward_jobs WHERE spool_path IN ({', '.join(f':{n}' for n in names)})"
                f" AND state IN ({sql_states(PENDING, CLAIMED, DEAD)})",
                **dict(zip(names, chunk, strict=True)),
            )
        )
    return [path for path in paths if path not in still_needed]
