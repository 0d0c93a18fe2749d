"""`clients ...`: the AEs allowed to call the router, edited in the YAML file with comments kept."""

from __future__ import annotations

import json

import click

from dicomrouter import registry
from dicomrouter.cli.common import CliState, apply_edit, pass_state, print_table
from dicomrouter.config import ClientConfig


def _client_dict(client: ClientConfig) -> dict:
    return {
        "ae_title": client.ae_title,
        "host": client.host,
        "port": client.port,
        "roles": sorted(client.roles),
        "query_servers": list(client.query_servers) if client.query_servers is not None else None,
        "move_destinations": list(client.move_destinations) if client.move_destinations is not None else None,
        "http_token": client.http_token_sha256 is not None,
    }


def _names(value: str | None) -> list[str] | None:
    """'a, b' -> ['a', 'b']; None stays None (option not given); '' is an empty list."""
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _edit(state: CliState, change) -> None:
    apply_edit(state, change)


@click.group("clients")
def clients_group() -> None:
    """List and edit the AEs allowed to call the router, and their roles."""


@clients_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def list_clients(state: CliState, as_json: bool) -> None:
    """AE title, address, roles, query servers and move destinations."""
    clients = state.config().clients
    if as_json:
        click.echo(json.dumps([_client_dict(c) for c in clients], indent=2))
        return

    def listed(values) -> str:
        return "(default)" if values is None else ", ".join(values) or "(none)"

    rows = [
        (
            c.ae_title, c.host or "(any)", c.port, ", ".join(sorted(c.roles)) or "(none)",
            listed(c.query_servers), listed(c.move_destinations),
        )
        for c in clients
    ]
    print_table(("ae_title", "host", "port", "roles", "query_servers", "move_destinations"), rows)


def _client_options(func):
    options = [
        click.option("--host", help="Associations from any other address are rejected."),
        click.option("--port", type=int, help="Where C-MOVE results are sent to this client."),
        click.option("--roles", help="Comma-separated: test_read, test_write, prod_read, prod_write, admin."),
        click.option("--query-servers", "query_servers", help="Comma-separated server names its C-FINDs may reach."),
        click.option(
            "--move-destinations", "move_destinations",
            help="Comma-separated server names or client AE titles its C-MOVEs may send to.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _fields(host, port, roles, query_servers, move_destinations) -> dict:
    return {
        "host": host,
        "port": port,
        "roles": _names(roles),
        "query_servers": _names(query_servers),
        "move_destinations": _names(move_destinations),
    }


@clients_group.command("add")
@click.argument("ae_title")
@_client_options
@pass_state
def add_client(state: CliState, ae_title: str, **options) -> None:
    """Add a client (roles default to none: it may only echo)."""
    fields = {"ae_title": ae_title, **_fields(**options)}
    _edit(state, lambda doc: registry.add_client(doc, fields))


@clients_group.command("edit")
@click.argument("ae_title")
@_client_options
@click.option("--rename", help="A new AE title for the client.")
@click.option(
    "--clear", multiple=True,
    type=click.Choice(("host", "port", "roles", "query_servers", "move_destinations")),
    help="Remove a key (query_servers/move_destinations: back to the default). Repeatable.",
)
@pass_state
def edit_client(state: CliState, ae_title: str, rename: str | None, clear: tuple[str, ...], **options) -> None:
    """Change a client's fields (only the options given)."""
    fields = _fields(**options)
    if rename:
        fields["ae_title"] = rename
    _edit(state, lambda doc: registry.edit_client(doc, ae_title, fields, clear))


@clients_group.command("remove")
@click.argument("ae_title")
@pass_state
def remove_client(state: CliState, ae_title: str) -> None:
    """Remove a client; refused while a server's move_routing or a client's move_destinations names it."""
    _edit(state, lambda doc: registry.remove_client(doc, ae_title))


@clients_group.command("token")
@click.argument("ae_title")
@pass_state
def token_client(state: CliState, ae_title: str) -> None:
    """Make a new HTTP token for a client: printed once, only its sha256 is stored (replaces any old one)."""
    from dicomrouter.http.tokens import new_token

    if state.config().client(ae_title) is None:
        raise click.ClickException(f"no client with AE title {ae_title!r} (dicomrouter clients add {ae_title} ...)")
    token, digest = new_token()
    _edit(state, lambda doc: registry.set_client_token(doc, ae_title, digest))
    click.echo(f"token for {ae_title} (shown once; store it now): {token}")
    click.echo(f"use it as HTTP Basic (user {ae_title}, password the token) or 'Authorization: Bearer TOKEN'")
