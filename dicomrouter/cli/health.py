"""`echo` and `health`: connection tests against the configured servers."""

from __future__ import annotations

import json
import sys

import click

from dicomrouter.cli.common import (
    CliState,
    open_catalog,
    pass_state,
    print_table,
    server_argument,
    yes_no,
)


@click.command("echo")
@click.argument("name", required=False)
@click.option("--all", "echo_all", is_flag=True, help="Echo every server that is not deleted.")
@click.option("--timeout", type=float, default=None, help="Seconds per server (default: router.echo_timeout).")
@pass_state
def echo_command(state: CliState, name: str | None, echo_all: bool, timeout: float | None) -> None:
    """C-ECHO a server (or --all) with its echo calling AE."""
    config = state.config()
    if echo_all == bool(name):
        raise click.UsageError("give a server NAME or --all")
    if echo_all:
        servers = config.live_servers()
    else:
        servers = [server_argument(config, name)]
    from dicomrouter.health import echo_servers

    results = echo_servers(config, servers, timeout)
    failed = 0
    for result in results:
        if result.healthy:
            click.echo(f"{result.server.name} ({result.server.ae_title} at {result.server.address}): "
                       f"Success in {result.response_ms:.1f} ms, calling AE {result.calling_ae}")
        else:
            failed += 1
            click.echo(f"{result.server.name} ({result.server.ae_title} at {result.server.address}): "
                       f"{result.status}: {result.detail}")
    sys.exit(1 if failed else 0)


@click.command("health")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of objects.")
@click.option("--timeout", type=float, default=None, help="Seconds per server (default: router.echo_timeout).")
@pass_state
def health_command(state: CliState, as_json: bool, timeout: float | None) -> None:
    """Every server's state; exit 1 when the primary is not healthy."""
    config = state.config()
    catalog = open_catalog(config)
    counts = catalog.studies_per_server() if catalog else None
    from dicomrouter.health import check_health

    rows = check_health(config, counts, timeout)
    if as_json:
        click.echo(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        print_table(
            ("server", "ae_title", "address", "status", "ms", "active", "primary", "studies", "reason"),
            [
                (
                    r.server.name,
                    r.server.ae_title,
                    r.server.address,
                    r.echo.status,
                    r.echo.response_ms,
                    yes_no(r.server.active),
                    yes_no(r.server.primary),
                    r.studies,
                    r.echo.detail or "",
                )
                for r in rows
            ],
        )
    primary = next(r for r in rows if r.server.primary)
    if not primary.echo.healthy:
        if not as_json:
            click.echo(f"primary {primary.server.name} is {primary.echo.status}", err=True)
        sys.exit(1)
