"""Catalog writes in plain SQL: the audit trail's rows.

Run on a `plain.Writer`: by the CLI on its own connection without SQLAlchemy, by the router inside
its own transactions (Catalog.add_audit, add_audit_rows); values go in as the models' column types
store them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from dicomrouter.catalog.plain import Writer

AUDIT_COLUMNS = (  # in the order audit_values gives them
    "at",
    "calling_ae",
    "called_ae",
    "address",
    "node",
    "operation",
    "servers",
    "study_uid",
    "outcome",
    "detail",
    "counts",
)
_INSERT_AUDIT = (
    f"INSERT INTO audit_events ({', '.join(AUDIT_COLUMNS)})"
    f" VALUES ({', '.join(f':{column}' for column in AUDIT_COLUMNS)})"
)


def audit_values(
    operation: str,
    outcome: str,
    *,
    calling_ae: str | None = None,
    called_ae: str | None = None,
    address: str | None = None,
    node: str | None = None,
    servers: Sequence[str] | str | None = None,
    study_uid: str | None = None,
    detail: str | None = None,
    counts: Mapping[str, Any] | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """The column values of one audit_events row."""
    if servers is not None and not isinstance(servers, str):
        servers = ",".join(servers)
    return {
        "at": at or datetime.now(UTC),
        "calling_ae": calling_ae,
        "called_ae": called_ae,
        "address": address,
        "node": node,
        "operation": operation,
        "servers": servers or None,
        "study_uid": study_uid,
        "outcome": outcome,
        "detail": detail,
        "counts": dict(counts) if counts is not None else None,
    }


def add_audit(writer: Writer, values: Mapping[str, Any]) -> int:
    """Append one audit event (its columns as `audit_values` makes them); returns its id."""
    return writer.scalar(f"{_INSERT_AUDIT} RETURNING id", **_stored(writer, values))


def add_audit_rows(writer: Writer, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append many audit events (each as `audit_values` makes them)."""
    writer.run_many(_INSERT_AUDIT, [_stored(writer, row) for row in rows])


def _stored(writer: Writer, values: Mapping[str, Any]) -> dict[str, Any]:
    # Like the ORM: a missing column is NULL, `counts` JSON even when None (JSON null).
    return {
        **dict.fromkeys(AUDIT_COLUMNS),
        **values,
        "counts": writer.json_value(values.get("counts")),
    }
