"""WADO-RS from PACS that only move: C-MOVE to the router itself, the PACS calling back (issue 14).

Real peers: an Orthanc of the farm configured `retrieve: move`, and DCMTK's dcmqrscp started with
`--disable-get` (it refuses the C-GET presentation context), which `retrieve: auto` falls back from.
Each study retrieved with dicomweb-client is compared byte for byte with what the PACS holds.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from dicomrouter.pacsfarm import free_ports
from tests.conftest import upgrade_catalog
from tests.farm.test_dicomweb import CLIENTS, _add_web_clients, _multipart_parts
from tests.support.find_peers import server_entry
from tests.support.find_support import edit_config, upload_study
from tests.support.get_refusing_peer import GetRefusingPeer
from tests.support.orthanc_fixtures import (
    ROUTER_AE,
    SOP_CLASSES,
    instance_bytes,
    make_test_instance,
    write_instance,
    write_router_config,
)
from tests.support.orthanc_fixtures import (
    SECONDARY_CAPTURE as SC,
)
from tests.support.router_process import RouterProcess, run_dcmtk, wait_for_port
from tests.support.store_helpers import dataset_bytes
from tests.support.third_party_peers import Dcmqrscp, require

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
STORING_AE = "MODALITY"
NO_GET_AE = "DCMQR_NOGET"
LOST_AE = "DCMQR_LOST"
REFUSER_AE = "GET_REFUSER"
MOVING_ORTHANC = 1  # Test PACS 2 of the farm: `retrieve: move` (the primary is Test PACS 1)


class MoveRouter:
    def __init__(self, router: RouterProcess, url: str, spool: Path):
        self.router = router
        self.url = url
        self.spool = spool

    def session(self) -> requests.Session:
        session = requests.Session()
        session.auth = ("WEBVIEWER", CLIENTS["WEBVIEWER"][0])
        return session

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(self.url, session=self.session())

    def events(self, event: str) -> list[dict]:
        lines = [json.loads(line) for line in self.router.log_text().splitlines() if "{" in line]
        return [line for line in lines if line.get("event") == event]

    def wait_for_events(self, event: str, count: int, timeout: float = 30.0) -> list[dict]:
        """The router's `event` log lines once there are `count` of them (it logs after replying)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(event)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{count} {event} lines expected:\n{self.router.log_tail()}")

    def leftovers(self) -> list[Path]:
        """Anything in the spool: a retrieval writes nothing there but what it spills, then removes."""
        return [p for p in self.spool.rglob("*") if p.is_file()]


@pytest.fixture
def move_router(request, tmp_path, clean_orthanc_farm, router_port, workstation_port):
    """The router in front of the farm (Test PACS 2 `retrieve: move`), dcmqrscp without C-GET
    (`retrieve: auto`), dcmqrscp knowing the router at a port nobody listens on, and a fault
    peer answering C-GET "not supported" (`retrieve: auto`)."""
    require("/usr/bin/dcmqrscp")
    dead_port = free_ports(1)[0]
    no_get = Dcmqrscp(
        tmp_path / "noget",
        NO_GET_AE,
        [(ROUTER_AE, HOST, router_port), (STORING_AE, HOST, free_ports(1)[0])],
        options=["--disable-get"],
    )
    lost = Dcmqrscp(
        tmp_path / "lost",
        LOST_AE,
        [(ROUTER_AE, HOST, dead_port), (STORING_AE, HOST, free_ports(1)[0])],
        options=["--disable-get"],
    )
    refuser = GetRefusingPeer(REFUSER_AE, [], {ROUTER_AE: (HOST, router_port)}, free_ports(1)[0])
    path = write_router_config(
        tmp_path / "dicomrouter.yaml", clean_orthanc_farm, router_port, workstation_port
    )
    change = _add_web_clients(10.0, None)
    change.http_port = free_ports(1)[0]

    def configure(document) -> None:
        change(document)
        # The router takes no CR: a CR sub-operation fails at the PACS (mid-stream failure).
        document["router"]["storage_classes"] = [SOP_CLASSES["CT"], SOP_CLASSES["MR"], SC]
        moving = clean_orthanc_farm[MOVING_ORTHANC].spec.name
        next(s for s in document["servers"] if s["name"] == moving)["retrieve"] = "move"
        document["servers"].append(server_entry("DCMTK no GET", NO_GET_AE, no_get.port))
        document["servers"].append(server_entry("DCMTK lost", LOST_AE, lost.port, retrieve="move"))
        document["servers"].append(server_entry("GET refuser", REFUSER_AE, refuser.port))

    edit_config(path, configure)
    upgrade_catalog(path)
    router = RouterProcess(path, router_port, workers=getattr(request, "param", None))
    try:
        no_get.start()
        lost.start()
        refuser.start()
        router.start()
        wait_for_port(change.http_port)
        yield (
            MoveRouter(
                router, f"http://{HOST}:{change.http_port}/dicom-web", tmp_path / "var" / "spool"
            ),
            no_get,
            lost,
            refuser,
        )
    finally:
        router.stop()
        no_get.stop()
        lost.stop()
        refuser.stop()


