"""Catalog reads in plain SQL over DB-API, so that the CLI's read commands answer without SQLAlchemy.

Each read is written once, as SQL text with `:name` parameters (catalog/reads.py,
store/queue_report.py), and runs on a `Reader`: the CLI's own sqlite3 or psycopg connection
(`open_reader`), or the router's SQLAlchemy connection (`db.reader_of`). Values come back as the
models' column types give them: timestamps as aware UTC datetimes, JSON decoded.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from dicomrouter.catalog.revision import require_revision
from dicomrouter.catalog.urls import parse_url

SQLITE_BUSY_TIMEOUT_MS = 30_000

Execute = Callable[[str, Mapping[str, Any]], list[tuple]]
_NAMED = re.compile(r"(?<![:\w]):(\w+)")


class Reader:
    """Plain SQL reads on one connection; `:name` parameters whatever the driver's style."""

    def __init__(self, execute: Execute, dialect: str, pyformat: bool) -> None:
        self.dialect = dialect  # "sqlite" or "postgresql"
        self._execute = execute
        self._pyformat = pyformat  # psycopg's %(name)s instead of sqlite3's :name

    def rows(self, sql: str, **params: Any) -> list[tuple]:
        """Every row `sql` answers; datetime parameters as the catalog stores them."""
        if self._pyformat:
            if "%" in sql:
                raise ValueError("a literal % in plain SQL: psycopg would read it as a parameter")
            sql = _NAMED.sub(r"%(\1)s", sql)
        return self._execute(sql, {name: self._bind(value) for name, value in params.items()})

    def scalar(self, sql: str, **params: Any) -> Any:
        """The first column of the first row, or None."""
        rows = self.rows(sql, **params)
        return rows[0][0] if rows else None

    def json(self, value: Any) -> Any:
        """A JSON column's value: text on SQLite, decoded by psycopg already."""
        if self.dialect == "sqlite" and isinstance(value, str | bytes):
            return json.loads(value)
        return value

    def _bind(self, value: Any) -> Any:
        if not isinstance(value, datetime):
            return value
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware datetime (UTC)")
        value = value.astimezone(UTC)
        # SQLAlchemy's DateTime on SQLite: naive UTC text, always with microseconds (text compares by it).
        return (
            value.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
            if self.dialect == "sqlite"
            else value
        )


def utc_moment(value: datetime | str | None) -> datetime | None:
    """A timestamp column's value as an aware UTC datetime: SQLite's naive UTC text, PostgreSQL's timestamptz."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def database_revision(reader: Reader) -> str | None:
    """The revision recorded in alembic_version, read without Alembic; None for an empty database."""
    if reader.dialect == "sqlite":
        found = reader.rows(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
        )
    else:
        found = reader.scalar("SELECT to_regclass('alembic_version') IS NOT NULL")
    if not found:
        return None
    revisions = [row[0] for row in reader.rows("SELECT version_num FROM alembic_version")]
    return ", ".join(sorted(revisions)) or None


@contextmanager
def open_reader(url: str) -> Iterator[Reader]:
    """A Reader on a connection of its own to the catalog at `url`, its schema checked (SchemaNeedsUpgrade).

    SQLite reads in one deferred transaction, which takes no lock from the router's writers. A
    SQLite file that does not exist reads as an empty database and is not created.
    """
    connection, dialect, pyformat, close = _connect(url)
    try:
        cursor = connection.cursor()

        def execute(sql: str, params: Mapping[str, Any]) -> list[tuple]:
            cursor.execute(sql, params)
            return cursor.fetchall()

        if dialect == "sqlite":
            cursor.execute("BEGIN DEFERRED")
        reader = Reader(execute, dialect, pyformat)
        require_revision(database_revision(reader))
        yield reader
    finally:
        close()


def _connect(url: str) -> tuple[Any, str, bool, Callable[[], None]]:
    """(DB-API connection, dialect, pyformat parameters, close) for `url`."""
    parts = parse_url(url)
    database = parts.database or ":memory:"
    if (
        parts.backend == "sqlite"
        and parts.driver in (None, "pysqlite")
        and not parts.query
        and not database.startswith("file:")
    ):
        path = (
            os.path.abspath(database) if database != ":memory:" else None
        )  # as SQLAlchemy's pysqlite opens it
        if path is not None and os.path.exists(path):
            target, uri = f"file:{quote(path)}?mode=rw", True
        else:
            target, uri = ":memory:", False
        connection = sqlite3.connect(
            target, uri=uri, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None
        )
        return connection, "sqlite", False, connection.close
    if parts.backend == "postgresql" and parts.driver == "psycopg":
        import psycopg

        # The keywords SQLAlchemy's psycopg dialect passes: the URL's parts and its query.
        keywords: dict[str, Any] = {
            name: value
            for name, value in (
                ("host", parts.host),
                ("port", parts.port),
                ("user", parts.username),
                ("password", parts.password),
                ("dbname", parts.database),
            )
            if value is not None
        }
        connection = psycopg.connect(**keywords, **parts.query)
        return connection, "postgresql", True, connection.close
    return _through_sqlalchemy(url)


def _through_sqlalchemy(url: str) -> tuple[Any, str, bool, Callable[[], None]]:
    """Another driver or a SQLite URI: the DB-API connection of a SQLAlchemy engine (slower to import)."""
    from dicomrouter.catalog.db import make_engine

    engine = make_engine(url)
    connection = engine.raw_connection()

    def close() -> None:
        connection.close()
        engine.dispose()

    return (
        connection,
        engine.dialect.name,
        engine.dialect.paramstyle in ("pyformat", "format"),
        close,
    )
