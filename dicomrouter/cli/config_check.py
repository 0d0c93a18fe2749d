"""`config check`: validate the configuration file and print a summary."""

from __future__ import annotations

import click

from dicomrouter.cli.common import CliState, pass_state, print_table, yes_no


@click.group("config")
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
