"""The durable spool: received bytes become complete, fsynced DICOM files before Success."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dicomrouter.private_files import owner_only

# The router keeps spool files no job needs any more for reuse, up to this many per process and this
# large each: creating a file (an inode found and set up) and deleting one cost the kernel more than the
# write and fsync of a small instance; a file written over in place also needs no new blocks.
FREE_FILES_MAX = 32
FREE_FILE_MAX_BYTES = 2 * 1024 * 1024


class SpoolError(Exception):
    """The spool could not keep the instance safe."""


class SpoolFull(SpoolError):
    """No space (or quota) left: answer 0xA700, never Success."""


@dataclass(frozen=True)
class SpooledFile:
    path: str  # where the file now safely lives
    sha256: str
    size: int


def _fsync_dir(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Files under `root` named from the bytes' hash, never from UIDs.

    A sender's SOP Instance UID such as ``../../x`` therefore can never name a path.
    """

    def __init__(self, root: Path, keep_free: int = 0):
        """`keep_free`: how many files no job needs this process keeps to write over (0: delete them;
        a short-lived process such as the CLI has no use for them)."""
        self.root = Path(root)
        self.keep_free = keep_free
        self.tmp = self.root / "tmp"
        self.objects = self.root / "objects"
        self.free = self.root / "free"  # files kept for reuse by the process that put them there
        # Owner-only: the files hold patient data. An older, wider spool root is narrowed.
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner_only(self.root)
        self.tmp.mkdir(mode=0o700, exist_ok=True)
        self.objects.mkdir(mode=0o700, exist_ok=True)
        self.free.mkdir(mode=0o700, exist_ok=True)
        self._known_dirs: set[str] = set()  # objects/XX folders known to exist, by XX
        self._objects = str(self.objects)
        self._tmp = str(self.tmp)
        self._free_folder = str(self.free)
        self._free: list[tuple[str, int]] = []  # (path in free/, size): ours to reuse
        self._free_lock = threading.Lock()
        self._prepare_folders()

    def _prepare_folders(self) -> None:
        """Every objects/XX folder (XX: the hash's first byte) made once, here: a store then never
        pays for a mkdir and an fsync of objects/ (a fresh spool's first few hundred stores did)."""
        created = False
        for byte in range(256):
            folder = self.objects / f"{byte:02x}"
            try:
                folder.mkdir(mode=0o700)
                created = True
            except FileExistsError:
                pass
            self._known_dirs.add(folder.name)
        if created:
            _fsync_dir(self.objects)

    def write(self, content: bytes) -> SpooledFile:
        """Write, fsync, rename, fsync the folder; return where the file now safely lives.

        Every reception gets its own file (hash plus a random suffix): deleting one after its
        acknowledgements can never pull the file from under another reception of the same bytes.
        """
        sha256 = hashlib.sha256(content).hexdigest()
        token = secrets.token_hex(6)
        # Paths as strings on this path: pathlib's parsing and hashing cost more than the write of a small instance.
        final = f"{self._objects}/{sha256[:2]}/{sha256}-{token}.dcm"
        tmp = f"{self._tmp}/{sha256}-{token}.part"
        try:
            fd, old_size = self._open_new(tmp)
            try:
                view = memoryview(content)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if old_size > len(content):  # a reused file: what is left of its old content goes
                    os.ftruncate(fd, len(content))
                os.fsync(fd)
            finally:
                os.close(fd)
            folder = self._ensure_folder(sha256[:2])
            os.replace(tmp, final)
            _fsync_dir(folder)
        except OSError as exc:
            _unlink_quietly(tmp)
            _unlink_quietly(final)  # renamed but not durable: no job will point at it
            raise _spool_error(self.root, exc) from exc
        return SpooledFile(final, sha256, len(content))

    def _open_new(self, tmp: str) -> tuple[int, int]:
        """A file at `tmp` to write into: one of our free files moved there (written over in place), else
        a new one. (descriptor, bytes it already holds)"""
        while True:
            with self._free_lock:
                if not self._free:
                    break
                path, size = self._free.pop()
            try:
                os.rename(path, tmp)  # ours alone now, whoever else looks at free/
            except FileNotFoundError:
                continue  # swept meanwhile (clean_partial_writes of a process that started)
            try:
                return os.open(tmp, os.O_WRONLY), size
            except OSError:
                _unlink_quietly(tmp)
                raise
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), 0

    def open_partial(self, hashed: bool = True) -> PartialFile:
        """A file in tmp/ to write a large instance into while it arrives; `adopt` makes it safe.
        `hashed=False`: one only passed on, never adopted (no sha256 worked out on the way)."""
        token = secrets.token_hex(8)
        path = self.tmp / f"stream-{token}.part"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise _spool_error(self.root, exc) from exc
        return PartialFile(self.root, path, fd, hashed)

    def adopt(self, partial: PartialFile) -> SpooledFile:
        """fsync a completely written partial file, move it to objects/ under its hash, fsync the folder."""
        assert partial.hashed, "an unhashed partial file is passed on, never adopted"
        sha256 = partial.hasher.hexdigest()
        final = self.objects / sha256[:2] / f"{sha256}-{secrets.token_hex(6)}.dcm"
        try:
            os.fsync(partial.fd)
            partial.close()
            folder = self._ensure_folder(sha256[:2])
            os.replace(partial.path, final)
            _fsync_dir(folder)
        except OSError as exc:
            partial.discard()
            _unlink_quietly(final)  # renamed but not durable: no job will point at it
            raise _spool_error(self.root, exc) from exc
        partial.adopted = True
        return SpooledFile(str(final), sha256, partial.size)

    def _ensure_folder(self, prefix: str) -> str:
        """objects/`prefix`, made (and objects/ fsynced) if it went missing; its path."""
        folder = f"{self._objects}/{prefix}"
        if prefix not in self._known_dirs:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            _fsync_dir(self.objects)
            self._known_dirs.add(prefix)
        return folder

    def remove(self, path: str | Path) -> None:
        """Let a spool file go once no job needs it: kept in free/ for this process to write over (see
        FREE_FILES_MAX), or deleted. Nothing reads it any more: every job that named it is finished."""
        with self._free_lock:
            keep = len(self._free) < self.keep_free
        if keep:
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                return
            if size <= FREE_FILE_MAX_BYTES:
                free = f"{self._free_folder}/{secrets.token_hex(8)}.free"
                try:
                    os.rename(path, free)
                except FileNotFoundError:
                    return
                with self._free_lock:
                    self._free.append((free, size))
                return
        _unlink_quietly(path)

    def release_free_files(self) -> int:
        """Delete the files kept for reuse (at shutdown); how many."""
        with self._free_lock:
            free, self._free = self._free, []
        for path, _ in free:
            _unlink_quietly(path)
        return len(free)

    def clean_partial_writes(self, older_than_s: float = 600.0) -> int:
        """Remove half-written files left by a crash; they were never acknowledged.

        Only old ones: another process sharing the spool may be writing right now.
        """
        removed = 0
        limit = time.time() - older_than_s
        for leftover in self.tmp.glob("*.part"):
            try:  # ctime: a free file moved here to be written over keeps its old mtime until written
                if leftover.stat().st_ctime < limit:
                    _unlink_quietly(leftover)
                    removed += 1
            except FileNotFoundError:
                continue
        # Files kept for reuse by a process that ended (the ones of the living were moved there lately).
        for leftover in self.free.glob("*.free"):
            try:
                if leftover.stat().st_ctime < limit:
                    _unlink_quietly(leftover)
            except FileNotFoundError:
                continue
        return removed

    def contains(self, path: Path) -> bool:
        try:
            Path(path).resolve().relative_to(self.objects.resolve())
        except ValueError:
            return False
        return True


class PartialFile:
    """An instance being written to the spool's tmp/ as it arrives, hashed on the way."""

    def __init__(self, root: Path, path: Path, fd: int, hashed: bool = True):
        self.root = root
        self.path = path
        self.fd: int | None = fd
        self.hashed = hashed
        self.hasher = hashlib.sha256()
        self.size = 0
        self.adopted = False

    def write(self, data: bytes | memoryview) -> None:
        """SpoolFull or SpoolError when the bytes cannot be written (the file is then discarded)."""
        assert self.fd is not None
        view = memoryview(data)
        if self.hashed:
            self.hasher.update(view)
        self.size += len(view)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            self.discard()
            raise _spool_error(self.root, exc) from exc

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        """Drop the file unless it was adopted; safe to call more than once."""
        self.close()
        if not self.adopted:
            _unlink_quietly(self.path)


def _spool_error(root: Path, exc: OSError) -> SpoolError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return SpoolFull(f"spool {root} is full: {exc.strerror}")
    return SpoolError(f"cannot write to spool {root}: {exc}")


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)  # not Path(...).unlink(): the ack writer removes one per delivered instance
    except FileNotFoundError:
        pass
