"""Statements run on DB-API connections directly: the catalog writes every C-STORE makes.

Through an Engine, each of these few small statements cost more in SQLAlchemy (pool checkout,
execution context, result objects) than in the database. Here the Core statements are compiled
once per engine into SQL text, the order of their parameters and their parameters' converters,
and run on connections this object keeps between transactions. The connections come from the
engine, so they are set up as the engine's are (SQLite pragmas and busy timeout, psycopg's
adapters), and each transaction runs as catalog/dbapi.py runs the CLI's plain-SQL ones too: on
SQLite BEGIN IMMEDIATE under the engine's writers' lock, as an engine transaction does.

An expanding IN (`bindparam(..., expanding=True)`), whose SQL SQLAlchemy renders per execution, is
compiled here once per list length: a list is padded to the next power of two by repeating its last
value (`x IN (a, b, b)` matches what `x IN (a, b)` does) and split into runs of at most
MAX_EXPANDED, so a statement has a few compiled forms, not one per length ever seen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Dialect, Engine
from sqlalchemy.sql.base import Executable

from dicomrouter.catalog.db import is_sqlite, write_lock_of
from dicomrouter.catalog.dbapi import SQLITE_WRITE, close_quietly, transaction
from dicomrouter.catalog.plain import Reader, retry_transient
from dicomrouter.catalog.sqlite import WriteLock

T = TypeVar("T")

# Connections kept idle beyond this are closed when given back: as many as stores ran at once
# (each held by one thread for one transaction), within reason.
MAX_IDLE_CONNECTIONS = 8
# A connection idle longer than this is pinged before use; a busy one is not (no round trip per store).
PING_AFTER_IDLE_S = 5.0
# Values of one expanding IN per statement run; a longer list runs in several (the ack writer's
# batches are up to 500 jobs). Padded to powers of two: at most 10 compiled forms per statement.
MAX_EXPANDED = 512


_GIVEN = object()  # a parameter the caller gives at each execution


@dataclass(frozen=True)
class Prepared:
    """A Core statement compiled for one dialect: SQL text, parameter names in order, converters."""

    sql: str
    names: tuple[str, ...]
    positional: bool  # qmark (SQLite): a tuple in `names` order; named (psycopg): a dict
    converters: tuple[Callable[[Any], Any] | None, ...]  # per name: what its SQLAlchemy type does to a value
    values: tuple[Any, ...]  # per name: a value written into the statement, or _GIVEN
    results: tuple[Callable[[Any], Any] | None, ...] | None = None  # per column, where any needs one
    expanding: str | None = None  # the expanding IN parameter, when its length is not compiled in
    expanded: tuple[str, ...] = ()  # the names its values go to, when it is

    def parameters(self, given: Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
        if self.expanded:
            values = given[self.expanding]  # type: ignore[index]
            given = {**given, **dict(zip(self.expanded, values, strict=True))}
        converted = []
        for name, convert, value in zip(self.names, self.converters, self.values, strict=True):
            value = given[name] if value is _GIVEN else given.get(name, value)
            converted.append(value if convert is None else convert(value))
        return tuple(converted) if self.positional else dict(zip(self.names, converted, strict=True))

    def convert(self, rows: list[Any]) -> list[tuple[Any, ...]]:
        """Rows as the statement's column types give them (a SQLite date from its text, say)."""
        if self.results is None:
            return rows
        return [
            tuple(value if convert is None else convert(value) for convert, value in zip(self.results, row, strict=True))
            for row in rows
        ]


