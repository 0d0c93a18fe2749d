"""`audit`: the audit trail, filtered by time, calling AE, study or operation."""

from __future__ import annotations

import json
from datetime import datetime

import click

from dicomrouter.cli.common import CliState, catalog_reader, pass_state, print_table
from dicomrouter.status import event_dict, parse_since


def _since(value: str) -> datetime:
    try:
        return parse_since(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None


@click.command("audit")
@click.option("--since", help="Only events since then: 30m, 2h, 7d, or an ISO date/time (local time).")
@click.option("--ae", "calling_ae", help="Only events of this calling AE title.")
@click.option("--study", "study_uid", help="Only events about this Study Instance UID.")
@click.option("--operation", help="association, echo, store, find, worklist, move, get, forward, config.")
@click.option("--limit", type=click.IntRange(1), default=200, show_default=True, help="The newest N events.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def audit_command(
    state: CliState, since: str | None, calling_ae: str | None, study_uid: str | None,
    operation: str | None, limit: int, as_json: bool,
) -> None:
    """The audit trail: associations, DICOM operations, CLI config changes, dead letters."""
    from dicomrouter.catalog.reads import audit_events

    since_at = _since(since) if since else None
    with catalog_reader(state.config()) as reader:
        events = audit_events(
            reader, since=since_at, calling_ae=calling_ae, study_uid=study_uid, operation=operation, limit=limit
        )
    if as_json:
        click.echo(json.dumps([event_dict(e) for e in events], indent=2))
        return
    rows = [
        (
            e.at.astimezone().strftime("%Y-%m-%d %H:%M:%S"), e.operation, e.outcome, e.calling_ae,
            e.address, e.servers, e.study_uid,
            " ".join(f"{k}={v}" for k, v in (e.counts or {}).items()) or None,
            (e.detail or "")[:100] or None,
        )
        for e in events
    ]
    print_table(("time", "operation", "outcome", "calling_ae", "address", "servers", "study_uid", "counts", "detail"), rows)
