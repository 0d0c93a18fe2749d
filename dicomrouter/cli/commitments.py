"""`commitments list`: storage commitment requests, waiting or reported."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from dicomrouter.cli.common import CliState, catalog_reader, pass_state, print_table

if TYPE_CHECKING:
    from dicomrouter.catalog.reads import CommitmentRow


def _when(value: datetime | None) -> str | None:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else None


def _row(request: CommitmentRow) -> dict:
    return {
        "transaction_uid": request.transaction_uid,
        "calling_ae": request.calling_ae,
        "address": request.address,
        "state": request.state,
        "instances": len(request.instances),
        "received_at": request.received_at.astimezone(UTC).isoformat(),
        "deadline_at": request.deadline_at.astimezone(UTC).isoformat(),
        "event_type": request.event_type,
        "failures": request.failures or {},
        "reported_at": request.reported_at.astimezone(UTC).isoformat()
        if request.reported_at
        else None,
        "reported_how": request.reported_how,
        "report_attempts": request.report_attempts,
        "last_error": request.last_error,
    }


@click.group("commitments")
def commitments_group() -> None:
    """Storage commitment requests (N-ACTION) and their reports (N-EVENT-REPORT)."""


@commitments_group.command("list")
@click.option(
    "--pending", is_flag=True, help="Only the requests whose report has not gone out yet."
)
@click.option(
    "--limit", type=click.IntRange(1), default=200, show_default=True, help="The newest N requests."
)
@click.option("--json", "as_json", is_flag=True)
@pass_state
def commitments_list(state: CliState, pending: bool, limit: int, as_json: bool) -> None:
    """The newest storage commitment requests, what was reported and why an instance failed."""
    from dicomrouter.catalog.reads import commitment_requests

    with catalog_reader(state.config()) as reader:
        requests = commitment_requests(reader, pending, limit)
    if as_json:
        click.echo(json.dumps([_row(r) for r in requests], indent=2))
        return
    print_table(
        (
            "transaction_uid",
            "calling_ae",
            "state",
            "instances",
            "received",
            "result",
            "reported",
            "how",
            "last_error",
        ),
        [
            (
                r.transaction_uid,
                r.calling_ae,
                r.state,
                len(r.instances),
                _when(r.received_at),
                {1: "all committed", 2: f"{len(r.failures or {})} failed"}.get(r.event_type or 0),
                _when(r.reported_at),
                r.reported_how,
                (r.last_error or "")[:80] or None,
            )
            for r in requests
        ],
    )
