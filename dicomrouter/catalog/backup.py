"""A consistent copy of a SQLite catalog while the router writes to it.

Copying the file is not safe: committed transactions may still be only in the WAL beside it, and
a copy taken mid-write can be torn. SQLite's online backup API copies the pages of one read
snapshot instead; in WAL mode that snapshot does not hold up the router's writers.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from dicomrouter.catalog.sqlite import SQLITE_BUSY_TIMEOUT_MS
from dicomrouter.catalog.urls import parse_url, shown_url
from dicomrouter.private_files import create_private_file


class BackupRefused(Exception):
    """No backup was made; the message says why and what to do instead."""


@dataclass(frozen=True)
class BackupResult:
    source: Path
    destination: Path
    size: int
    schema_revision: str | None


def backup_catalog(url: str, destination: Path, overwrite: bool = False) -> BackupResult:
    """Copy the SQLite catalog at `url` to `destination` (owner-only, one self-contained file)."""
    parsed = parse_url(url)
    if parsed.backend != "sqlite":
        raise BackupRefused(_not_sqlite(url))
    if not parsed.database or parsed.database == ":memory:" or parsed.database.startswith("file:"):
        raise BackupRefused(f"the catalog {shown_url(url)} is not a database file")
    source = Path(parsed.database).expanduser().absolute()
    destination = Path(destination).expanduser().absolute()
    if not source.is_file():
        raise BackupRefused(f"no catalog at {source} (create it with `dicomrouter db upgrade`)")
    if destination in {
        source.with_name(source.name + end) for end in ("", "-wal", "-shm", "-journal")
    }:
        raise BackupRefused(
            f"{destination} is the catalog itself or one of its files; choose another name"
        )
    if destination.exists() and not overwrite:
        raise BackupRefused(f"{destination} exists; remove it or give --force to replace it")
    if not destination.parent.is_dir():
        raise BackupRefused(f"no folder {destination.parent}")
    partial = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.tmp")
    try:
        create_private_file(partial)
        revision = _copy(source, partial)
        _fsync(partial)
        os.replace(partial, destination)
        _fsync(destination.parent)
    finally:
        partial.unlink(missing_ok=True)
    return BackupResult(source, destination, destination.stat().st_size, revision)


def _copy(source: Path, target: Path) -> str | None:
    """Back up `source` into the empty file `target`, check the copy, return its schema revision."""
    reader = sqlite3.connect(source, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
    try:
        copy = sqlite3.connect(target)
        try:
            reader.backup(copy)  # all pages in one step: one read snapshot of the source
            # The copy keeps the source's WAL flag; make it one self-contained file.
            copy.execute("PRAGMA journal_mode=DELETE")
            verdict = copy.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise BackupRefused(
                    f"the copy failed its integrity check ({verdict}); the catalog may be damaged"
                )
            try:
                row = copy.execute("SELECT version_num FROM alembic_version").fetchone()
            except sqlite3.OperationalError:
                row = None
            return row[0] if row else None
        finally:
            copy.close()
    finally:
        reader.close()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _not_sqlite(url: str) -> str:
    # libpq's own URL, without the password: pg_dump takes it from PGPASSWORD or ~/.pgpass.
    libpq_url = parse_url(url).without_password()
    return (
        f"the catalog {shown_url(url)} is not SQLite; `db backup` copies only a SQLite catalog. "
        f"Back up a PostgreSQL catalog with PostgreSQL's own tools while the router runs, e.g. "
        f"pg_dump --format=custom --file FILE '{libpq_url}' (restore with pg_restore)"
    )
