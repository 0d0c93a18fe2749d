"""Statements run on DB-API connections directly: the catalog writes every C-STORE makes.

Through an Engine, each of these few small statements cost more in SQLAlchemy (pool checkout,
execution context, result objects) than in the database. Here the Core statements are compiled
once per engine into SQL text, the order of their parameters and their parameters' converters,
and run on connections this object keeps between transactions. The connections come from the
engine, so they are set up as the engine's are (SQLite pragmas and busy timeout, psycopg's
adapters), and each transaction runs as catalog/dbapi.py runs the CLI's plain-SQL ones too: on
SQLite BEGIN IMMEDIATE under the engine's writers' lock, as an engine transaction does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Dialect, Engine
from sqlalchemy.sql.base import Executable

from dicomrouter.catalog.db import is_sqlite, write_lock_of
from dicomrouter.catalog.dbapi import SQLITE_WRITE, close_quietly, transaction
from dicomrouter.catalog.sqlite import WriteLock

# Connections kept idle beyond this are closed when given back: as many as stores ran at once
# (each held by one thread for one transaction), within reason.
MAX_IDLE_CONNECTIONS = 8
# A connection idle longer than this is pinged before use; a busy one is not (no round trip per store).
PING_AFTER_IDLE_S = 5.0


_GIVEN = object()  # a parameter the caller gives at each execution


@dataclass(frozen=True)
class Prepared:
    """A Core statement compiled for one dialect: SQL text, parameter names in order, converters."""

    sql: str
    names: tuple[str, ...]
    positional: bool  # qmark (SQLite): a tuple in `names` order; named (psycopg): a dict
    converters: tuple[Callable[[Any], Any] | None, ...]  # per name: what its SQLAlchemy type does to a value
    values: tuple[Any, ...]  # per name: a value written into the statement, or _GIVEN

    def parameters(self, given: Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
        converted = []
        for name, convert, value in zip(self.names, self.converters, self.values, strict=True):
            value = given[name] if value is _GIVEN else given.get(name, value)
            converted.append(value if convert is None else convert(value))
        return tuple(converted) if self.positional else dict(zip(self.names, converted, strict=True))


def prepare(statement: Executable, dialect: Dialect, many: bool = False) -> Prepared:
    """Compile `statement` once (`many`: for executemany). Refuses what it cannot run as compiled:
    expanding IN parameters (rendered per execution), values computed per execution, and results
    that need converting."""
    compiled = statement.compile(dialect=dialect, for_executemany=many)
    sql = compiled.string
    if "POSTCOMPILE" in sql:
        raise ValueError(f"expanding parameters are rendered per execution: {sql}")
    for column in getattr(statement, "exported_columns", ()):
        if column.type.dialect_impl(dialect).result_processor(dialect, None) is not None:
            raise ValueError(f"column {column} needs its result converted: not on the direct path")
    names = tuple(compiled.positiontup or ()) if compiled.positional else tuple(compiled.binds)
    binds = [compiled.binds[name] for name in names]
    if any(bind.callable is not None for bind in binds):
        raise ValueError(f"a parameter computed per execution: {sql}")
    converters = tuple(bind.type.dialect_impl(dialect).bind_processor(dialect) for bind in binds)
    values = tuple(_GIVEN if bind.required else bind.value for bind in binds)
    return Prepared(sql, names, compiled.positional, converters, values)


class DirectTransaction:
    """One transaction on a DB-API connection; the one place prepared statements run."""

    def __init__(self, cursor: Any, prepared: Callable[[Executable, bool], Prepared]):
        self._cursor = cursor
        self._prepared = prepared

    def execute(self, statement: Executable, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run `statement` (a Core statement defined once, where its other users find it); its rows."""
        prepared = self._prepared(statement, False)
        self._cursor.execute(prepared.sql, prepared.parameters(values))
        return self._cursor.fetchall() if self._cursor.description is not None else []

    def execute_many(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run `statement` (no results) once per row, in one call to the driver."""
        prepared = self._prepared(statement, True)
        if len(rows) == 1:  # psycopg's executemany goes through its pipeline mode: costly for one row
            self._cursor.execute(prepared.sql, prepared.parameters(rows[0]))
        else:
            self._cursor.executemany(prepared.sql, [prepared.parameters(row) for row in rows])


class DirectConnections:
    """DB-API connections of one engine, kept between transactions; a thread holds one per transaction.

    A connection whose transaction failed in any way (database locked or gone, a broken socket) is
    closed, not given back: the next transaction gets a fresh one from the engine. One that lay idle
    a while is pinged first, as the engine's pool does at checkout, and replaced if it does not answer.
    """

    def __init__(self, engine: Engine, max_idle: int = MAX_IDLE_CONNECTIONS):
        self.engine = engine
        self.max_idle = max_idle
        self._sqlite = is_sqlite(engine)
        self._write_lock: WriteLock | None = write_lock_of(engine) if self._sqlite else None
        self._idle: list[tuple[Any, float]] = []  # (DB-API connection, time.monotonic() it was given back)
        self._lock = threading.Lock()
        self._statements: dict[tuple[Executable, bool], Prepared] = {}

    @contextmanager
    def begin(self) -> Iterator[DirectTransaction]:
        """A write transaction, committed when the block ends (rolled back if it raises)."""
        # The writers' lock before the connection: SQLite's writers of a process take turns on one.
        with transaction(
            self._take,
            begin=SQLITE_WRITE if self._sqlite else None,  # psycopg begins with the first statement
            write_lock=self._write_lock,
            discard=close_quietly,
        ) as connection:
            cursor = connection.cursor()
            yield DirectTransaction(cursor, self.prepared)
            cursor.close()
        self._give_back(connection)

    def prepared(self, statement: Executable, many: bool) -> Prepared:
        """`statement` compiled for this engine's dialect, the first time it is asked for."""
        key = (statement, many)
        prepared = self._statements.get(key)
        if prepared is None:
            prepared = self._statements[key] = prepare(statement, self.engine.dialect, many)
        return prepared

    def close(self) -> None:
        """Close the idle connections (those in a transaction are closed as it ends)."""
        self.max_idle = 0
        with self._lock:
            idle, self._idle = self._idle, []
        for connection, _ in idle:
            close_quietly(connection)

    def _take(self) -> Any:
        with self._lock:
            connection, idle_since = self._idle.pop() if self._idle else (None, 0.0)
        if connection is not None and time.monotonic() - idle_since > PING_AFTER_IDLE_S:
            try:  # as the engine's pre-ping: a server restarted or a socket dropped while it lay idle
                self.engine.dialect.do_ping(connection)
                connection.rollback()
            except Exception:
                close_quietly(connection)
                connection = None
        if connection is not None:
            return connection
        # Set up by the engine's connect hooks (and pre-pinged); then ours alone, the pool's slot freed.
        pooled = self.engine.raw_connection()
        connection = pooled.dbapi_connection
        pooled.detach()
        return connection

    def _give_back(self, connection: Any) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append((connection, time.monotonic()))
                return
        connection.close()