def _store_in_dcmqrscp(pacs: Dcmqrscp, folder: Path, study_uid: str, sizes: list[int]) -> list:
    """One series of instances (`sizes`: rows = columns) stored into dcmqrscp by DCMTK storescu."""
    series_uid = generate_uid()
    datasets = [
        make_test_instance(
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id="MOVEONLY",
            instance_number=number,
            rows=size,
            cols=size,
        )
        for number, size in enumerate(sizes, 1)
    ]
    files = [write_instance(folder / f"{ds.SOPInstanceUID}.dcm", ds) for ds in datasets]
    sent = run_dcmtk(
        "storescu",
        "-aet",
        STORING_AE,
        "-aec",
        pacs.ae_title,
        HOST,
        str(pacs.port),
        *map(str, files),
    )
    assert sent.returncode == 0, sent.stderr + pacs.log_text()
    return datasets


def _held_by_dcmqrscp(pacs: Dcmqrscp) -> dict[str, bytes]:
    """SOP Instance UID -> data set bytes of every file dcmqrscp stored."""
    held = {}
    for path in pacs.storage.rglob("*"):
        if path.is_file() and path.name != "index.dat":
            data = path.read_bytes()
            held[str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)] = (
                dataset_bytes(data)
            )
    return held


def _parts_by_sop(reply: requests.Response) -> dict[str, bytes]:
    assert reply.status_code == 200, reply.text
    parts = {}
    for part in _multipart_parts(reply):
        sop = str(pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True).SOPInstanceUID)
        parts[sop] = dataset_bytes(part)
    return parts


def _wado(router: MoveRouter, path: str) -> requests.Response:
    return router.session().get(
        f"{router.url}{path}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=120,
    )


def test_orthanc_configured_move_streams_the_study_byte_for_byte(move_router, clean_orthanc_farm):
    router, *_ = move_router
    pacs = clean_orthanc_farm[MOVING_ORTHANC]
    study = upload_study(pacs, patient_id="MOVEORTHANC", series=2, images=3)

    parts = _parts_by_sop(_wado(router, f"/studies/{study['study']}"))
    assert sorted(parts) == sorted(study["sops"])
    for sop, data in parts.items():
        assert data == dataset_bytes(pacs.download_instance(sop)), sop

    # dicomweb-client: a series and one instance, each by its own C-MOVE to the router.
    client = router.client()
    series = client.retrieve_series(study["study"], study["series"][1])
    assert sorted(ds.SOPInstanceUID for ds in series) == sorted(study["sops"][3:])
    one = client.retrieve_instance(study["study"], study["series"][0], study["sops"][0])
    assert one.SOPInstanceUID == study["sops"][0]
    metadata = client.retrieve_study_metadata(study["study"])
    assert len(metadata) == 6 and all("7FE00010" not in item for item in metadata)

    done = router.wait_for_events("move_to_self_done", 4)
    assert {line["source"] for line in done} == {pacs.spec.name}
    assert all(line["reason"] is None for line in done)
    assert not router.events("retrieve_get_refused")  # configured `move`: C-GET never tried
    # Passed on, not stored: nothing in the spool, nothing forwarded to the primary.
    assert router.leftovers() == []
    assert clean_orthanc_farm[0].instance_sop_uids() == []


