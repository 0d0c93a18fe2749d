"""`db upgrade`, `db backup` and `catalog where`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click

from dicomrouter.cli.common import CliState, catalog_reader, pass_state, print_table


@click.group("db")
def db_group() -> None:
    """The catalog database schema."""


@db_group.command("upgrade")
@pass_state
def db_upgrade(state: CliState) -> None:
    """Create or migrate the catalog schema to the version this release needs."""
    from dicomrouter.catalog.plain import open_reader
    from dicomrouter.catalog.revision import SCHEMA_REVISION

    config = state.config()
    try:  # the usual answer, without loading SQLAlchemy and Alembic
        with open_reader(config.router.catalog):
            pass
    except Exception:  # not current, or not readable so: Alembic tells below
        pass
    else:
        click.echo(f"catalog already at {SCHEMA_REVISION}")
        return
    from dicomrouter.catalog.db import make_engine
    from dicomrouter.catalog.schema import schema_state, upgrade

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


@db_group.command("backup")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@pass_state
def db_backup(state: CliState, file: Path, force: bool) -> None:
    """Copy a SQLite catalog to FILE, consistently, while the router runs (PostgreSQL: use pg_dump)."""
    from dicomrouter.catalog.backup import BackupRefused, backup_catalog

    config = state.config()
    try:
        result = backup_catalog(config.router.catalog, file, overwrite=force)
    except BackupRefused as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"catalog {result.source} copied to {result.destination} "
        f"({result.size / 1e6:.1f} MB, schema {result.schema_revision or 'empty'})"
    )


@click.group("catalog")
def catalog_group() -> None:
    """What the catalog knows about studies."""


@catalog_group.command("where")
@click.argument("study_uid")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def where(state: CliState, study_uid: str, as_json: bool) -> None:
    """The servers holding a study, with instance counts, and its deliveries not yet done."""
    from dicomrouter.status import age, study_whereabouts

    with catalog_reader(state.config()) as reader:
        whereabouts = study_whereabouts(reader, study_uid)
    rows, instances, unfinished = whereabouts.rows, whereabouts.instances, whereabouts.unfinished
    if as_json:
        click.echo(json.dumps(whereabouts.as_dict(), indent=2))
        raise SystemExit(0 if whereabouts.found else 1)
    if not rows and not unfinished:
        click.echo(f"study {study_uid} is not in the catalog")
        raise SystemExit(1)
    if rows:
        print_table(
            ("server", "instances", "learned_by", "first_seen", "last_seen"),
            [(r.server_name, instances.get(r.server_name), r.learned_by, _local(r.first_seen), _local(r.last_seen))
             for r in rows],
        )
    else:
        click.echo(f"study {study_uid}: no server has acknowledged any of it yet")
    if unfinished:
        now = datetime.now(UTC)
        click.echo("\ndeliveries not done:")
        print_table(
            ("destination", "pending", "sending", "dead", "delivered", "oldest", "last_error"),
            [(b.destination, b.pending, b.sending, b.dead, b.done, age(b.oldest, now), (b.last_error or "")[:80] or None)
             for b in unfinished],
        )


def _local(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")
