"""Pytest fixtures for a real Orthanc farm, and helpers to make small DICOM instances."""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from dicomrouter.pacsfarm import ORTHANC_BINARY, OrthancFarm, free_ports, start_free_farm

__all__ = [
    "ROUTER_AE",
    "WORKSTATION_AE",
    "clean_orthanc_farm",
    "instance_bytes",
    "make_test_instance",
    "orthanc_farm",
    "router_port",
    "workstation_port",
    "write_instance",
    "write_router_config",
]

ROUTER_AE = "DICOMROUTER"
WORKSTATION_AE = "WORKSTATION"
FARM_ENVIRONMENTS = ("test", "test", "prod", "prod")
SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="session")
def router_port() -> int:
    """A free TCP port for the router under test (AE DICOMROUTER at 127.0.0.1)."""
    return free_ports(1)[0]


@pytest.fixture(scope="session")
def workstation_port() -> int:
    """A free TCP port for the WORKSTATION move destination (127.0.0.1)."""
    return free_ports(1)[0]


@pytest.fixture(scope="session")
def orthanc_farm(
    tmp_path_factory: pytest.TempPathFactory, router_port: int, workstation_port: int
) -> Iterator[OrthancFarm]:
    """Four real Orthancs (test, test, prod, prod) on free ports, knowing each other, the router and WORKSTATION."""
    if not ORTHANC_BINARY.exists():
        pytest.skip(f"Orthanc is not installed ({ORTHANC_BINARY} missing; apt-get install orthanc)")
    peers = [(ROUTER_AE, "127.0.0.1", router_port), (WORKSTATION_AE, "127.0.0.1", workstation_port)]
    farm = start_free_farm(tmp_path_factory.mktemp("orthanc-farm"), FARM_ENVIRONMENTS, peers)
    try:
        yield farm
    finally:
        farm.stop_all()


@pytest.fixture
def clean_orthanc_farm(orthanc_farm: OrthancFarm) -> OrthancFarm:
    """The session farm with every server emptied before the test."""
    for server in orthanc_farm:
        server.delete_all()
    return orthanc_farm


def make_test_instance(
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "TEST0001",
    patient_name: str = "Test^Patient",
    modality: str = "CT",
    rows: int = 64,
    cols: int = 64,
    accession_number: str = "ACC0001",
    study_date: str = "20240101",
    study_description: str = "Router test study",
    series_number: int = 1,
    instance_number: int = 1,
) -> Dataset:
    """A small valid image instance (16-bit monochrome) with file meta for explicit VR little endian."""
    sop_class = SOP_CLASSES.get(modality, SECONDARY_CAPTURE)
    sop_uid = sop_uid or generate_uid()
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = "dicomrouter tests"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((i * 7 + instance_number) % 256 for i in range(rows * cols)) * 2
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def write_instance(path: Path | str, ds: Dataset) -> Path:
    """Save `ds` as a DICOM Part 10 file (preamble and file meta); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def instance_bytes(ds: Dataset) -> bytes:
    """`ds` as the bytes of a DICOM Part 10 file, e.g. for OrthancServer.upload()."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def write_router_config(
    path: Path | str,
    farm: OrthancFarm,
    router_port: int,
    workstation_port: int,
    catalog: str = "sqlite:///var/catalog.db",
    spool: str = "var/spool",
) -> Path:
    """Write a router YAML config (scripts/setup_pacs_config.py format) for `farm`; returns the path."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "setup_pacs_config.py"
    spec = importlib.util.spec_from_file_location("setup_pacs_config", script)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render_config(
        [server.spec for server in farm],
        router_port=router_port,
        workstation_port=workstation_port,
        catalog=catalog,
        spool=spool,
    )
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path
