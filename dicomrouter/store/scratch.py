"""Private scratch folders under the spool's tmp/ (C-GET holds a study there before sending it).

Each folder holds a lock file that its process keeps locked while it uses the folder. The lock
goes with the process, however it ends, so a router starting up can tell a folder that a crash
left behind (lock free) from one another router on the same spool is using (lock taken).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCRATCH_PREFIX = "get-"
LOCK_NAME = ".in-use"
# A folder without a lock file was left by an older release, or by a crash between creating
# the folder and its lock: removed once it is this old.
UNLOCKED_GRACE_S = 600.0


@contextmanager
def scratch_folder(spool_root: Path) -> Iterator[Path]:
    """An owner-only folder under `spool_root`/tmp, removed on exit (and at the next start after a crash)."""
    tmp = Path(spool_root) / "tmp"
    tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=tmp))  # mode 0700
    lock_fd = -1
    try:
        # Locked under another name, then renamed: a cleaner never finds the lock file unlocked.
        lock_fd = os.open(folder / f"{LOCK_NAME}.new", os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        os.rename(folder / f"{LOCK_NAME}.new", folder / LOCK_NAME)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if lock_fd >= 0:
            os.close(lock_fd)


def clean_scratch(spool_root: Path) -> int:
    """Remove the scratch folders no running process holds; returns how many were removed."""
    tmp = Path(spool_root) / "tmp"
    removed = 0
    for folder in tmp.glob(f"{SCRATCH_PREFIX}*"):
        if folder.is_dir() and _remove_if_abandoned(folder):
            removed += 1
    return removed


def _remove_if_abandoned(folder: Path) -> bool:
    try:
        lock_fd = os.open(folder / LOCK_NAME, os.O_WRONLY)
    except FileNotFoundError:
        try:
            if time.time() - folder.stat().st_mtime < UNLOCKED_GRACE_S:
                return False
        except FileNotFoundError:
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return True
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return False  # its process is alive and using it
            raise
        shutil.rmtree(folder, ignore_errors=True)
        return True
    finally:
        os.close(lock_fd)
