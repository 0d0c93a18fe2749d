"""What the catalog says about servers, studies, the audit trail and commitment requests, in plain SQL.

One query per fact, run on a `plain.Reader`: by the CLI without SQLAlchemy, by the router inside
its own transactions (Catalog.read_plain); rows come back as the models' column types give them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from dicomrouter.catalog.plain import Reader, utc_moment
from dicomrouter.catalog.states import WAITING


class StudyLocationRow(NamedTuple):
    """One server holding a study, as where_study answers it."""

    server_name: str
    learned_by: str
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True)
class AuditRow:
    """One audit_events row (the columns of models.AuditEvent)."""

    id: int
    at: datetime
    calling_ae: str | None
    called_ae: str | None
    address: str | None
    node: str | None
    operation: str
    servers: str | None  # comma-separated server names
    study_uid: str | None
    outcome: str
    detail: str | None
    counts: dict[str, Any] | None


@dataclass(frozen=True)
class CommitmentRow:
    """One storage commitment request as `commitments list` shows it (columns of models.CommitmentRequest)."""

    id: int
    transaction_uid: str
    calling_ae: str
    address: str
    state: str
    instances: list[Any]
    received_at: datetime
    deadline_at: datetime
    event_type: int | None
    failures: dict[str, Any] | None
    reported_at: datetime | None
    reported_how: str | None
    report_attempts: int
    last_error: str | None


def studies_per_server(reader: Reader) -> dict[str, int]:
    """Number of studies known on every server in the catalog (0 included)."""
    rows = reader.rows(
        "SELECT servers.name, count(study_locations.id) FROM servers"
        " LEFT OUTER JOIN study_locations ON study_locations.server_id = servers.id"
        " GROUP BY servers.name"
    )
    return dict(rows)


def study_location_rows(reader: Reader, study_uid: str) -> list[StudyLocationRow]:
    """The servers known to hold the study, first learned first (deleted ones included)."""
    rows = reader.rows(
        "SELECT servers.name, study_locations.learned_by, study_locations.first_seen, study_locations.last_seen"
        " FROM study_locations"
        " JOIN servers ON servers.id = study_locations.server_id"
        " JOIN studies ON studies.id = study_locations.study_id"
        " WHERE studies.study_uid = :study_uid"
        " ORDER BY study_locations.first_seen, servers.name",
        study_uid=study_uid,
    )
    return [
        StudyLocationRow(name, learned_by, utc_moment(first_seen), utc_moment(last_seen))
        for name, learned_by, first_seen, last_seen in rows
    ]


def instance_counts(reader: Reader, study_uid: str) -> dict[str, int]:
    """How many instances of the study each server acknowledged (servers that hold none left out)."""
    rows = reader.rows(
        "SELECT servers.name, count(instance_locations.id) FROM instance_locations"
        " JOIN servers ON servers.id = instance_locations.server_id"
        " JOIN instances ON instances.id = instance_locations.instance_id"
        " JOIN series ON series.id = instances.series_id"
        " JOIN studies ON studies.id = series.study_id"
        " WHERE studies.study_uid = :study_uid"
        " GROUP BY servers.name",
        study_uid=study_uid,
    )
    return dict(rows)


def audit_events(
    reader: Reader,
    *,
    since: datetime | None = None,
    calling_ae: str | None = None,
    study_uid: str | None = None,
    operation: str | None = None,
    limit: int = 200,
) -> list[AuditRow]:
    """The newest `limit` audit events matching every filter given, oldest first."""
    given = {
        "since": since,
        "calling_ae": calling_ae,
        "study_uid": study_uid,
        "operation": operation,
    }
    params = {column: value for column, value in given.items() if value is not None}
    conditions = [
        "at >= :since" if column == "since" else f"{column} = :{column}" for column in params
    ]
    rows = reader.rows(
        "SELECT id, at, calling_ae, called_ae, address, node, operation, servers, study_uid, outcome,"
        " detail, counts FROM audit_events"
        + (f" WHERE {' AND '.join(conditions)}" if conditions else "")
        + " ORDER BY at DESC, id DESC LIMIT :limit",
        **params,
        limit=limit,
    )
    return [
        AuditRow(row[0], utc_moment(row[1]), *row[2:11], reader.json(row[11]))
        for row in reversed(rows)
    ]


def commitment_requests(
    reader: Reader, pending_only: bool, limit: int = 200
) -> list[CommitmentRow]:
    """The newest `limit` storage commitment requests (only those not yet reported: `pending_only`), newest first."""
    rows = reader.rows(
        "SELECT id, transaction_uid, calling_ae, address, state, instances, received_at, deadline_at,"
        " event_type, failures, reported_at, reported_how, report_attempts, last_error"
        " FROM commitment_requests"
        + (" WHERE state = :waiting" if pending_only else "")
        + " ORDER BY id DESC LIMIT :limit",
        **({"waiting": WAITING} if pending_only else {}),
        limit=limit,
    )
    return [
        CommitmentRow(
            *row[:5],
            reader.json(row[5]),
            utc_moment(row[6]),
            utc_moment(row[7]),
            row[8],
            reader.json(row[9]),
            utc_moment(row[10]),
            *row[11:],
        )
        for row in rows
    ]