def test_auto_falls_back_to_move_once_for_a_pacs_refusing_get(move_router, tmp_path):
    router, no_get, *_ = move_router
    study_uid = generate_uid()
    # Two instances over max_in_memory_dataset (1 MiB): they wait in spool/tmp, as with C-GET.
    sent = _store_in_dcmqrscp(no_get, tmp_path / "sent", study_uid, [16, 1024, 16, 1024])
    held = _held_by_dcmqrscp(no_get)
    assert len(held) == 4

    parts = _parts_by_sop(_wado(router, f"/studies/{study_uid}"))
    assert parts == held
    refused = router.wait_for_events("retrieve_get_refused", 1)
    assert refused[0]["server"] == "DCMTK no GET"

    # Remembered: the next retrieval moves straight away, C-GET is not asked again.
    instances = router.client().retrieve_study(study_uid)
    assert sorted(ds.SOPInstanceUID for ds in instances) == sorted(
        str(ds.SOPInstanceUID) for ds in sent
    )
    router.wait_for_events("move_to_self_done", 2)
    assert len(router.events("retrieve_get_refused")) == 1
    assert router.leftovers() == []


def test_an_instance_no_retrieval_asked_for_is_refused_not_stored(move_router, tmp_path):
    router, no_get, *_ = move_router
    ds = make_test_instance(patient_id="UNASKED")
    path = write_instance(tmp_path / "unasked.dcm", ds)
    # The PACS's own AE title from its host: a known caller, but no move of the router's pending.
    sent = run_dcmtk(
        "storescu",
        "-v",
        "-aet",
        NO_GET_AE,
        "-aec",
        ROUTER_AE,
        HOST,
        str(router.router.port),
        str(path),
    )
    output = sent.stdout + sent.stderr
    assert "Received Store Response (Unknown Status: 0x124)" in output, output  # not authorized
    refusals = router.wait_for_events("store_refused", 1)
    assert "no retrieval from DCMTK no GET is waiting" in refusals[0]["reason"]
    assert router.leftovers() == []


def test_a_pacs_that_cannot_call_back_ends_in_a_clear_error(move_router, tmp_path):
    router, _, lost, _ = move_router
    study_uid = generate_uid()
    _store_in_dcmqrscp(lost, tmp_path / "sent", study_uid, [16, 16])

    reply = _wado(router, f"/studies/{study_uid}")
    assert reply.status_code == 502, reply.text
    assert "DCMTK lost" in reply.text and "DCMTK lost" in reply.headers.get("Warning", "")
    done = router.wait_for_events("move_to_self_done", 1)
    assert done[0]["source"] == "DCMTK lost" and done[0]["reason"]
    sent = router.wait_for_events("wado_sent", 1)
    assert sent[-1]["outcome"] == "failed"
    assert router.leftovers() == []


