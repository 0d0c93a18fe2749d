"""Spool files no job needs are written over instead of deleted and created again: same promises."""

from __future__ import annotations

import os
from pathlib import Path

from dicomrouter.store.spool import FREE_FILE_MAX_BYTES, Spool


def read(path: str) -> bytes:
    return Path(path).read_bytes()


def free_files(spool: Spool) -> list[Path]:
    return sorted(spool.free.glob("*.free"))


def test_a_removed_file_is_written_over_by_the_next_instance_shorter_or_longer(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", keep_free=4)
    first = spool.write(b"A" * 5000)
    inode = os.stat(first.path).st_ino
    spool.remove(first.path)
    assert not os.path.exists(first.path)
    assert len(free_files(spool)) == 1

    shorter = spool.write(b"short")
    assert os.stat(shorter.path).st_ino == inode  # the same file, moved into place again
    assert read(shorter.path) == b"short"  # nothing of the old content is left
    assert free_files(spool) == []

    spool.remove(shorter.path)
    longer = spool.write(b"B" * 9000)
    assert os.stat(longer.path).st_ino == inode
    assert read(longer.path) == b"B" * 9000
    assert longer.size == 9000 and len(longer.sha256) == 64
    assert list(spool.tmp.iterdir()) == []


def test_without_keep_free_a_removed_file_is_deleted(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")  # the CLI's: a short-lived process keeps nothing
    spooled = spool.write(b"x" * 100)
    spool.remove(spooled.path)
    assert not os.path.exists(spooled.path)
    assert free_files(spool) == []


def test_only_so_many_files_and_none_too_large_are_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", keep_free=2)
    paths = [spool.write(bytes([n]) * 10).path for n in range(3)]
    large = spool.write(b"L" * (FREE_FILE_MAX_BYTES + 1)).path
    spool.remove(large)
    for path in paths:
        spool.remove(path)
    assert not os.path.exists(large)
    assert all(not os.path.exists(path) for path in paths)
    assert len(free_files(spool)) == 2
    spool.remove(paths[0])  # gone already: nothing happens
    assert spool.release_free_files() == 2
    assert free_files(spool) == []


def test_a_free_file_swept_by_another_process_is_replaced_by_a_new_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", keep_free=4)
    spool.remove(spool.write(b"old").path)
    assert spool.clean_partial_writes(older_than_s=-60) == 0  # another process starting: old free files go
    assert free_files(spool) == []
    spooled = spool.write(b"new")
    assert read(spooled.path) == b"new"


def test_a_free_file_moved_to_tmp_is_not_taken_for_a_partial_write_left_by_a_crash(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", keep_free=4)
    old = spool.write(b"old").path
    os.utime(old, (1, 1))  # written long ago
    spool.remove(old)
    (free,) = free_files(spool)
    moved = spool.tmp / "reused.part"
    os.rename(free, moved)  # as write() takes it, just before writing over it
    assert spool.clean_partial_writes(older_than_s=600) == 0
    assert moved.exists()
