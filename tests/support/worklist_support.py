"""Modality Worklist peers for tests: Orthancs with Debian's worklist plugin, and the items they serve."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomrouter.pacsfarm import ORTHANC_BINARY, OrthancFarm, OrthancServer, OrthancSpec, free_ports
from tests.support.find_peers import server_entry

# Shipped by Debian's `orthanc` package itself (dpkg -L orthanc | grep -i worklist).
WORKLIST_PLUGIN = Path("/usr/share/orthanc/plugins/libModalityWorklists.so")
WORKLIST_FIND_SOP_CLASS = "1.2.840.10008.5.1.4.31"


@dataclass
class WorklistServer:
    """An Orthanc answering Modality Worklist C-FINDs from the .wl files in `folder`."""

    orthanc: OrthancServer
    folder: Path

    @property
    def ae_title(self) -> str:
        return self.orthanc.spec.ae_title

    @property
    def port(self) -> int:
        return self.orthanc.spec.dicom_port

    def serve(self, items: Sequence[Dataset]) -> None:
        """Replace the worklist with `items` (the plugin reads the folder at every query)."""
        for old in self.folder.glob("*.wl"):
            old.unlink()
        for number, item in enumerate(items, 1):
            write_worklist_file(self.folder / f"item{number}.wl", item)

    def router_entry(self, primary: bool = False) -> dict:
        """This server as a `servers:` item of a router config."""
        return {
            **server_entry(self.orthanc.spec.name, self.ae_title, self.port, worklist=True),
            "primary": primary,
        }


@contextmanager
def worklist_orthancs(base_dir: Path, count: int) -> Iterator[list[WorklistServer]]:
    """`count` Orthancs with the worklist plugin on free ports, started in parallel; always stopped."""
    if not ORTHANC_BINARY.exists():
        pytest.skip(f"Orthanc is not installed ({ORTHANC_BINARY} missing; apt-get install orthanc)")
    assert WORKLIST_PLUGIN.exists(), (
        f"{WORKLIST_PLUGIN} is missing: Debian's orthanc package ships it"
    )
    ports = free_ports(2 * count)
    servers = []
    for index in range(count):
        spec = OrthancSpec(
            f"RIS {index + 1}", f"RIS_{index + 1}", ports[2 * index], ports[2 * index + 1]
        )
        folder = base_dir / spec.slug / "worklists"
        folder.mkdir(parents=True)
        extra = {
            "Plugins": [str(WORKLIST_PLUGIN)],
            "Worklists": {"Enable": True, "Database": str(folder)},
        }
        servers.append(
            WorklistServer(OrthancServer(spec, base_dir / spec.slug, extra_config=extra), folder)
        )
    farm = OrthancFarm([server.orthanc for server in servers])
    farm.start_all()
    try:
        yield servers
    finally:
        farm.stop_all()


def worklist_item(
    accession: str,
    procedure_id: str,
    study_uid: str,
    modality: str,
    step_id: str | None,
    *,
    patient_id: str = "WL0001",
    patient_name: str = "Worklist^Patient",
    station_ae: str = "SCANNER1",
    start_time: str = "080000",
) -> Dataset:
    """One worklist item: one scheduled procedure step of one requested procedure."""
    item = Dataset()
    item.SpecificCharacterSet = "ISO_IR 100"
    item.PatientName = patient_name
    item.PatientID = patient_id
    item.PatientBirthDate = "19700101"
    item.PatientSex = "O"
    item.AccessionNumber = accession
    item.RequestedProcedureID = procedure_id
    item.RequestedProcedureDescription = f"{accession} procedure"
    item.StudyInstanceUID = study_uid
    step = Dataset()
    step.Modality = modality
    step.ScheduledStationAETitle = station_ae
    step.ScheduledProcedureStepStartDate = "20260101"
    step.ScheduledProcedureStepStartTime = start_time
    step.ScheduledProcedureStepDescription = f"{modality} step"
    if step_id is not None:
        step.ScheduledProcedureStepID = step_id
    item.ScheduledProcedureStepSequence = [step]
    return item


def pet_ct_procedure(accession: str, step_ids: bool = True) -> list[Dataset]:
    """A PET/CT exam: one requested procedure (accession, procedure ID, study UID), a PT and a CT step."""
    study_uid = generate_uid()
    return [
        worklist_item(
            accession, "RP1", study_uid, "PT", "SPS1" if step_ids else None, station_ae="PETCT1"
        ),
        worklist_item(
            accession, "RP1", study_uid, "CT", "SPS2" if step_ids else None, station_ae="PETCT1"
        ),
    ]


def write_worklist_file(path: Path, item: Dataset) -> Path:
    """`item` as a DICOM file the Orthanc worklist plugin reads (the caller's item gets no file meta)."""
    stored = Dataset()
    stored.update(item)
    stored.file_meta = FileMetaDataset()
    stored.file_meta.MediaStorageSOPClassUID = WORKLIST_FIND_SOP_CLASS
    stored.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    stored.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    stored.save_as(path, enforce_file_format=True)
    return path
