"""Engines and sessions for the catalog, with SQLite tuned for several concurrent writers."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from dicomrouter.catalog.plain import Reader, Writer
from dicomrouter.catalog.sqlite import WriteLock, configure_connection, database_file
from dicomrouter.catalog.urls import shown_url as shown_url  # the CLI imports it from urls
from dicomrouter.private_files import create_private_file, owner_only

T = TypeVar("T")
# Execution option naming how a SQLite transaction begins: IMMEDIATE (default) takes the
# write lock up front, so a transaction that reads then writes never fails half-way with
# "database is locked"; DEFERRED suits read-only work and does not block writers.
SQLITE_BEGIN = "sqlite_begin"
_BEGIN_MODES = ("DEFERRED", "IMMEDIATE", "EXCLUSIVE")
# Engine execution option holding a SQLite engine's WriteLock, for transactions run outside the
# engine on its connections (catalog.direct): they take turns with the engine's on the same lock.
SQLITE_WRITE_LOCK = "sqlite_write_lock"


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys, a busy timeout and real BEGINs."""
    url = make_url(url)
    if url.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, **kwargs)
    database = _prepare_sqlite_file(url)
    engine = create_engine(url, **kwargs)
    # SQLite has one writer at a time and its busy handler backs off in sleeps of up to 100 ms;
    # writers of this process queue on a lock instead, so they take turns without sleeping, and so
    # do the worker processes of one router (a record lock on a file beside the database).
    write_lock = WriteLock(database)
    if write_lock.fd is not None:
        weakref.finalize(engine, os.close, write_lock.fd)
    engine.update_execution_options(**{SQLITE_WRITE_LOCK: write_lock})
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", lambda connection: _on_sqlite_begin(connection, write_lock))
    event.listen(engine, "commit", lambda connection: _release_write_lock(connection, write_lock))
    event.listen(engine, "rollback", lambda connection: _release_write_lock(connection, write_lock))
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to `engine` whose objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def engine_of(sessions: sessionmaker[Session]) -> Engine:
    """The engine a session factory is bound to (for Core transactions on hot paths)."""
    return sessions.kw["bind"]


def reader_of(connection: Connection) -> Reader:
    """A plain-SQL Reader on `connection`, in its transaction (statements go through its events and errors)."""

    def execute(sql: str, params: Mapping[str, Any]) -> list[tuple]:
        return [tuple(row) for row in connection.exec_driver_sql(sql, dict(params))]

    paramstyle = connection.dialect.paramstyle
    return Reader(execute, connection.dialect.name, paramstyle in ("pyformat", "format"))


def writer_of(connection: Connection) -> Writer:
    """A plain-SQL Writer on `connection`, in its transaction (statements go through its events and errors)."""

    def execute(sql: str, params: Mapping[str, Any]) -> list[tuple]:
        return [tuple(row) for row in connection.exec_driver_sql(sql, dict(params))]

    def run(sql: str, params: list[dict[str, Any]]) -> int:
        return connection.exec_driver_sql(sql, params if len(params) > 1 else params[0]).rowcount

    paramstyle = connection.dialect.paramstyle
    return Writer(execute, run, connection.dialect.name, paramstyle in ("pyformat", "format"))


def write_plain(sessions: sessionmaker[Session], work: Callable[[Writer], T]) -> T:
    """Run plain-SQL write `work` in one write transaction of `sessions` (BEGIN IMMEDIATE on SQLite)."""
    with engine_of(sessions).begin() as connection:
        return work(writer_of(connection))


def read_plain(sessions: sessionmaker[Session], work: Callable[[Reader], T]) -> T:
    """Run plain-SQL read `work` in one transaction of `sessions`; on SQLite it takes no write lock."""
    with sessions() as session:
        return work(reader_of(session.connection(execution_options={SQLITE_BEGIN: "DEFERRED"})))


def write_lock_of(engine: Engine) -> WriteLock | None:
    """The writers' lock of a SQLite engine made by make_engine (None for any other engine)."""
    return engine.get_execution_options().get(SQLITE_WRITE_LOCK)


def is_sqlite(bind: Engine | Connection) -> bool:
    """True for a SQLite engine or connection."""
    return bind.dialect.name == "sqlite"


def _prepare_sqlite_file(url: URL) -> Path | None:
    """The database file owner-only before SQLite creates it; SQLite gives its WAL the same mode."""
    path = database_file(url.database)
    if path is None:
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    create_private_file(path)
    for companion in ("-wal", "-shm"):
        owner_only(path.with_name(path.name + companion))
    return path


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    configure_connection(dbapi_connection)


def _on_sqlite_begin(connection: Connection, write_lock: WriteLock) -> None:
    mode = str(connection.get_execution_options().get(SQLITE_BEGIN, "IMMEDIATE")).upper()
    if mode not in _BEGIN_MODES:
        raise ValueError(f"{SQLITE_BEGIN}={mode!r}; use one of {', '.join(_BEGIN_MODES)}")
    if mode != "DEFERRED":
        write_lock.acquire()
        connection.info["holds_write_lock"] = True
    try:
        connection.exec_driver_sql(f"BEGIN {mode}")
    except BaseException:
        _release_write_lock(connection, write_lock)
        raise


def _release_write_lock(connection: Connection, write_lock: WriteLock) -> None:
    if connection.info.pop("holds_write_lock", False):
        write_lock.release()
