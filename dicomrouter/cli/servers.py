"""`servers ...`: the server registry, edited in the YAML file with comments kept."""

from __future__ import annotations

import json

import click

from dicomrouter import registry
from dicomrouter.cli.common import (
    CliState,
    apply_edit,
    optional_catalog_reader,
    pass_state,
    print_table,
    server_argument,
    yes_no,
)
from dicomrouter.config import ENVIRONMENTS, RETRIEVE_MODES, Config
from dicomrouter.status import server_dict


def _studies(config: Config) -> dict[str, int] | None:
    """Studies held per server name; None (with a note) when the catalog cannot tell."""
    from dicomrouter.catalog.reads import studies_per_server

    with optional_catalog_reader(config) as reader:
        return studies_per_server(reader) if reader is not None else None


def _run_edit(state: CliState, change, name: str) -> None:
    apply_edit(state, change, servers=[name])


@click.group("servers")
def servers_group() -> None:
    """List and edit the PACS servers behind the router."""


@servers_group.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include soft-deleted servers.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def list_servers(state: CliState, show_all: bool, as_json: bool) -> None:
    """Name, AE, address, environment, flags, studies held, comments."""
    config = state.config()
    servers = config.servers if show_all else config.live_servers()
    counts = _studies(config)

    def count(name: str) -> int | None:
        return None if counts is None else counts.get(name, 0)

    if as_json:
        click.echo(json.dumps([server_dict(s, count(s.name)) for s in servers], indent=2))
        return
    rows = [
        (
            s.name, s.ae_title, s.address, s.environment, yes_no(s.active),
            "*" if s.primary else "", yes_no(s.deleted), count(s.name), s.comments,
        )
        for s in servers
    ]
    print_table(("name", "ae_title", "address", "env", "active", "primary", "deleted", "studies", "comments"), rows)


@servers_group.command("show")
@click.argument("name")
@pass_state
def show_server(state: CliState, name: str) -> None:
    """Everything known about one server (NAME or its AE title)."""
    config = state.config()
    server = server_argument(config, name)
    counts = _studies(config)
    info = server_dict(server, None if counts is None else counts.get(server.name, 0))
    for key, value in info.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for sub_key, sub_value in value.items():
                click.echo(f"  {sub_key}: {sub_value if sub_value is not None else '(router AE)'}")
        else:
            click.echo(f"{key}: {'-' if value is None else value}")


def _server_options(func):
    options = [
        click.option("--ae-title", "ae_title"),
        click.option("--host"),
        click.option("--port", type=int),
        click.option("--environment", type=click.Choice(ENVIRONMENTS)),
        click.option("--comments"),
        click.option("--web-url", "web_url"),
        click.option(
            "--retrieve",
            type=click.Choice(RETRIEVE_MODES),
            help="How the router retrieves from it: C-GET, C-MOVE to the router, or auto "
            "(C-GET, C-MOVE where it refuses C-GET).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@servers_group.command("add")
@click.argument("name")
@_server_options
@click.option("--primary", is_flag=True, help="Make it the primary (the old primary stops being it).")
@click.option("--inactive", is_flag=True, help="Add it inactive.")
@pass_state
def add_server(state: CliState, name: str, primary: bool, inactive: bool, **fields) -> None:
    """Add a server (AE title, host, port and environment are required)."""
    missing = [f"--{k.replace('_', '-')}" for k in ("ae_title", "host", "port", "environment") if fields.get(k) is None]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)}")
    fields.update(name=name, primary=primary, active=not inactive)
    _run_edit(state, lambda doc: registry.add_server(doc, fields), name)


@servers_group.command("edit")
@click.argument("name")
@_server_options
@click.option("--rename", help="A new name for the server.")
@pass_state
def edit_server(state: CliState, name: str, rename: str | None, **fields) -> None:
    """Change a server's fields (only the options given)."""
    if rename:
        fields["name"] = rename
    _run_edit(state, lambda doc: registry.edit_server(doc, name, fields), name)


@servers_group.command("activate")
@click.argument("name")
@pass_state
def activate(state: CliState, name: str) -> None:
    """Let the server receive stores and queries."""
    _run_edit(state, lambda doc: registry.set_active(doc, name, True), name)


@servers_group.command("deactivate")
@click.argument("name")
@pass_state
def deactivate(state: CliState, name: str) -> None:
    """Stop using the server for new work (its history stays reachable)."""
    _run_edit(state, lambda doc: registry.set_active(doc, name, False), name)


@servers_group.command("set-primary")
@click.argument("name")
@pass_state
def set_primary(state: CliState, name: str) -> None:
    """Make an active server the primary."""
    _run_edit(state, lambda doc: registry.set_primary(doc, name), name)


@servers_group.command("delete")
@click.argument("name")
@pass_state
def delete(state: CliState, name: str) -> None:
    """Soft-delete (studies recorded on it) or remove (none) a server."""
    config = state.config()
    name = server_argument(config, name).name
    counts = _studies(config)
    # Without a catalog we cannot know it holds nothing: keep it, soft-deleted.
    held = counts.get(name, 0) if counts is not None else None
    _run_edit(state, lambda doc: registry.delete_server(doc, name, held), name)


@servers_group.command("restore")
@click.argument("name")
@pass_state
def restore(state: CliState, name: str) -> None:
    """Bring back a soft-deleted server (inactive)."""
    _run_edit(state, lambda doc: registry.restore_server(doc, name), name)
