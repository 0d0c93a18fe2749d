"""Create and migrate the catalog schema with the Alembic scripts shipped in this package."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.engine import URL

from dicomrouter.catalog.db import SQLITE_BEGIN, is_sqlite, make_engine, reader_of
from dicomrouter.catalog.plain import database_revision
from dicomrouter.catalog.revision import SCHEMA_REVISION as SCHEMA_REVISION
from dicomrouter.catalog.revision import SchemaNeedsUpgrade as SchemaNeedsUpgrade
from dicomrouter.catalog.revision import require_revision

# Alembic loads only to migrate, or to explain a schema that is not current: the router and
# every CLI command check the revision on each start, and that check must stay cheap.
if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
_UPGRADE_LOCK_ID = 0x44434D52  # "DCMR": advisory lock serialising upgrades on PostgreSQL


def alembic_config() -> Config:
    """An in-memory Alembic config pointing at the packaged migrations (no alembic.ini)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    return config


def head_revision() -> str:
    """The newest migration shipped with this release, as Alembic finds it in the scripts."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the packaged migrations have no head"
    return head


@contextmanager
def _engine(engine_or_url: Engine | str | URL) -> Iterator[Engine]:
    if isinstance(engine_or_url, Engine):
        yield engine_or_url
        return
    engine = make_engine(engine_or_url)
    try:
        yield engine
    finally:
        engine.dispose()


def upgrade(engine_or_url: Engine | str | URL, revision: str = "head") -> None:
    """Migrate the database to `revision` (default: head) in one transaction."""
    from alembic import command

    config = alembic_config()
    with _engine(engine_or_url) as engine, engine.connect() as connection:
        sqlite = is_sqlite(connection)
        if sqlite:
            # Batch migrations copy and drop tables; SQLite only lets foreign keys be
            # switched off outside a transaction, so do it on the raw connection first.
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    # Two nodes upgrading at once: the second waits, then finds nothing to do.
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_UPGRADE_LOCK_ID})")
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration left broken foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")


def schema_state(engine_or_url: Engine | str | URL) -> tuple[str | None, str]:
    """(revision the database is at, or None when empty; revision this release needs)."""
    from alembic.runtime.migration import MigrationContext

    with _engine(engine_or_url) as engine, engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    return current, head_revision()


def require_current_schema(engine_or_url: Engine | str | URL) -> None:
    """Raise SchemaNeedsUpgrade unless the database is exactly at the head revision."""
    with _engine(engine_or_url) as engine, engine.connect() as connection:
        connection = connection.execution_options(**{SQLITE_BEGIN: "DEFERRED"})
        current = database_revision(reader_of(connection))
    require_revision(current)
