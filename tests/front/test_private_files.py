"""Patient data at rest is the router's user's alone; C-GET scratch left by a crash is removed at start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dicomrouter.catalog.db import make_engine
from dicomrouter.pacsfarm import free_ports
from dicomrouter.store.scratch import scratch_folder
from dicomrouter.store.spool import Spool
from tests.conftest import upgrade_catalog
from tests.support.configs import base_document, write_document
from tests.support.router_process import RouterProcess


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_catalog_and_its_wal_are_owner_only(tmp_path):
    old_umask = os.umask(0o022)  # as a shell leaves it: files 0644 unless the router says otherwise
    try:
        config_path = write_document(tmp_path / "dicomrouter.yaml", base_document())
        upgrade_catalog(config_path)
        catalog = tmp_path / "var" / "catalog.db"
        assert mode(tmp_path / "var") == 0o700
        assert mode(catalog) == 0o600
        engine = make_engine(f"sqlite:///{catalog}")
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT count(*) FROM servers").fetchall()
            assert mode(catalog.with_name("catalog.db-wal")) == 0o600
            assert mode(catalog.with_name("catalog.db-shm")) == 0o600
        engine.dispose()

        # A catalog an older release made world-readable is narrowed when it is opened.
        catalog.chmod(0o644)
        make_engine(f"sqlite:///{catalog}").dispose()
        assert mode(catalog) == 0o600
    finally:
        os.umask(old_umask)


def test_spool_folders_and_files_are_owner_only(tmp_path):
    old_umask = os.umask(0o022)
    try:
        spool = Spool(tmp_path / "var" / "spool")
        stored = spool.write(b"\x00" * 200)
        for folder in (spool.root, spool.tmp, spool.objects, Path(stored.path).parent):
            assert mode(folder) == 0o700, folder
        assert mode(Path(stored.path)) == 0o600
        with scratch_folder(spool.root) as scratch:
            assert mode(scratch) == 0o700

        older = tmp_path / "older-spool"
        (older / "tmp").mkdir(parents=True, mode=0o755)
        older.chmod(0o755)
        Spool(older)
        assert mode(older) == 0o700
    finally:
        os.umask(old_umask)


CRASHING_GET = """
import os, sys
from pathlib import Path
from dicomrouter.store.scratch import scratch_folder
with scratch_folder(Path(sys.argv[1])) as folder:
    (folder / "000000.dcm").write_bytes(b"patient data")
    print(folder, flush=True)
    sys.stdin.read()  # killed here, as a router crashing mid C-GET
"""


def test_serve_removes_scratch_left_by_a_crash_and_keeps_the_one_in_use(tmp_path):
    port = free_ports(1)[0]
    config_path = write_document(tmp_path / "dicomrouter.yaml", base_document(router_port=port))
    upgrade_catalog(config_path)
    spool_root = tmp_path / "var" / "spool"
    crashed = subprocess.Popen(
        [sys.executable, "-c", CRASHING_GET, str(spool_root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    left_behind = Path(crashed.stdout.readline().strip())
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(timeout=30)
    crashed.stdin.close()
    crashed.stdout.close()
    assert (left_behind / "000000.dcm").exists()

    legacy = spool_root / "tmp" / "get-oldrelease"  # an older release's folder: no lock file
    legacy.mkdir()
    hour_ago = time.time() - 3600
    os.utime(legacy, (hour_ago, hour_ago))

    with scratch_folder(spool_root) as in_use:  # another router on the same spool, mid C-GET
        router = RouterProcess(config_path, port)
        router.start()
        try:
            assert not left_behind.exists()
            assert not legacy.exists()
            assert in_use.is_dir()
            assert "spool_scratch_removed" in router.log_text()
            catalog = tmp_path / "var" / "catalog.db"
            for path in (catalog, catalog.with_name("catalog.db-wal")):
                assert mode(path) == 0o600, path
        finally:
            assert router.stop() == 0
    assert not in_use.exists()