def test_a_study_cut_short_mid_stream_ends_without_its_closing_boundary(
    move_router, clean_orthanc_farm
):
    router, *_ = move_router
    pacs = clean_orthanc_farm[MOVING_ORTHANC]
    study = upload_study(pacs, patient_id="MOVEHALF", series=1, images=2)
    refused = make_test_instance(study_uid=study["study"], modality="CR", rows=8, cols=8)
    pacs.upload(instance_bytes(refused))

    with router.session().get(
        f"{router.url}/studies/{study['study']}", stream=True, timeout=60
    ) as reply:
        assert reply.status_code == 200  # sent with the first instance, before the failure
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            reply.content  # noqa: B018  (reading the body is the point)
    incomplete = router.wait_for_events("wado_incomplete", 1)
    assert f"{pacs.spec.name} answered 0xC000 to the C-MOVE" in incomplete[0]["reason"]
    assert router.wait_for_events("wado_sent", 1)[-1]["outcome"] == "partial"
    assert router.leftovers() == []


def test_auto_falls_back_when_the_get_itself_is_answered_not_supported(move_router):
    router, *_, refuser = move_router
    study_uid, series_uid = generate_uid(), generate_uid()
    refuser.datasets = [
        make_test_instance(
            study_uid=study_uid, series_uid=series_uid, instance_number=n, rows=8, cols=8
        )
        for n in (1, 2, 3)
    ]
    instances = router.client().retrieve_study(study_uid)
    assert sorted((ds.SOPInstanceUID, ds.PixelData) for ds in instances) == sorted(
        (ds.SOPInstanceUID, ds.PixelData) for ds in refuser.datasets
    )
    refused = router.wait_for_events("retrieve_get_refused", 1)
    assert refused[0]["server"] == "GET refuser" and "0x0122" in refused[0]["reason"]
    assert (refuser.gets, refuser.moves) == (1, 1)
    assert router.leftovers() == []


def test_every_transfer_syntax_comes_as_the_pacs_holds_it(move_router, clean_orthanc_farm):
    """pydicom's transfer-syntax files in the moving Orthanc: the router takes each sub-operation
    in the syntax the PACS proposes first (the one it holds), and WADO-RS returns it unchanged."""
    from tests.farm.test_held_syntax import FILES, elements, load_held_study

    router, *_ = move_router
    pacs = clean_orthanc_farm[MOVING_ORTHANC]
    study = load_held_study(pacs)
    reply = _wado(router, f"/studies/{study['study']}")
    assert reply.status_code == 200, reply.text
    parts = _multipart_parts(reply)
    assert len(parts) == len(FILES)
    for part in parts:
        received = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True)
        syntax = study["instances"][received.SOPInstanceUID][0]
        assert received.file_meta.TransferSyntaxUID == syntax
        held = pacs.download_instance(received.SOPInstanceUID)
        assert elements(part) == elements(held), syntax
    assert router.leftovers() == []


@pytest.mark.parametrize("move_router", [2], indirect=True)
def test_with_two_workers_the_one_the_pacs_calls_hands_the_instances_over(
    move_router, clean_orthanc_farm
):
    """Only worker 0 serves HTTP; the PACS's callback reaches either worker (one
    port). Retrievals repeat until one callback reached worker 1 (with both idle, the
    workers take connections in turn) and every one must be whole."""
    router, *_ = move_router
    pacs = clean_orthanc_farm[MOVING_ORTHANC]
    study = upload_study(pacs, patient_id="MOVEWORKERS", series=1, images=3)
    # Over max_in_memory_dataset: handed over as its spill file's path, not its bytes.
    large = make_test_instance(study_uid=study["study"], rows=1024, cols=1024)
    pacs.upload(instance_bytes(large))
    held = {
        sop: dataset_bytes(pacs.download_instance(sop))
        for sop in [*study["sops"], large.SOPInstanceUID]
    }

    def handed_over() -> bool:
        return any(
            line.get("worker") == 1 and line.get("calling_ae") == pacs.spec.ae_title
            for line in router.events("stores_received")
        )

    for attempt in range(1, 21):
        assert _parts_by_sop(_wado(router, f"/studies/{study['study']}")) == held
        router.wait_for_events("move_to_self_done", attempt)
        if handed_over():
            break
    assert handed_over(), router.router.log_tail()
    assert not router.events("move_handoff_failed")
    assert router.leftovers() == []
