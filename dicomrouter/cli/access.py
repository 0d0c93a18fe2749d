"""`access explain`: what one calling AE may do on which server, and why."""

from __future__ import annotations

import json
import socket

import click

from dicomrouter.cli.common import CliState, pass_state, print_table, yes_no
from dicomrouter.config import Config
from dicomrouter.routing.access_report import AccessReport, explain_access

COLUMNS = (("echo", "echo"), ("store", "store"), ("find", "find"), ("retrieve", "move/get from"), ("move_to", "move to"))


def _address_of(host: str) -> str:
    try:
        return socket.getaddrinfo(host, None)[0][4][0]
    except OSError as exc:
        raise click.ClickException(f"cannot resolve {host!r}: {exc}") from None


def caller_address(config: Config, calling_ae: str, host: str | None) -> str:
    """The address to check: --host, else the client's (or server's) configured host, else anywhere."""
    if host:
        return _address_of(host)
    client = config.client(calling_ae)
    if client is not None:
        return _address_of(client.host) if client.host else ""
    server = config.server_by_ae(calling_ae)
    return _address_of(server.host) if server is not None else ""


@click.group("access")
def access_group() -> None:
    """Who may do what: roles, environments, move destinations."""


@access_group.command("explain")
@click.argument("calling_ae")
@click.option("--host", help="The address it calls from (default: its configured host).")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def explain(state: CliState, calling_ae: str, host: str | None, as_json: bool) -> None:
    """Echo, store, find, move/get per server, the move destinations, and why."""
    config = state.config()
    report = explain_access(config, calling_ae, caller_address(config, calling_ae, host))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    print_report(report)


def print_report(report: AccessReport) -> None:
    where = report.address or "any address"
    decision = report.association
    verdict = "accepted" if decision.accepted else "REJECTED"
    click.echo(f"{report.calling_ae} calling from {where}: association {verdict} ({decision.reason})")
    caller = report.caller
    if caller is None:
        click.echo("It may do nothing: every association is refused before any DICOM operation.")
        return
    click.echo(f"kind: {caller.kind}; roles: {', '.join(sorted(caller.roles)) or '(none)'}")
    click.echo("")
    rows = [
        (entry.server.name, entry.server.environment, *(yes_no(entry.verdicts[op].allowed) for op, _ in COLUMNS))
        for entry in report.servers
    ]
    print_table(("server", "env", *(title for _, title in COLUMNS)), rows)
    click.echo("")
    click.echo("why:")
    for entry in report.servers:
        click.echo(f"  {entry.server.name}:")
        for op, title in COLUMNS:
            verdict_of = entry.verdicts[op]
            click.echo(f"    {title}: {yes_no(verdict_of.allowed)}, {verdict_of.why}")
    click.echo("")
    allowed = "; ".join(f"{name} ({why})" for name, why in report.move_destinations) or "(none)"
    click.echo(f"C-MOVE destinations allowed: {allowed}")
    if report.refused_destinations:
        refused = "; ".join(f"{name} ({why})" for name, why in report.refused_destinations)
        click.echo(f"C-MOVE destinations refused: {refused}")
    click.echo("Any other Move Destination is answered 0xA801 (unknown destination).")
