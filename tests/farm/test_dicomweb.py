"""DICOMweb through a real `dicomrouter serve` in front of real Orthancs, with dicomweb-client."""

from __future__ import annotations

import email.parser
import hashlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

from dicomrouter.dicom_file import dataset_offset
from dicomrouter.pacsfarm import OrthancServer, OrthancSpec, free_ports
from tests.conftest import upgrade_catalog
from tests.support.find_peers import SilentPeer, server_entry
from tests.support.find_support import edit_config, unique, upload_study
from tests.support.orthanc_fixtures import instance_bytes, make_test_instance, write_router_config
from tests.support.router_process import RouterProcess, wait_for_port

pytestmark = pytest.mark.slow
LARGE_INSTANCE_BYTES = 1024 * 1024

# client AE -> (token, roles)
CLIENTS = {
    "WEBVIEWER": ("viewer-token", ["test_read", "test_write", "prod_read", "prod_write"]),
    "TESTVIEWER": ("test-token", ["test_read", "test_write"]),
    "READER": ("reader-token", ["test_read", "prod_read"]),
}


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class WebRouter:
    def __init__(self, router: RouterProcess, url: str, spool: Path):
        self.router = router
        self.url = url
        self.spool = spool

    def session(self, ae_title: str) -> requests.Session:
        session = requests.Session()
        session.auth = (ae_title, CLIENTS[ae_title][0])
        return session

    def client(self, ae_title: str) -> DICOMwebClient:
        return DICOMwebClient(self.url, session=self.session(ae_title))


def _add_web_clients(find_timeout: float, silent_port: int | None):
    def change(document) -> None:
        document["router"]["find_timeout"] = find_timeout
        # Instances over 1 MiB take the spill paths (C-GET to a file, STOW parts to the spool).
        document["router"]["max_in_memory_dataset"] = LARGE_INSTANCE_BYTES
        document["router"]["http"] = {"host": "127.0.0.1", "port": change.http_port}
        for ae_title, (token, roles) in CLIENTS.items():
            document["clients"].append(
                {"ae_title": ae_title, "roles": roles, "http_token_sha256": _sha(token)}
            )
        if silent_port is not None:
            document["servers"].append(server_entry("Hung PACS", "HUNG_PACS", silent_port))

    return change


@pytest.fixture
def web_router(tmp_path, clean_orthanc_farm, router_port, workstation_port):
    silent = SilentPeer().start()
    path = write_router_config(
        tmp_path / "dicomrouter.yaml", clean_orthanc_farm, router_port, workstation_port
    )
    change = _add_web_clients(2.0, silent.port)
    change.http_port = free_ports(1)[0]
    edit_config(path, change)
    upgrade_catalog(path)
    router = RouterProcess(path, router_port)
    try:
        router.start()
        wait_for_port(change.http_port)
        yield WebRouter(
            router, f"http://127.0.0.1:{change.http_port}/dicom-web", tmp_path / "var" / "spool"
        )
    finally:
        router.stop()
        silent.stop()


def _study_uids(answers) -> list[str]:
    return [answer["0020000D"]["Value"][0] for answer in answers]


def test_qido_union_of_two_pacs_each_study_once_and_access_narrows_it(
    web_router, clean_orthanc_farm
):
    test1, test2, prod1 = clean_orthanc_farm[0], clean_orthanc_farm[1], clean_orthanc_farm[2]
    patient = unique("DW")
    both = upload_study(test1, patient_id=patient, patient_name="Müller^Jörg", series=2, images=2)
    for ds_bytes in [test1.download_instance(sop) for sop in both["sops"]]:
        test2.upload(ds_bytes)  # the same study on a second PACS
    only2 = upload_study(test2, patient_id=patient)
    in_prod = upload_study(prod1, patient_id=patient)
    client = web_router.client("WEBVIEWER")

    studies = client.search_for_studies(search_filters={"PatientID": patient})
    assert sorted(_study_uids(studies)) == sorted([both["study"], only2["study"], in_prod["study"]])
    merged = next(a for a in studies if a["0020000D"]["Value"][0] == both["study"])
    assert (
        merged["00100010"]["Value"][0]["Alphabetic"] == "Müller^Jörg"
    )  # UTF-8 JSON from Latin-1 PACS
    assert merged["00081190"]["Value"][0] == f"{web_router.url}/studies/{both['study']}"

    series = client.search_for_series(both["study"])
    assert sorted(s["0020000E"]["Value"][0] for s in series) == sorted(both["series"])
    instances = client.search_for_instances(both["study"], both["series"][0])
    assert len(instances) == 2
    limited = client.search_for_studies(search_filters={"PatientID": patient}, limit=1, offset=1)
    assert len(limited) == 1
    ranged = client.search_for_studies(
        search_filters={"PatientID": patient, "StudyDate": "20231201-20240102"}
    )
    assert len(ranged) == 3
    listed = client.search_for_studies(
        search_filters={"StudyInstanceUID": f"{both['study']},{only2['study']}"}
    )
    assert sorted(_study_uids(listed)) == sorted([both["study"], only2["study"]])

    test_only = web_router.client("TESTVIEWER").search_for_studies(
        search_filters={"PatientID": patient}
    )
    assert sorted(_study_uids(test_only)) == sorted([both["study"], only2["study"]])


