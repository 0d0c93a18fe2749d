"""Files and folders holding patient data (catalog, spool, scratch) are the router's user's alone."""

from __future__ import annotations

import os
from pathlib import Path

# `serve` runs with this umask, so whatever else it creates is owner-only too.
PRIVATE_UMASK = 0o077


def owner_only(path: Path) -> None:
    """Take group and other permissions away from a file or folder this user owns (made by an older release)."""
    try:
        st = os.stat(path)
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.chmod(path, st.st_mode & 0o700)
    except FileNotFoundError:
        pass


def create_private_file(path: Path) -> None:
    """Create an empty owner-only file unless it exists; narrow an existing one."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        owner_only(path)
