"""`db backup`: a consistent copy of a SQLite catalog taken while it is being written to."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from click.testing import CliRunner

from dicomrouter.catalog.db import make_engine
from dicomrouter.catalog.schema import require_current_schema
from dicomrouter.cli.main import cli
from tests.conftest import upgrade_catalog
from tests.support.configs import base_document, write_document


def backup(config_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicomrouter", "--config", str(config_path), "db", "backup", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_backup_while_a_writer_commits(tmp_path):
    config_path = write_document(tmp_path / "dicomrouter.yaml", base_document())
    upgrade_catalog(config_path)
    catalog = tmp_path / "var" / "catalog.db"
    writer = sqlite3.connect(catalog, check_same_thread=False)
    writer.execute("CREATE TABLE writes (n INTEGER)")
    writer.commit()
    stop = threading.Event()
    committed = [0]

    def write() -> None:
        # Many small commits, as the router's forwarding and audit rows make them.
        while not stop.is_set():
            writer.execute("INSERT INTO writes VALUES (?)", (committed[0] + 1,))
            writer.commit()
            committed[0] += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        while committed[0] < 200:  # the WAL holds commits the database file does not
            stop.wait(0.01)
        before = committed[0]
        result = backup(config_path, str(tmp_path / "copy.db"))
        after = committed[0]
    finally:
        stop.set()
        thread.join()
        writer.close()
    assert result.returncode == 0, result.stderr
    assert "copied to" in result.stdout and str(tmp_path / "copy.db") in result.stdout

    copy = tmp_path / "copy.db"
    assert copy.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "copy.db-wal").exists()
    with sqlite3.connect(copy) as check:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert (
            check.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        )  # one self-contained file
        rows = [n for (n,) in check.execute("SELECT n FROM writes ORDER BY n")]
    # One snapshot: every commit up to some moment during the backup, none half-way.
    assert before <= len(rows) <= after + 1
    assert rows == list(range(1, len(rows) + 1))
    engine = make_engine(f"sqlite:///{copy}")
    try:
        require_current_schema(engine)  # a router can run on the copy as it is
    finally:
        engine.dispose()

    def backup_in_process(*args: str):
        return CliRunner().invoke(cli, ["--config", str(config_path), "db", "backup", *args])

    again = backup_in_process(str(copy))
    assert again.exit_code == 1 and "exists" in again.output
    assert backup_in_process(str(copy), "--force").exit_code == 0
    itself = backup_in_process(str(catalog))
    assert itself.exit_code == 1 and "the catalog itself" in itself.output


def test_backup_of_a_postgresql_catalog_points_to_pg_dump(tmp_path):
    document = base_document()
    document["router"]["catalog"] = "postgresql+psycopg://router:s3cret@127.0.0.1:5432/test"
    config_path = write_document(tmp_path / "dicomrouter.yaml", document)
    result = backup(config_path, str(tmp_path / "copy.db"))
    assert result.returncode == 1
    assert (
        "pg_dump --format=custom --file FILE 'postgresql://router@127.0.0.1:5432/test'"
        in result.stderr
    )
    assert "postgresql+psycopg://router:***@127.0.0.1:5432/test" in result.stderr
    assert "s3cret" not in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "copy.db").exists()
