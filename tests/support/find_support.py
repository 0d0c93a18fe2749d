"""Helpers for the federated C-FIND tests: an in-process front, findscu runs, uploads."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.uid import generate_uid

from dicomrouter.app import service_registry
from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.queries import Catalog
from dicomrouter.catalog.schema import upgrade
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
from tests.support.router_process import run_dcmtk
from tests.support.store_helpers import edit_config  # noqa: F401  (one home; re-exported for the find/move tests)

_counter = itertools.count(1)


@dataclass
class FrontUnderTest:
    config: Config
    catalog: Catalog | None
    port: int


@contextmanager
def running_front(
    config_path: Path, port: int, with_catalog: bool = True
) -> Iterator[FrontUnderTest]:
    """The DICOM front with C-ECHO and the find bindings, in this process (until app.py wires them)."""
    config = load_config(config_path)
    catalog = None
    if with_catalog:
        engine = make_engine(config.router.catalog)
        upgrade(engine)
        catalog = Catalog(session_factory(engine))
        catalog.sync_servers(config)
    holder = ConfigHolder(config)
    front = DicomFront(holder, service_registry(holder, catalog, None), host="127.0.0.1", port=port)
    front.start()
    try:
        yield FrontUnderTest(config, catalog, port)
    finally:
        front.stop(drain_timeout_s=5)


@dataclass
class FindRun:
    final: str  # findscu's words for the final status, e.g. "Success"
    answers: list[Dataset]
    output: str

    def values(self, keyword: str) -> list[str]:
        return sorted(str(a.get(keyword, "")) for a in self.answers)

    @property
    def error_comment(self) -> str:
        match = re.search(r"\(0000,0902\) LO \[(.*?)\s*\]", self.output)
        return match.group(1) if match else ""

    @property
    def status(self) -> int | None:
        match = re.search(
            r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", self.output.split("Received Final")[-1]
        )
        return int(match.group(1), 16) if match else None


def findscu(
    port: int,
    *keys: str,
    model: str = "-S",
    tmp: Path,
    aet: str = WORKSTATION_AE,
    aec: str = ROUTER_AE,
    extra: tuple[str, ...] = (),
    debug: bool = False,
    timeout: float = 60,
) -> FindRun:
    """DCMTK findscu as the workstation; every answer written with -X and read back."""
    out_dir = tmp / f"answers-{next(_counter)}"
    out_dir.mkdir(parents=True)
    args = [
        "-d" if debug else "-v",
        "-aet",
        aet,
        "-aec",
        aec,
        model,
        "-X",
        "-od",
        str(out_dir),
        *extra,
    ]
    for key in keys:
        args += ["-k", key]
    result = run_dcmtk("findscu", *args, "127.0.0.1", str(port), timeout=timeout)
    output = result.stdout + result.stderr
    match = re.search(r"Received Final Find Response(?: \(([^)]*)\))?", output)
    final = (match.group(1) or "") if match else f"no final response (exit {result.returncode})"
    answers = [pydicom.dcmread(path) for path in sorted(out_dir.glob("rsp*"))]
    return FindRun(final, answers, output)


def upload_study(
    server: OrthancServer,
    *,
    study_uid: str | None = None,
    patient_id: str = "P",
    patient_name: str = "Test^Patient",
    series: int = 1,
    images: int = 1,
    charset: str | None = None,
    size: int = 8,
    **attrs,
) -> dict[str, list[str] | str]:
    """Upload one study (series x images of size x size pixels) to `server`; returns its UIDs."""
    study_uid = study_uid or generate_uid()
    series_uids, sop_uids = [], []
    for series_number in range(1, series + 1):
        series_uid = generate_uid()
        series_uids.append(series_uid)
        for number in range(1, images + 1):
            ds = make_test_instance(
                study_uid=study_uid,
                series_uid=series_uid,
                patient_id=patient_id,
                patient_name=patient_name,
                series_number=series_number,
                instance_number=number,
                rows=size,
                cols=size,
                **attrs,
            )
            if charset:
                ds.SpecificCharacterSet = charset
            sop_uids.append(ds.SOPInstanceUID)
            server.upload(instance_bytes(ds))
    return {"study": study_uid, "series": series_uids, "sops": sop_uids}


def unique(prefix: str) -> str:
    """A patient ID no other test uses."""
    return f"{prefix}{next(_counter):03d}{generate_uid()[-6:]}"
