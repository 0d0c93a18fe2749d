"""Catalog reads and writes in plain SQL over DB-API, so that the CLI's commands answer without SQLAlchemy.

Each statement is written once, as SQL text with `:name` parameters (catalog/reads.py,
catalog/writes.py, store/queue_report.py, store/queue_actions.py), and runs on a `Reader` or a
`Writer`: the CLI's own sqlite3 or psycopg connection (`open_reader`, `open_writer`), or the
router's SQLAlchemy connection (`db.reader_of`, `db.writer_of`). Values come back as the models'
column types give them (timestamps as aware UTC datetimes, JSON decoded) and go in as they store them.
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

from dicomrouter.catalog.dbapi import SQLITE_READ, SQLITE_WRITE, transaction
from dicomrouter.catalog.revision import require_revision
from dicomrouter.catalog.sqlite import (
    SQLITE_BUSY_TIMEOUT_MS,
    WriteLock,
    configure_connection,
    database_file,
)
from dicomrouter.catalog.urls import parse_url

T = TypeVar("T")
Execute = Callable[[str, Mapping[str, Any]], list[tuple]]
Run = Callable[[str, list[dict[str, Any]]], int]  # one statement for each parameter set; rows changed
_TRANSIENT_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock detected
_NAMED = re.compile(r"(?<![:\w]):(\w+)")


class Reader:
    """Plain SQL reads on one connection; `:name` parameters whatever the driver's style."""

    def __init__(self, execute: Execute, dialect: str, pyformat: bool) -> None:
        self.dialect = dialect  # "sqlite" or "postgresql"
        self._execute = execute
        self._pyformat = pyformat  # psycopg's %(name)s instead of sqlite3's :name

    def rows(self, sql: str, **params: Any) -> list[tuple]:
        """Every row `sql` answers; datetime parameters as the catalog stores them."""
        return self._execute(self._statement(sql), self._parameters(params))

    def scalar(self, sql: str, **params: Any) -> Any:
        """The first column of the first row, or None."""
        rows = self.rows(sql, **params)
        return rows[0][0] if rows else None

    def json(self, value: Any) -> Any:
        """A JSON column's value: text on SQLite, decoded by psycopg already."""
        if self.dialect == "sqlite" and isinstance(value, str | bytes):
            return json.loads(value)
        return value

    def _statement(self, sql: str) -> str:
        if self._pyformat:
            if "%" in sql:
                raise ValueError("a literal % in plain SQL: psycopg would read it as a parameter")
            sql = _NAMED.sub(r"%(\1)s", sql)
        return sql

    def _parameters(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self._bind(value) for name, value in params.items()}

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


class Writer(Reader):
    """Plain SQL reads and writes in the transaction of the connection it runs on."""

    def __init__(self, execute: Execute, run: Run, dialect: str, pyformat: bool) -> None:
        super().__init__(execute, dialect, pyformat)
        self._run = run

    def run(self, sql: str, **params: Any) -> int:
        """Run a statement that answers no rows; returns how many rows it changed."""
        return self._run(self._statement(sql), [self._parameters(params)])

    def run_many(self, sql: str, rows: list[Mapping[str, Any]]) -> None:
        """Run a statement once per parameter set (DB-API executemany)."""
        if rows:
            self._run(self._statement(sql), [self._parameters(row) for row in rows])

    @staticmethod
    def json_value(value: Any) -> str:
        """A JSON column's value as SQLAlchemy's JSON type stores it: encoded text, None as JSON null."""
        return json.dumps(value)


def transient(error: BaseException) -> bool:
    """A DB-API error worth running the transaction again for: deadlock, serialization failure, busy SQLite."""
    if getattr(error, "sqlstate", None) in _TRANSIENT_SQLSTATES:
        return True
    message = str(error).lower()
    return "database is locked" in message or "database is busy" in message


def pause_before_retry(attempt: int) -> None:
    """Back off before running a transaction again, longer after each failed `attempt`, with jitter."""
    time.sleep(min(0.05 * 2**attempt, 1.0) * random.uniform(0.5, 1.5))


def retry_transient(run: Callable[[], T], attempts: int) -> T:
    """`run()` (one whole transaction), up to `attempts` times while it fails on a `transient` error."""
    for attempt in range(1, attempts + 1):
        try:
            return run()
        except Exception as exc:
            if attempt == attempts or not transient(exc):
                raise
            pause_before_retry(attempt)
    raise AssertionError("unreachable")


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


class Transactions:
    """Plain SQL transactions one after another on one connection of the CLI's (`open_writer`)."""

    def __init__(self, connection: Any, dialect: str, pyformat: bool, write_lock: WriteLock | None) -> None:
        self._connection = connection
        self._write_lock = write_lock
        cursor = connection.cursor()

        def execute(sql: str, params: Mapping[str, Any]) -> list[tuple]:
            cursor.execute(sql, params)
            return cursor.fetchall()

        def run(sql: str, params: list[dict[str, Any]]) -> int:
            if len(params) == 1:
                cursor.execute(sql, params[0])
            else:
                cursor.executemany(sql, params)
            return cursor.rowcount

        self.writer = Writer(execute, run, dialect, pyformat)

    def read(self, work: Callable[[Reader], T]) -> T:
        """Run read-only `work` in one transaction; on SQLite a deferred one, which takes no write lock."""
        return self._transaction(work, SQLITE_READ, None)

    def write(self, work: Callable[[Writer], T], attempts: int = 1) -> T:
        """Run `work` in one write transaction, as the router's engine does: on SQLite the writers' lock
        first, then BEGIN IMMEDIATE. Up to `attempts` times while it fails on a deadlock or lock timeout."""
        return retry_transient(lambda: self._transaction(work, SQLITE_WRITE, self._write_lock), attempts)

    def _transaction(self, work: Callable[[Writer], T], sqlite_begin: str, write_lock: WriteLock | None) -> T:
        begin = sqlite_begin if self.writer.dialect == "sqlite" else None  # the connection is in autocommit mode
        with transaction(lambda: self._connection, begin=begin, write_lock=write_lock):
            return work(self.writer)


@contextmanager
def open_writer(url: str) -> Iterator[Transactions]:
    """Plain SQL transactions on a connection of their own to the catalog at `url`, its schema
    checked first (SchemaNeedsUpgrade); a SQLite file that does not exist is not created."""
    connection, dialect, pyformat, close = _connect(url)
    write_lock = None
    try:
        if dialect == "sqlite":
            database = database_file(parse_url(url).database)
            if database is not None and database.exists():
                configure_connection(connection)
                write_lock = WriteLock(database)
        transactions = Transactions(connection, dialect, pyformat, write_lock)
        require_revision(transactions.read(database_revision))
        yield transactions
    finally:
        if write_lock is not None:
            write_lock.close()
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
