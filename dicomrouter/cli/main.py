"""Top-level command group."""

from __future__ import annotations

from pathlib import Path

import click

from dicomrouter import __version__
from dicomrouter.cli.access import access_group
from dicomrouter.cli.audit import audit_command
from dicomrouter.cli.catalog import catalog_group, db_group
from dicomrouter.cli.clients import clients_group
from dicomrouter.cli.commitments import commitments_group
from dicomrouter.cli.common import CliState, pass_state, print_table, yes_no
from dicomrouter.cli.find import find_command
from dicomrouter.cli.health import echo_command, health_command
from dicomrouter.cli.move import move_command, routes_group
from dicomrouter.cli.serve import serve_command
from dicomrouter.cli.servers import servers_group
from dicomrouter.cli.store import import_command, queue_group, route_group
from dicomrouter.config import CONFIG_ENV_VAR, DEFAULT_CONFIG_NAME


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=CONFIG_ENV_VAR,
    default=DEFAULT_CONFIG_NAME,
    show_default=True,
    help=f"The router's YAML file (or set {CONFIG_ENV_VAR}).",
)
@click.version_option(__version__, prog_name="dicomrouter")
@click.pass_context
def cli(ctx: click.Context, config_path: Path) -> None:
    """dicomrouter: one DICOM node in front of several PACS."""
    ctx.obj = CliState(config_path)


@cli.group("config")
def config_group() -> None:
    """Check the configuration file."""


@config_group.command("check")
@pass_state
def config_check(state: CliState) -> None:
    """Validate the file and print a summary."""
    from dicomrouter.catalog.urls import shown_url
    from dicomrouter.http.dicomweb import dicomweb_url

    config = state.config()
    router = config.router
    click.echo(f"{config.path}: valid")
    click.echo(f"router  {router.ae_title} on {router.host}:{router.port}")
    click.echo(f"catalog {shown_url(router.catalog)}")
    click.echo(f"spool   {router.spool}")
    click.echo(f"unknown callers {'accepted' if router.accept_unknown_callers else 'rejected'}")
    if router.tls is None:
        click.echo("tls     off (plain TCP)")
    else:
        required = "required" if router.tls.require_client_certificate else "optional"
        click.echo(
            f"tls     on, certificate {router.tls.certificate}, client certificates {required}"
        )
    if router.http is None:
        click.echo("http    off (no router.http: no DICOMweb, metrics or status page)")
    else:
        click.echo(
            f"http    {router.http.host}:{router.http.port}{' (TLS)' if router.http.tls else ''}"
        )
        click.echo(f"dicomweb {dicomweb_url(router.http)}  (QIDO-RS, WADO-RS, STOW-RS)")
        origins = ", ".join(router.http.cors_origins) or "none: same-origin pages only"
        click.echo(f"cors    {origins}  (web viewers on other origins, router.http.cors_origins)")
    click.echo("")
    rows = [
        (
            s.name,
            s.ae_title,
            s.address,
            s.environment,
            yes_no(s.active),
            yes_no(s.primary),
            yes_no(s.deleted),
        )
        for s in config.servers
    ]
    print_table(("server", "ae_title", "address", "env", "active", "primary", "deleted"), rows)
    click.echo("")
    click.echo(
        f"{len(config.clients)} clients, {len(config.routes)} routing rules, primary: {config.primary.name}"
    )


cli.add_command(serve_command)
cli.add_command(servers_group)
cli.add_command(clients_group)
cli.add_command(access_group)
cli.add_command(audit_command)
cli.add_command(echo_command)
cli.add_command(health_command)
cli.add_command(db_group)
cli.add_command(catalog_group)
cli.add_command(queue_group)
cli.add_command(commitments_group)
cli.add_command(route_group)
cli.add_command(import_command)
cli.add_command(find_command)
cli.add_command(move_command)
cli.add_command(routes_group)


def main() -> None:
    cli(prog_name="dicomrouter")
