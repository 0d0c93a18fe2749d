"""The requests a web viewer makes, as OHIF v2 made them in chromium (scripts/viewer_check.py),
through a real `dicomrouter serve` with CORS in front of two Orthancs."""

from __future__ import annotations

import email.parser

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from dicomrouter.http.auth import new_token
from dicomrouter.pacsfarm import free_ports
from tests.conftest import upgrade_catalog
from tests.support.find_support import edit_config, unique, upload_study
from tests.support.orthanc_fixtures import instance_bytes, make_test_instance, write_router_config
from tests.support.router_process import RouterProcess, wait_for_port

pytestmark = pytest.mark.slow
VIEWER_ORIGIN = "http://127.0.0.1:3000"
TOKEN, TOKEN_SHA = new_token()
OHIF_V2_FRAME_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"
OHIF_V3_FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
PIXEL_MODULE = ("00280002", "00280004", "00280010", "00280011", "00280100", "00280101", "00280102")


@pytest.fixture
def viewer_router(tmp_path, clean_orthanc_farm, router_port, workstation_port):
    path = write_router_config(
        tmp_path / "dicomrouter.yaml", clean_orthanc_farm, router_port, workstation_port
    )
    (http_port,) = free_ports(1)

    def change(document) -> None:
        document["router"]["http"] = {
            "host": "127.0.0.1",
            "port": http_port,
            "cors_origins": [VIEWER_ORIGIN],
        }
        document["clients"].append(
            {"ae_title": "VIEWER", "roles": ["test_read"], "http_token_sha256": TOKEN_SHA}
        )

    edit_config(path, change)
    upgrade_catalog(path)
    router = RouterProcess(path, router_port).start()
    try:
        wait_for_port(http_port)
        yield f"http://127.0.0.1:{http_port}/dicom-web"
    finally:
        router.stop()


def _viewer() -> requests.Session:
    session = requests.Session()
    session.headers.update({"Origin": VIEWER_ORIGIN, "Authorization": f"Bearer {TOKEN}"})
    return session


def _values(answer: dict, tag: str) -> list:
    return answer.get(tag, {}).get("Value", [])


def test_a_viewer_lists_studies_of_both_pacs_and_gets_metadata_and_frames(
    viewer_router, clean_orthanc_farm
):
    patient = unique("VIEW")
    ct = upload_study(clean_orthanc_farm[0], patient_id=patient, images=2, size=256)
    mr = upload_study(clean_orthanc_farm[1], patient_id=patient, images=2, size=256, modality="MR")
    viewer = _viewer()

    # The study list: OHIF v2 asks for StudyDescription and Modality (00080060).
    studies = viewer.get(
        f"{viewer_router}/studies",
        params={
            "PatientID": patient,
            "limit": "25",
            "offset": "0",
            "fuzzymatching": "false",
            "includefield": "00081030,00080060",
        },
        headers={"Accept": "application/dicom+json"},
        timeout=30,
    )
    assert studies.status_code == 200, studies.text
    assert studies.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
    by_study = {_values(a, "0020000D")[0]: a for a in studies.json()}
    assert sorted(by_study) == sorted([ct["study"], mr["study"]])
    for study, modality in ((ct, "CT"), (mr, "MR")):
        answer = by_study[study["study"]]
        # An empty Modality (what a STUDY-level C-FIND gives) broke OHIF v2's study list.
        assert "00080060" not in answer
        assert _values(answer, "00080061") == [modality]
        assert _values(answer, "00081030") == ["Router test study"]
        assert _values(answer, "00201208") == [2]  # NumberOfStudyRelatedInstances (IS: a number)

    series = viewer.get(f"{viewer_router}/studies/{mr['study']}/series", timeout=30).json()
    assert [_values(s, "0020000E")[0] for s in series] == mr["series"]
    assert _values(series[0], "00080060") == ["MR"]

    metadata = viewer.get(
        f"{viewer_router}/studies/{ct['study']}/series/{ct['series'][0]}/metadata",
        headers={"Accept": "application/dicom+json"},
        timeout=60,
    )
    assert metadata.status_code == 200, metadata.text
    assert metadata.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
    instances = metadata.json()
    assert len(instances) == 2
    for instance in instances:
        assert all(_values(instance, tag) for tag in PIXEL_MODULE), instance
        assert _values(instance, "00280010") == [256] and "7FE00010" not in instance

    instance = (
        f"{viewer_router}/studies/{mr['study']}/series/{mr['series'][0]}/instances/{mr['sops'][1]}"
    )
    pixels = make_test_instance(rows=256, cols=256, instance_number=2).PixelData
    for accept in (OHIF_V2_FRAME_ACCEPT, OHIF_V3_FRAME_ACCEPT):
        reply = viewer.get(
            f"{instance}/frames/1",
            headers={"Accept": accept},
            timeout=60,
        )
        assert reply.status_code == 200, (accept, reply.text)
        assert reply.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
        head = f"Content-Type: {reply.headers['Content-Type']}\r\n\r\n".encode()
        message = email.parser.BytesParser().parsebytes(head + reply.content)
        (part,) = message.get_payload()
        assert "transfer-syntax=1.2.840.10008.1.2.1" in part["Content-Type"]
        assert part.get_payload(decode=True) == pixels  # 256 x 256 x 16 bits, as stored

    # Rendered images are not served: a plain 404 (with CORS, so the viewer sees it), never a 500.
    for path in (f"{instance}/rendered", f"{instance}/thumbnail", f"{instance}/frames/1/rendered"):
        reply = viewer.get(path, headers={"Accept": "image/jpeg"}, timeout=30)
        assert reply.status_code == 404, path
        assert reply.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN


def test_metadata_references_large_values_by_bulk_data_uri_and_serves_them(
    viewer_router, clean_orthanc_farm
):
    """A 12-bit VOI LUT (8 KiB of LUT Data) used to be left out of /metadata; a viewer now finds
    a BulkDataURI there and gets the bytes as the PACS holds them (dicomweb-client as the client)."""
    ds = make_test_instance(patient_id=unique("VLUT"), modality="CR", rows=256, cols=256)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.add_new(0x00283006, "OW", b"".join(n.to_bytes(2, "little") for n in range(4096)))
    lut.LUTExplanation = "LINEAR"
    ds.VOILUTSequence = [lut]
    clean_orthanc_farm[1].upload(instance_bytes(ds))
    client = DICOMwebClient(viewer_router, headers={"Authorization": f"Bearer {TOKEN}"})

    metadata = client.retrieve_instance_metadata(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    (item,) = metadata["00283010"]["Value"]
    uri = item["00283006"]["BulkDataURI"]
    assert uri == (
        f"{viewer_router}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/bulkdata/00283010/0/00283006"
    )
    assert _values(item, "00283002") == [4096, 0, 12]  # small values stay inline
    assert "7FE00010" not in metadata  # pixel data: frame by frame, not bulk data
    assert client.retrieve_bulkdata(uri) == [lut[0x00283006].value]
    single = _viewer().get(uri, headers={"Accept": "application/octet-stream"}, timeout=60)
    assert single.status_code == 200 and single.content == lut[0x00283006].value
    missing = _viewer().get(uri.replace("/0/", "/3/"), timeout=60)
    assert missing.status_code == 404
