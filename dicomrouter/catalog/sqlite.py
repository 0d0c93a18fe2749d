"""SQLite as the catalog uses it, importable without SQLAlchemy: the writers' lock and each connection's settings.

One place for both, so that the router's engine (catalog/db.py) and the CLI's plain connections
(catalog/plain.py) take turns writing the same way.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SQLITE_BUSY_TIMEOUT_MS = 30_000


def database_file(database: str | None) -> Path | None:
    """The file a SQLite URL's database names, as an absolute path; None for memory and `file:` URIs."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().absolute()


class WriteLock:
    """One writer at a time: threads of this process on a lock, processes (a router's workers, the
    CLI) on a POSIX record lock on `<database>-writers`, which blocks in the kernel and wakes at once
    instead of sleeping like SQLite's busy handler. Record locks belong to the process, so two engines
    of one process never wait on each other here (SQLite's busy timeout still orders them), and the
    kernel drops the lock of a process that dies. Only an optimisation: SQLite's own lock stays the
    guarantee, so a lost record lock (another descriptor of the file closed) costs waits, not data."""

    def __init__(self, database: Path | None):
        self._threads = threading.Lock()
        self.fd: int | None = None
        if database is not None:
            path = database.with_name(database.name + "-writers")
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire(self) -> None:
        self._threads.acquire()
        if self.fd is not None:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX)
            except OSError:  # EDEADLK, EINTR...: SQLite's busy timeout takes over
                pass

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
            except OSError:
                pass
        self._threads.release()

    def __enter__(self) -> WriteLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def close(self) -> None:
        """Close the lock file (a process's other descriptors of it lose their record locks too)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def configure_connection(dbapi_connection: sqlite3.Connection) -> None:
    """Settings every catalog connection gets: explicit BEGINs, busy timeout, WAL, foreign keys."""
    # Leave transaction control to the caller (SQLAlchemy's begin event, or dbapi.transaction)
    # instead of the sqlite3 module's legacy mode, which never BEGINs before a SELECT or DDL.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _enable_wal(cursor: Any) -> None:
    """Switch to WAL (persistent in the file); retry, as the switch ignores busy_timeout."""
    if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() in ("wal", "memory"):
        return
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
