"""Storage Commitment Push Model through the router, with real peers: an Orthanc modality storing with
`"StorageCommitment": true`, the Orthanc farm as destinations (one of them a commitment SCP itself),
pynetdicom as an independent SCU that takes its report on a new association."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicomrouter.pacsfarm import OrthancServer, OrthancSpec, free_ports
from tests.orthanc_fixtures import ROUTER_AE, instance_bytes, make_test_instance
from tests.router_process import RouterProcess
from tests.store_helpers import edit_config, fast_retries

pytestmark = pytest.mark.slow

CT = "1.2.840.10008.5.1.4.1.1.2"


def _wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="module")
def modality(tmp_path_factory, router_port) -> Iterator[OrthancServer]:
    """An Orthanc acting as the modality: the router is in its DicomModalities."""
    dicom_port, http_port = free_ports(2)
    server = OrthancServer(
        OrthancSpec("Modality", "MODALITY", dicom_port, http_port),
        tmp_path_factory.mktemp("modality"),
        peers=[(ROUTER_AE, "127.0.0.1", router_port)],
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pynetdicom_port() -> int:
    return free_ports(1)[0]


def commitment_config(farm_config: Path, modality: OrthancServer, pynetdicom_port: int, **settings) -> Path:
    def change(data):
        fast_retries(data)
        data["router"]["storage_commitment"] = {
            "poll_interval": 0.2, "report_retry_initial": 0.5, "report_retry_max": 2, **settings
        }
        data["clients"] += [
            {"ae_title": "MODALITY", "host": "127.0.0.1", "port": modality.spec.dicom_port, "roles": ["test_write"]},
            {"ae_title": "READER", "host": "127.0.0.1", "roles": ["test_read"]},
            {"ae_title": "PYSCU", "host": "127.0.0.1", "port": pynetdicom_port, "roles": ["test_write"]},
        ]
        data["routes"] = [{"name": "CT to Test PACS 1", "match": {"Modality": "CT"}, "destinations": ["Test PACS 1"]}]

    return edit_config(farm_config, change)


def _upload(modality: OrthancServer, count: int = 2) -> tuple[list[str], list[str]]:
    """Instances in the modality Orthanc: their Orthanc IDs and SOP Instance UIDs."""
    study_uid, series_uid = generate_uid(), generate_uid()
    ids, uids = [], []
    for index in range(count):
        ds = make_test_instance(study_uid=study_uid, series_uid=series_uid, instance_number=index + 1)
        ids.append(modality.upload(instance_bytes(ds))["ID"])
        uids.append(str(ds.SOPInstanceUID))
    return ids, uids


def _store_with_commitment(modality: OrthancServer, ids: list[str]) -> str:
    answer = modality.post_json(
        f"/modalities/{ROUTER_AE}/store", {"Resources": ids, "StorageCommitment": True, "Synchronous": True}
    )
    return answer["StorageCommitmentTransactionUID"]


def _commitment(modality: OrthancServer, transaction_uid: str) -> dict:
    return modality.get_json(f"/storage-commitment/{transaction_uid}")


def _final(modality: OrthancServer, transaction_uid: str, timeout: float = 60.0) -> dict:
    return _wait_for(
        lambda: (lambda c: c if c.get("Status") != "Pending" else None)(_commitment(modality, transaction_uid)),
        timeout,
    )


@pytest.fixture
def commitment_router(farm_config, modality, pynetdicom_port, router_port, request) -> Iterator[RouterProcess]:
    settings = getattr(request, "param", {})
    router = RouterProcess(commitment_config(farm_config, modality, pynetdicom_port, **settings), router_port)
    router.start()
    try:
        yield router
    finally:
        router.stop()


def test_orthanc_modality_gets_success_once_the_destination_holds_everything(
    commitment_router, modality, clean_orthanc_farm
):
    ids, uids = _upload(modality, 3)
    transaction_uid = _store_with_commitment(modality, ids)
    result = _final(modality, transaction_uid)
    print("Orthanc modality, destination up:", json.dumps(result))
    assert result["Status"] == "Success", result
    destination = clean_orthanc_farm["Test PACS 1"]
    assert set(uids) <= set(destination.instance_sop_uids())
    listing = json.loads(commitment_router.cli("commitments", "list", "--json").stdout)
    assert [row["transaction_uid"] for row in listing] == [transaction_uid]
    assert listing[0]["state"] == "reported" and listing[0]["event_type"] == 1
