"""Helpers for the C-MOVE / C-GET tests: an in-process front, a DCMTK workstation, movescu runs."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import generate_uid

from tests.support.orthanc_fixtures import (
    ROUTER_AE,
    WORKSTATION_AE,
    make_test_instance,
)
from tests.support.router_process import dcmtk, dcmtk_env, run_dcmtk, wait_for_port


@contextmanager
def workstation(
    port: int, folder: Path, log_path: Path | None = None, options: tuple[str, ...] = ()
) -> Iterator[Path]:
    """DCMTK storescp as WORKSTATION on `port`, writing what it receives to `folder`.

    With `log_path`, storescp runs with -d and its dump of every request goes there. `options`:
    more storescp options (`+xa` every transfer syntax, `-B` data sets written as received).
    """
    folder.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    debug = ["-d"] if log_path else []
    process = subprocess.Popen(
        [
            dcmtk("storescp"),
            *debug,
            *options,
            "-aet",
            WORKSTATION_AE,
            "-od",
            str(folder),
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL,
        env=dcmtk_env(),
    )
    if log_path:
        log.close()
    try:
        wait_for_port(port, timeout=10)
        yield folder
    finally:
        process.terminate()
        process.wait(timeout=10)


def received_sop_uids(folder: Path) -> set[str]:
    """SOP Instance UIDs of the files storescp wrote (named MODALITY.SOPUID)."""
    return {path.name.split(".", 1)[1] for path in folder.iterdir() if "." in path.name}


@dataclass
class RetrieveRun:
    output: str
    returncode: int

    def _last(self, pattern: str) -> str | None:
        """The last match in the output: the final response comes last."""
        matches = re.findall(pattern, self.output)
        return matches[-1] if matches else None

    @property
    def status(self) -> int | None:
        value = self._last(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")
        return int(value, 16) if value else None

    def count(self, word: str) -> int | None:
        value = self._last(rf"{word} Suboperations\s*:\s*(\d+)")
        return int(value) if value else None

    @property
    def error_comment(self) -> str:
        return self._last(r"\(0000,0902\) LO \[(.*?)\s*\]") or ""


def movescu(
    port: int, *keys: str, destination: str = WORKSTATION_AE, model: str = "-S", timeout: float = 60
) -> RetrieveRun:
    """DCMTK movescu as the workstation, asking the router to move to `destination`."""
    args = ["-d", "-aet", WORKSTATION_AE, "-aec", ROUTER_AE, "-aem", destination, model]
    for key in keys:
        args += ["-k", key]
    result = run_dcmtk("movescu", *args, "127.0.0.1", str(port), timeout=timeout)
    return RetrieveRun(result.stdout + result.stderr, result.returncode)


def getscu(
    port: int,
    folder: Path,
    *keys: str,
    model: str = "-S",
    timeout: float = 60,
    options: tuple[str, ...] = (),
) -> RetrieveRun:
    """DCMTK getscu as the workstation, writing what it gets to `folder` (`options`: more getscu
    options, such as a preferred transfer syntax)."""
    folder.mkdir(parents=True, exist_ok=True)
    args = ["-d", *options, "-aet", WORKSTATION_AE, "-aec", ROUTER_AE, model, "-od", str(folder)]
    for key in keys:
        args += ["-k", key]
    result = run_dcmtk("getscu", *args, "127.0.0.1", str(port), timeout=timeout)
    return RetrieveRun(result.stdout + result.stderr, result.returncode)


def make_series(study_uid: str, images: int, patient_id: str = "TEST0001", series_number: int = 1):
    """`images` instances of one new series of `study_uid`."""
    series_uid = generate_uid()
    return [
        make_test_instance(
            study_uid=study_uid,
            series_uid=series_uid,
            series_number=series_number,
            instance_number=number,
            patient_id=patient_id,
            rows=8,
            cols=8,
        )
        for number in range(1, images + 1)
    ]


