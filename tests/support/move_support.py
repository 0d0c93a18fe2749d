"""Helpers for the C-MOVE / C-GET tests: an in-process front, a DCMTK workstation, movescu runs."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import generate_uid
from ruamel.yaml import YAML

from dicomrouter.app import service_registry
from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.queries import Catalog
from dicomrouter.config import Config, load_config
from dicomrouter.pacsfarm import OrthancServer
from dicomrouter.reload import ConfigHolder
from dicomrouter.scp.front import DicomFront
from tests.support.orthanc_fixtures import (
    ROUTER_AE,
    WORKSTATION_AE,
    instance_bytes,
    make_test_instance,
)
from tests.support.router_process import dcmtk, dcmtk_env, run_dcmtk, wait_for_port


@dataclass
class MoveFront:
    config: Config
    catalog: Catalog
    port: int


@contextmanager
def running_move_front(config_path: Path, port: int) -> Iterator[MoveFront]:
    """The DICOM front with C-ECHO, C-MOVE and C-GET, in this process (until app.py wires them)."""
    config = load_config(config_path)
    catalog = Catalog(session_factory(make_engine(config.router.catalog)))
    catalog.sync_servers(config)
    holder = ConfigHolder(config)
    front = DicomFront(holder, service_registry(holder, catalog, None), host="127.0.0.1", port=port)
    front.start()
    try:
        yield MoveFront(config, catalog, port)
    finally:
        front.stop(drain_timeout_s=5)


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


def upload_study(
    server: OrthancServer, study_uid: str | None = None, series: int = 1, images: int = 2
) -> dict:
    """Upload series x images small instances of one study; returns its UIDs."""
    study_uid = study_uid or generate_uid()
    series_uids, sop_uids = [], []
    for series_number in range(1, series + 1):
        series_uid = generate_uid()
        series_uids.append(series_uid)
        for number in range(1, images + 1):
            ds = make_test_instance(
                study_uid=study_uid,
                series_uid=series_uid,
                series_number=series_number,
                instance_number=number,
                rows=8,
                cols=8,
            )
            sop_uids.append(ds.SOPInstanceUID)
            server.upload(instance_bytes(ds))
    return {"study": study_uid, "series": series_uids, "sops": sop_uids}


def edit_config(path: Path, change) -> Path:
    """Let `change(document)` edit the YAML file in place."""
    yaml = YAML(typ="rt")
    document = yaml.load(path.read_text(encoding="utf-8"))
    change(document)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.dump(document, handle)
    return path
