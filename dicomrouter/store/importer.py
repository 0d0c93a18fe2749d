"""`import`: files from disk through the same routing, spool and forwarding as C-STORE."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from dicomrouter.app import RouterApp
from dicomrouter.catalog.models import ForwardJob
from dicomrouter.dicom_file import with_group_length
from dicomrouter.routing.access import Caller
from dicomrouter.store.receive import CANNOT_UNDERSTAND, SUCCESS

IMPORT_CALLER = Caller("DICOMROUTER_IMPORT", "local", "client", frozenset({"admin"}))


@dataclass
class ImportReport:
    sent: list[Path] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)
    not_dicom: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0


def iter_files(paths: list[Path], recursive: bool) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            if recursive:
                for root, _dirs, files in os.walk(path):
                    for name in sorted(files):
                        yield Path(root) / name
            else:
                yield from sorted(p for p in path.iterdir() if p.is_file())
        else:
            yield path


def run_import(
    app: RouterApp,
    files: list[Path],
    to_server: str | None,
    progress: Callable[[Path, int], None] = lambda _p, _n: None,
    wait_timeout_s: float = 3600.0,
) -> ImportReport:
    """Queue every file, forward until each is delivered or dead-lettered, then report."""
    config = app.config
    called_ae = config.server(to_server).ae_title if to_server else config.router.ae_title
    report = ImportReport()
    started = time.monotonic()
    queued: dict[str, Path] = {}  # SOP Instance UID -> file
    receive = app.receive
    for path in files:
        try:
            content = path.read_bytes()
        except OSError as exc:
            report.failed.append((path, f"cannot read: {exc.strerror}"))
            progress(path, 0)
            continue
        report.bytes_read += len(content)
        try:
            content = with_group_length(content)  # the spool keeps files whose meta says where it ends
        except ValueError:
            pass  # receive refuses it and says why
        result = receive.receive(IMPORT_CALLER, called_ae, None, content)
        if result.status == SUCCESS and result.destinations:
            queued[result.sop_instance_uid] = path
        elif result.status == SUCCESS:
            report.duplicates.append(path)
        elif result.status == CANNOT_UNDERSTAND:
            report.not_dicom.append(path)
        else:
            report.failed.append((path, f"0x{result.status:04X} {result.comment}"))
        progress(path, len(content))
    _wait_for_jobs(app, set(queued), wait_timeout_s)
    states = _job_states(app, set(queued))
    for sop_uid, path in queued.items():
        state, error = states.get(sop_uid, ("done", None))
        if state == "done":
            report.sent.append(path)
        elif state == "dead":
            report.failed.append((path, f"dead letter: {error}"))
        else:
            report.failed.append((path, f"still queued ({state}): {error or 'destination not answering'}"))
    report.seconds = time.monotonic() - started
    return report


def _job_states(app: RouterApp, sop_uids: set[str]) -> dict[str, tuple[str, str | None]]:
    """Worst state per SOP Instance UID across destinations (dead > waiting > done)."""
    rank = {"done": 0, "claimed": 1, "pending": 1, "dead": 2}
    result: dict[str, tuple[str, str | None]] = {}
    uids = sorted(sop_uids)
    with app.queue.sessions() as session:
        for start in range(0, len(uids), 500):
            chunk = uids[start : start + 500]
            rows = session.execute(
                select(ForwardJob.sop_instance_uid, ForwardJob.state, ForwardJob.last_error).where(
                    ForwardJob.sop_instance_uid.in_(chunk)
                )
            )
            for sop_uid, state, error in rows:
                current = result.get(sop_uid)
                if current is None or rank[state] > rank[current[0]]:
                    result[sop_uid] = (state, error)
    return result


def _wait_for_jobs(app: RouterApp, sop_uids: set[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while sop_uids and time.monotonic() < deadline:
        states = _job_states(app, sop_uids)
        if all(state in ("done", "dead") for state, _ in states.values()):
            return
        time.sleep(0.1)