def prepare(statement: Executable, dialect: Dialect, many: bool = False, length: int | None = None) -> Prepared:
    """Compile `statement` once (`many`: for executemany; `length`: its expanding IN's values).

    Without `length`, a statement with an expanding IN comes back uncompiled, naming the parameter.
    Refuses what it cannot run as compiled: more than one expanding IN, and values computed per
    execution (Python-side column defaults, callables).
    """
    compiled = statement.compile(dialect=dialect, for_executemany=many)
    sql = compiled.string
    expanding = [name for name, bind in compiled.binds.items() if bind.expanding]
    if len(expanding) > 1:
        raise ValueError(f"more than one expanding parameter: {sql}")
    if expanding and length is None:
        return Prepared("", (), compiled.positional, (), (), expanding=expanding[0])
    if compiled.insert_prefetch or compiled.update_prefetch:
        raise ValueError(f"a column default computed per execution: {sql}")
    expanded: tuple[str, ...] = ()
    if expanding:
        (name,) = expanding
        placeholders = {bind.key: None for bind in compiled.binds.values()}  # only names are taken
        state = compiled.construct_expanded_state({**placeholders, name: [None] * (length or 0)})
        sql = state.statement
        ordered = state.positiontup if compiled.positional else tuple(state.parameters)
        names = tuple(ordered or ())
        expanded = tuple(key for key in names if key not in compiled.binds)
    else:
        names = tuple(compiled.positiontup or ()) if compiled.positional else tuple(compiled.binds)
    element = compiled.binds[expanding[0]] if expanding else None
    binds = [compiled.binds.get(name, element) for name in names]
    if any(bind.callable is not None for bind in binds):
        raise ValueError(f"a parameter computed per execution: {sql}")
    converters = tuple(bind.type.dialect_impl(dialect).bind_processor(dialect) for bind in binds)
    values = tuple(_GIVEN if bind.required or bind.expanding else bind.value for bind in binds)
    results = tuple(
        column.type.dialect_impl(dialect).result_processor(dialect, None)
        for column in getattr(statement, "exported_columns", ())
    )
    return Prepared(
        sql, names, compiled.positional, converters, values,
        results if any(results) else None, expanding[0] if expanding else None, expanded,
    )


class DirectTransaction:
    """One transaction on a DB-API connection; the one place prepared statements run."""

    def __init__(self, cursor: Any, prepared: Callable[[Executable, bool, int | None], Prepared], dialect: Dialect):
        self._cursor = cursor
        self._prepared = prepared
        self._dialect = dialect
        self.dialect = dialect.name

    def execute(self, statement: Executable, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run `statement` (a Core statement defined once, where its other users find it); its rows.

        An expanding IN's values go in runs of at most MAX_EXPANDED, each padded to a power of two;
        the rows are those of every run (an empty list matches nothing: no statement runs)."""
        prepared = self._prepared(statement, False, None)
        if prepared.expanding is None:
            return self._run(prepared, values)
        given = list(values[prepared.expanding])
        rows = []
        for start in range(0, len(given), MAX_EXPANDED):
            run = given[start : start + MAX_EXPANDED]
            length = 1 << (len(run) - 1).bit_length()
            padded = run + run[-1:] * (length - len(run))
            rows += self._run(self._prepared(statement, False, length), {**values, prepared.expanding: padded})
        return rows

    def execute_many(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run `statement` (no results) once per row, in one call to the driver."""
        prepared = self._prepared(statement, True, None)
        if prepared.expanding is not None:
            raise ValueError("an expanding IN runs with execute, not execute_many")
        if len(rows) == 1:  # psycopg's executemany goes through its pipeline mode: costly for one row
            self._cursor.execute(prepared.sql, prepared.parameters(rows[0]))
        elif rows:
            self._cursor.executemany(prepared.sql, [prepared.parameters(row) for row in rows])

    def reader(self) -> Reader:
        """Plain SQL reads (catalog/reads.py, store/queue_actions.py) in this transaction."""

        def execute(sql: str, params: Mapping[str, Any]) -> list[tuple]:
            self._cursor.execute(sql, params)
            return self._cursor.fetchall()

        return Reader(execute, self.dialect, self._dialect.paramstyle in ("pyformat", "format"))

    def _run(self, prepared: Prepared, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        self._cursor.execute(prepared.sql, prepared.parameters(values))
        return prepared.convert(self._cursor.fetchall()) if self._cursor.description is not None else []


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
        self._statements: dict[tuple[Executable, bool, int | None], Prepared] = {}

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
            yield DirectTransaction(cursor, self.prepared, self.engine.dialect)
            cursor.close()
        self._give_back(connection)

    def write(self, work: Callable[[DirectTransaction], T], attempts: int = 1) -> T:
        """Run `work` in one transaction (`begin`), up to `attempts` times while it fails on a
        deadlock or lock timeout, as Catalog.write does."""

        def run() -> T:
            with self.begin() as transaction:
                return work(transaction)

        return retry_transient(run, attempts)

    def prepared(self, statement: Executable, many: bool, length: int | None = None) -> Prepared:
        """`statement` compiled for this engine's dialect (`length`: of its expanding IN), the first
        time it is asked for."""
        key = (statement, many, length)
        prepared = self._statements.get(key)
        if prepared is None:
            prepared = self._statements[key] = prepare(statement, self.engine.dialect, many, length)
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
