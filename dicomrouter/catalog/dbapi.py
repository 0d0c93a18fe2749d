"""One transaction on a DB-API connection, as the catalog runs it outside SQLAlchemy's engine.

The CLI's plain-SQL connections (catalog/plain.py) and the router's kept connections for each
C-STORE (catalog/direct.py) both run their transactions here, the way the engine runs its own
(catalog/db.py): on SQLite the writers' lock first, then BEGIN IMMEDIATE on a connection in
autocommit mode; psycopg begins with the first statement. Importable without SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from typing import Any

from dicomrouter.catalog.sqlite import WriteLock

SQLITE_WRITE = "BEGIN IMMEDIATE"  # takes SQLite's write lock up front: no "database is locked" half-way
SQLITE_READ = "BEGIN DEFERRED"  # read-only work: takes no write lock, blocks no writer


@contextmanager
def transaction(
    take: Callable[[], Any],
    *,
    begin: str | None,
    write_lock: WriteLock | None = None,
    discard: Callable[[Any], None] | None = None,
) -> Iterator[Any]:
    """One transaction on the connection `take` gives, committed when the block ends.

    `write_lock`, when given, is held from before `take` until the transaction has ended, so that
    writers waiting their turn hold no connection. `begin` is the statement that starts the
    transaction (SQLITE_WRITE, SQLITE_READ), None where the driver begins with the first statement.
    If the BEGIN, the block or the commit raises, the transaction is rolled back (a rollback that
    fails too does not hide the first error), the connection handed to `discard` (still under
    the lock), and the error raised again.
    """
    with write_lock or nullcontext():
        connection = take()
        try:
            if begin is not None:
                cursor = connection.cursor()
                cursor.execute(begin)
                cursor.close()
            yield connection
            connection.commit()
        except BaseException:
            with suppress(Exception):
                connection.rollback()
            if discard is not None:
                discard(connection)
            raise


def close_quietly(connection: Any) -> None:
    """Close a connection whose transaction failed: a broken one may fail to close as well."""
    with suppress(Exception):
        connection.close()
