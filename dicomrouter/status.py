"""The facts an administrator is shown, as plain dicts: one source for the CLI, the JSON API and the page."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from dicomrouter.config import Config, ServerConfig

# Annotations only: the CLI's quick commands use these helpers without SQLAlchemy or Prometheus.
if TYPE_CHECKING:
    from dicomrouter.catalog.plain import Reader
    from dicomrouter.catalog.reads import AuditRow, StudyLocationRow
    from dicomrouter.metrics import DestinationState
    from dicomrouter.store.queue_report import StudyBacklog

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def age(since: datetime | None, now: datetime) -> str | None:
    """A duration for people: 42s, 5m07s, 3h02m, 2d04h."""
    if since is None:
        return None
    seconds = max(0, int((now - since).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """'30m', '2h', '7d' ago, or an ISO date/time (local time unless it names a zone) -> aware UTC."""
    now = now or datetime.now(UTC)
    match = _RELATIVE.match(value)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"{value!r}: use a duration ago (30m, 2h, 7d) or an ISO date/time (2025-01-31, 2025-01-31T08:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # the local time zone
    return moment.astimezone(UTC)


def server_dict(server: ServerConfig, studies: int | None) -> dict[str, Any]:
    """One server of the registry, with the studies the catalog says it holds."""
    return {
        "name": server.name,
        "ae_title": server.ae_title,
        "host": server.host,
        "port": server.port,
        "environment": server.environment,
        "active": server.active,
        "primary": server.primary,
        "deleted": server.deleted,
        "studies": studies,
        "comments": server.comments,
        "web_url": server.web_url,
        "calling_ae": {
            op: getattr(server.calling_ae, op) for op in ("echo", "find", "store", "move")
        },
        "move_routing": dict(server.move_routing),
        "worklist": server.worklist,
        "retrieve": server.retrieve,
    }


def health_dict(state: DestinationState | None) -> dict[str, Any] | None:
    """The last answer of a server (a send by the forwarder or the router's own C-ECHO)."""
    if state is None:
        return None
    return {
        "status": "up" if state.up else "unreachable",
        "since": state.since.isoformat(),
        "checked_at": state.checked_at.isoformat(),
        "by": state.how,
        "last_error": state.last_error,
        "response_ms": round(state.response_ms, 1) if state.response_ms is not None else None,
    }


def servers_facts(
    config: Config, studies: dict[str, int] | None, health: dict[str, DestinationState]
) -> list[dict[str, Any]]:
    """Every live server: registry, last health, studies held."""
    return [
        {
            **server_dict(s, None if studies is None else studies.get(s.name, 0)),
            "health": health_dict(health.get(s.name)),
        }
        for s in config.live_servers()
    ]


def event_dict(event: AuditRow) -> dict[str, Any]:
    """One audit_events row."""
    return {
        "id": event.id,
        "at": event.at.isoformat(),
        "operation": event.operation,
        "outcome": event.outcome,
        "calling_ae": event.calling_ae,
        "called_ae": event.called_ae,
        "address": event.address,
        "servers": event.servers.split(",") if event.servers else [],
        "study_uid": event.study_uid,
        "counts": event.counts,
        "detail": event.detail,
        "node": event.node,
    }


@dataclass
class StudyWhereabouts:
    """Where a study is (servers holding it, instances each) and what of it is still to be delivered."""

    study_uid: str
    rows: list[StudyLocationRow]
    instances: dict[str, int]
    unfinished: list[StudyBacklog]

    @property
    def found(self) -> bool:
        return bool(self.rows or self.unfinished)

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "servers": [
                {
                    "server": r.server_name,
                    "learned_by": r.learned_by,
                    "first_seen": r.first_seen.isoformat(),
                    "last_seen": r.last_seen.isoformat(),
                    "instances": self.instances.get(r.server_name),
                }
                for r in self.rows
            ],
            "deliveries": [b.as_dict() for b in self.unfinished],
        }


def study_whereabouts(reader: Reader, study_uid: str) -> StudyWhereabouts:
    """Blocking: the catalog's locations of the study and its deliveries not yet done, in one transaction
    (the CLI's own reader, or the router's through Catalog.read_plain)."""
    from dicomrouter.catalog.reads import instance_counts, study_location_rows
    from dicomrouter.store.queue_report import study_backlogs

    rows = study_location_rows(reader, study_uid)
    instances = instance_counts(reader, study_uid)
    unfinished = [b for b in study_backlogs(reader, study_uid=study_uid) if b.waiting or b.dead]
    return StudyWhereabouts(study_uid, rows, instances, unfinished)
