"""What catalog writes shared by both paths run their Core statements on: one interface, two transactions.

record_stored and the ack writer's queue updates run in a SQLAlchemy Session or Connection (the
C-FIND and C-MOVE learners, tests) and on the router's kept DB-API connections (catalog/direct.py,
the ack writer's batches). Both give `Statements`; each statement is written once, as Core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy import Connection
from sqlalchemy.orm import Session
from sqlalchemy.sql.base import Executable

from dicomrouter.catalog.db import reader_of
from dicomrouter.catalog.plain import Reader


class Statements(Protocol):
    """Core statements in the caller's transaction; catalog.direct.DirectTransaction is one."""

    dialect: str  # "sqlite" or "postgresql"

    def execute(self, statement: Executable, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run `statement` with `values`; its rows (none for a statement that answers none)."""
        ...

    def execute_many(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run `statement` (no results) once per row."""
        ...

    def reader(self) -> Reader:
        """Plain SQL reads in the same transaction."""
        ...


class OnConnection:
    """`Statements` in a SQLAlchemy Session's or Connection's transaction."""

    def __init__(self, bind: Session | Connection):
        self._connection = bind if isinstance(bind, Connection) else bind.connection()
        self.dialect = self._connection.dialect.name

    def execute(self, statement: Executable, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        result = self._connection.execute(statement, dict(values))
        return [tuple(row) for row in result] if result.returns_rows else []

    def execute_many(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            self._connection.execute(statement, [dict(row) for row in rows])

    def reader(self) -> Reader:
        return reader_of(self._connection)


def statements_of(bind: Session | Connection | Statements) -> Statements:
    """`bind` as Statements: a Session or Connection wrapped, anything else as it is."""
    return OnConnection(bind) if isinstance(bind, Session | Connection) else bind