def test_qido_command_line_and_credentials(web_router, clean_orthanc_farm):
    patient = unique("DWCLI")
    study = upload_study(clean_orthanc_farm[0], patient_id=patient)
    token = CLIENTS["WEBVIEWER"][0]
    result = subprocess.run(
        # The package's console script is dicomweb_client.cli:_main (the module has no __main__).
        [
            sys.executable,
            "-c",
            "from dicomweb_client.cli import _main; _main()",
            "--url",
            web_router.url,
            "--user",
            "WEBVIEWER",
            "--password",
            token,
            "search",
            "studies",
            "--filter",
            f"PatientID={patient}",
            "--prettify",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert study["study"] in result.stdout
    assert requests.get(f"{web_router.url}/studies", timeout=10).status_code == 401
    wrong = requests.get(f"{web_router.url}/studies", auth=("WEBVIEWER", "nope"), timeout=10)
    assert wrong.status_code == 401


def test_qido_hung_pacs_gives_partial_results_and_a_warning_within_find_timeout(
    web_router, clean_orthanc_farm
):
    patient = unique("DWHUNG")
    study = upload_study(clean_orthanc_farm[0], patient_id=patient)
    started = time.monotonic()
    reply = web_router.session("WEBVIEWER").get(
        f"{web_router.url}/studies", params={"PatientID": patient}, timeout=30
    )
    elapsed = time.monotonic() - started
    assert reply.status_code == 200
    assert _study_uids(reply.json()) == [study["study"]]
    assert "Hung PACS" in reply.headers.get("Warning", "")
    assert elapsed < 2.0 + 1.0


def _multipart_parts(reply: requests.Response) -> list[bytes]:
    """Parts of a multipart/related answer, split by the standard library (not our reader)."""
    head = f"Content-Type: {reply.headers['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser().parsebytes(head + reply.content)
    assert message.is_multipart()
    return [part.get_payload(decode=True) for part in message.get_payload()]


def test_wado_retrieves_a_study_split_over_two_pacs_byte_for_byte(web_router, clean_orthanc_farm):
    test1, test2 = clean_orthanc_farm[0], clean_orthanc_farm[1]
    study_uid = generate_uid()
    first = upload_study(test1, study_uid=study_uid, patient_id=unique("DWW"), series=2, images=3)
    second = upload_study(test2, study_uid=study_uid, patient_id="X", series=1, images=2)
    reply = web_router.session("WEBVIEWER").get(
        f"{web_router.url}/studies/{study_uid}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    parts = _multipart_parts(reply)
    assert len(parts) == len(first["sops"]) + len(second["sops"])
    for part in parts:
        sop = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True).SOPInstanceUID
        holder = test1 if sop in first["sops"] else test2
        original = holder.download_instance(sop)
        assert part[dataset_offset(part) :] == original[dataset_offset(original) :], sop

    client = web_router.client("WEBVIEWER")
    series = client.retrieve_series(study_uid, first["series"][1])
    assert sorted(ds.SOPInstanceUID for ds in series) == sorted(first["sops"][3:])
    one = client.retrieve_instance(study_uid, second["series"][0], second["sops"][0])
    assert one.SOPInstanceUID == second["sops"][0]
    metadata = client.retrieve_study_metadata(study_uid)
    assert len(metadata) == 8 and all("7FE00010" not in item for item in metadata)
    # Unknown study: with a PACS that did not answer, the router cannot say "not found".
    missing = web_router.session("WEBVIEWER").get(f"{web_router.url}/studies/1.2.3.999", timeout=30)
    assert missing.status_code == 502 and "Hung PACS" in missing.text
    # A client that may read only test servers cannot retrieve a prod study.
    prod = upload_study(clean_orthanc_farm[2], patient_id="P")
    refused = web_router.session("TESTVIEWER").get(
        f"{web_router.url}/studies/{prod['study']}", timeout=30
    )
    assert refused.status_code in (404, 502) and not refused.content.startswith(b"--")


def test_stow_stores_through_routing_to_the_primary(web_router, clean_orthanc_farm):
    primary = clean_orthanc_farm[0]
    study_uid, series_uid = generate_uid(), generate_uid()
    datasets = [
        make_test_instance(
            study_uid=study_uid, series_uid=series_uid, instance_number=n, rows=8, cols=8
        )
        for n in range(1, 4)
    ]
    client = web_router.client("WEBVIEWER")
    response = client.store_instances(datasets)
    assert len(response.ReferencedSOPSequence) == 3
    assert "FailedSOPSequence" not in response
    assert primary.wait_for_instance_count(3, timeout=30) == 3
    assert primary.download_instance(datasets[0].SOPInstanceUID)

    # With the study in the URL, an instance of another study fails; the others are stored (202).
    other = make_test_instance(rows=8, cols=8)
    good = make_test_instance(
        study_uid=study_uid, series_uid=series_uid, instance_number=9, rows=8, cols=8
    )
    session = web_router.session("WEBVIEWER")
    reply = _post_stow(session, f"{web_router.url}/studies/{study_uid}", [good, other])
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert body["00081198"]["Value"][0]["00081155"]["Value"] == [other.SOPInstanceUID]
    assert primary.wait_for_instance_count(4, timeout=30) == 4


def _post_stow(session: requests.Session, url: str, datasets) -> requests.Response:
    boundary = "stow-test-boundary"
    body = b""
    for ds in datasets:
        body += (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + instance_bytes(ds)
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    return session.post(url, data=body, headers=headers, timeout=60)


def test_stow_without_write_role_is_403_and_nothing_is_spooled(web_router):
    ds = make_test_instance(rows=8, cols=8)
    reply = _post_stow(web_router.session("READER"), f"{web_router.url}/studies", [ds])
    assert reply.status_code == 403
    assert not [p for p in (web_router.spool / "objects").rglob("*") if p.is_file()]
    assert not list((web_router.spool / "tmp").glob("*"))
    unauthenticated = requests.post(f"{web_router.url}/studies", data=b"", timeout=10)
    assert unauthenticated.status_code == 401
    # A test-only client storing to the (test) primary is fine; the audit names the refusals.
    audit = web_router.router.audit_until(
        lambda rows: any(row.get("outcome") == "refused" and row.get("calling_ae") == "READER" for row in rows)
    )
    assert any(
        row.get("outcome") == "refused" and row.get("calling_ae") == "READER" for row in audit
    )


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.fixture
def orthanc_web_client(tmp_path, web_router):
    """An Orthanc whose DICOMweb plugin names the router as a DICOMweb server (a client of it)."""
    if not DICOMWEB_PLUGIN.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{DICOMWEB_PLUGIN} missing: scripts/install.sh installs orthanc-dicomweb")
        pytest.skip(f"{DICOMWEB_PLUGIN} missing (apt-get install orthanc-dicomweb)")
    dicom_port, http_port = free_ports(2)
    router_server = {
        "Url": web_router.url + "/",
        "Username": "WEBVIEWER",
        "Password": CLIENTS["WEBVIEWER"][0],
    }
    extra = {
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Servers": {"router": router_server}},
    }
    server = OrthancServer(
        OrthancSpec("Web Client", "WEBCLIENT", dicom_port, http_port),
        tmp_path / "webclient",
        extra_config=extra,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_orthanc_dicomweb_plugin_queries_retrieves_and_stores_through_the_router(
    orthanc_web_client, web_router, clean_orthanc_farm
):
    patient = unique("DWORTH")
    study = upload_study(clean_orthanc_farm[1], patient_id=patient, series=2, images=2)
    found = orthanc_web_client.post_json(
        "/dicom-web/servers/router/qido", {"Uri": "/studies", "Arguments": {"PatientID": patient}}
    )
    # Orthanc's REST answer simplifies DICOM JSON: one value per attribute, not a list.
    assert [answer["0020000D"]["Value"] for answer in found] == [study["study"]]
    assert found[0]["00080054"]["Value"] == "DICOMROUTER"  # retrieve from the router, not the PACS

    orthanc_web_client.post_json(
        "/dicom-web/servers/router/retrieve",
        {"Resources": [{"Study": study["study"]}], "Synchronous": True},
    )
    assert sorted(orthanc_web_client.instance_sop_uids()) == sorted(study["sops"])
    for sop in study["sops"]:
        got, original = (
            orthanc_web_client.download_instance(sop),
            clean_orthanc_farm[1].download_instance(sop),
        )
        assert got[dataset_offset(got) :] == original[dataset_offset(original) :]

    new = make_test_instance(patient_id=patient, rows=8, cols=8)
    uploaded = orthanc_web_client.upload(instance_bytes(new))
    orthanc_web_client.post_json(
        "/dicom-web/servers/router/stow", {"Resources": [uploaded["ID"]], "Synchronous": True}
    )
    assert new.SOPInstanceUID in _wait_for_sop(clean_orthanc_farm[0], new.SOPInstanceUID)


def _wait_for_sop(server, sop_uid: str, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = server.instance_sop_uids()
        if sop_uid in held:
            return held
        time.sleep(0.1)
    return server.instance_sop_uids()


def _compressed_copy(name: str, study_uid: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file(name, read=False))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = "DWCOMP"
    # Orthanc's C-GET sends a value of only spaces as empty (DCMTK): not a change the router makes.
    for element in list(ds):
        if isinstance(element.value, str) and element.value and not element.value.strip():
            del ds[element.tag]
    return ds


def test_wado_compressed_instances_pass_untouched_and_frames_are_served(
    web_router, clean_orthanc_farm
):
    primary = clean_orthanc_farm[0]
    study_uid = generate_uid()
    rle = _compressed_copy("SC_rgb_rle_2frame.dcm", study_uid)
    jpeg = _compressed_copy("examples_ybr_color.dcm", study_uid)
    for ds in (rle, jpeg):
        primary.upload(instance_bytes(ds))
    reply = web_router.session("WEBVIEWER").get(f"{web_router.url}/studies/{study_uid}", timeout=60)
    assert reply.status_code == 200, reply.text
    parts = _multipart_parts(reply)
    assert len(parts) == 2
    for part in parts:
        received = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True)
        original = primary.download_instance(received.SOPInstanceUID)
        assert (
            part[dataset_offset(part) :] == original[dataset_offset(original) :]
        )  # no transcoding
        assert received.file_meta.TransferSyntaxUID in (
            "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.50",
        )

    client = web_router.client("WEBVIEWER")
    frames = client.retrieve_instance_frames(
        study_uid, jpeg.SeriesInstanceUID, jpeg.SOPInstanceUID, [2, 30], media_types=("image/jpeg",)
    )
    expected = list(generate_frames(jpeg.PixelData, number_of_frames=30))
    assert frames == [expected[1], expected[29]]
    raw = web_router.session("WEBVIEWER").get(
        f"{web_router.url}/studies/{study_uid}/series/{rle.SeriesInstanceUID}/instances/{rle.SOPInstanceUID}/frames/2",
        headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"},
        timeout=60,
    )
    assert raw.status_code == 200 and "image/dicom-rle" in raw.text[:300]


def test_large_instances_stream_through_files_both_ways(web_router, clean_orthanc_farm):
    primary = clean_orthanc_farm[0]
    study_uid, series_uid = generate_uid(), generate_uid()
    # 1024 x 1024 x 16 bits: 2 MiB each, over max_in_memory_dataset.
    large = [
        make_test_instance(
            study_uid=study_uid, series_uid=series_uid, instance_number=n, rows=1024, cols=1024
        )
        for n in range(1, 4)
    ]
    reply = _post_stow(web_router.session("WEBVIEWER"), f"{web_router.url}/studies", large)
    assert reply.status_code == 200, reply.text
    assert primary.wait_for_instance_count(3, timeout=60) == 3
    reply = web_router.session("WEBVIEWER").get(f"{web_router.url}/studies/{study_uid}", timeout=60)
    assert reply.status_code == 200
    parts = _multipart_parts(reply)
    assert len(parts) == 3 and all(len(part) > 2 * LARGE_INSTANCE_BYTES for part in parts)
    for part in parts:
        sop = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True).SOPInstanceUID
        original = primary.download_instance(sop)
        assert part[dataset_offset(part) :] == original[dataset_offset(original) :]
    leftovers = [p for p in (web_router.spool / "tmp").iterdir()]
    assert leftovers == []  # spilled C-GET files and STOW parts are gone


def test_wado_returns_every_transfer_syntax_as_the_pacs_holds_it(web_router, clean_orthanc_farm):
    """pydicom's transfer-syntax files in one Orthanc: WADO-RS returns each in its own syntax,
    every element (pixel data included) as held (issue 17)."""
    from tests.farm.test_held_syntax import FILES, elements, load_held_study

    pacs = clean_orthanc_farm[0]
    study = load_held_study(pacs)
    reply = web_router.session("WEBVIEWER").get(
        f"{web_router.url}/studies/{study['study']}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    parts = _multipart_parts(reply)
    assert len(parts) == len(FILES)
    for part in parts:
        received = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True)
        held = pacs.download_instance(received.SOPInstanceUID)
        syntax = study["instances"][received.SOPInstanceUID][0]
        assert received.file_meta.TransferSyntaxUID == syntax
        assert elements(part) == elements(held), syntax
