"""`db upgrade` and `catalog where`."""

from __future__ import annotations

import click

from dicomrouter.cli.common import CliState, open_catalog, pass_state, print_table


@click.group("db")
def db_group() -> None:
    """The catalog database schema."""


@db_group.command("upgrade")
@pass_state
def db_upgrade(state: CliState) -> None:
    """Create or migrate the catalog schema to the version this release needs."""
    from dicomrouter.catalog.db import make_engine
    from dicomrouter.catalog.schema import schema_state, upgrade

    config = state.config()
    engine = make_engine(config.router.catalog)
    try:
        before, head = schema_state(engine)
        if before == head:
            click.echo(f"catalog already at {head}")
            return
        upgrade(engine)
        click.echo(f"catalog upgraded from {before or 'empty'} to {head}")
    finally:
        engine.dispose()


@click.group("catalog")
def catalog_group() -> None:
    """What the catalog knows about studies."""


@catalog_group.command("where")
@click.argument("study_uid")
@pass_state
def where(state: CliState, study_uid: str) -> None:
    """The servers holding a study."""
    config = state.config()
    catalog = open_catalog(config, must_exist=True)
    rows = catalog.where_study(study_uid)
    if not rows:
        click.echo(f"study {study_uid} is not in the catalog")
        raise SystemExit(1)
    print_table(("server", "learned_by", "first_seen", "last_seen"), [tuple(r) for r in rows])
