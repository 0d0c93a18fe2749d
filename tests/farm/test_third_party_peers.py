"""The router with DICOM implementations other than Orthanc and DCMTK's SCUs (issue 10).

Each tool plays a modality or a workstation against a real `dicomrouter serve` in front of the Orthanc farm;
DCMTK's dcmqrscp plays a second, independent PACS behind it. Outcomes are checked at the PACS (the instance
arrives, byte for byte where the tool sends the file's own encoding) and in what the router answered, not from
exit codes alone: gdcmscu aborts at every release (PEERS.md 11).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.support.orthanc_fixtures import make_test_instance, write_instance
from tests.support.router_process import RouterProcess, run_dcmtk
from tests.support.store_helpers import dataset_bytes, edit_config
from tests.support.third_party_peers import (
    C_ECHO_RSP,
    C_FIND_RSP,
    C_STORE_RSP,
    PENDING,
    SUCCESS,
    Dcmqrscp,
    StoreScp,
    compile_pixelmed_peer,
    gdcm_responses,
    pynetdicom_app,
    require,
    run,
)

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
CALLING = "WORKSTATION"
CALLED = "DICOMROUTER"


def _instance(
    folder: Path, patient_id: str, study_uid: str | None = None
) -> tuple[Path, pydicom.Dataset]:
    ds = make_test_instance(patient_id=patient_id, study_uid=study_uid)
    return write_instance(folder / f"{patient_id}.dcm", ds), ds


def _arrived_identical(farm, path: Path, ds: pydicom.Dataset) -> None:
    """The instance reached the primary PACS with the data set bytes of the file sent."""
    assert farm[0].wait_for_instance_count(1) == 1
    stored = farm[0].download_instance(str(ds.SOPInstanceUID))
    assert dataset_bytes(stored) == dataset_bytes(path.read_bytes())


def _same_instance(received: Path, ds: pydicom.Dataset) -> None:
    """A file a tool wrote holds `ds` (its identity and its pixels)."""
    got = pydicom.dcmread(received)
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert got.StudyInstanceUID == ds.StudyInstanceUID
    assert got.PatientID == ds.PatientID
    assert got.PixelData == ds.PixelData


def _stored(farm, ds: pydicom.Dataset, folder: Path) -> Path:
    """The primary PACS's copy of `ds`, as a file in `folder`."""
    path = folder / "stored.dcm"
    path.write_bytes(farm[0].download_instance(str(ds.SOPInstanceUID)))
    return path


def test_pynetdicom_apps_echo_store_find_get_move(
    farm_router, clean_orthanc_farm, tmp_path, router_port, workstation_port
):
    port = str(router_port)
    echo = pynetdicom_app("echoscu", "-aet", CALLING, "-aec", CALLED, HOST, port)
    assert "Received Echo Response (Status: 0x0000 - Success)" in echo.stdout, echo.stdout

    path, ds = _instance(tmp_path, "PYNETDICOM01")
    store = pynetdicom_app("storescu", "-aet", CALLING, "-aec", CALLED, HOST, port, str(path))
    assert "Received Store Response (Status: 0x0000 - Success)" in store.stdout, store.stdout
    _arrived_identical(clean_orthanc_farm, path, ds)

    answers = tmp_path / "find"
    answers.mkdir()
    find = pynetdicom_app(
        "findscu",
        "-aet",
        CALLING,
        "-aec",
        CALLED,
        HOST,
        port,
        "-S",
        "-w",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientID=PYNETDICOM01",
        "-k",
        "StudyInstanceUID=",
        cwd=answers,
    )
    assert "Find SCP Result: 0x0000 (Success)" in find.stdout, find.stdout
    found = [pydicom.dcmread(answer) for answer in sorted(answers.glob("rsp*.dcm"))]
    assert [answer.StudyInstanceUID for answer in found] == [ds.StudyInstanceUID], find.stdout

    received = tmp_path / "get"
    get = pynetdicom_app(
        "getscu",
        "-aet",
        CALLING,
        "-aec",
        CALLED,
        HOST,
        port,
        "-S",
        "-od",
        str(received),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={ds.StudyInstanceUID}",
    )
    assert "Get SCP Result: 0x0000 (Success)" in get.stdout, get.stdout
    assert "Completed: 1, Failed: 0, Warning: 0" in get.stdout, get.stdout
    files = list(received.iterdir())
    assert len(files) == 1, get.stdout
    # getscu's storage contexts take what C-GET negotiated (implicit VR here): same instance, other encoding.
    _same_instance(files[0], ds)

    # movescu with its own storage SCP as the WORKSTATION destination the PACS sends to.
    moved = tmp_path / "move"
    move = pynetdicom_app(
        "movescu",
        "-aet",
        CALLING,
        "-aec",
        CALLED,
        "-aem",
        CALLING,
        HOST,
        port,
        "-S",
        "--store",
        "--store-aet",
        CALLING,
        "--store-port",
        str(workstation_port),
        "-od",
        str(moved),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={ds.StudyInstanceUID}",
    )
    assert "Move SCP Result: 0x0000 (Success)" in move.stdout, move.stdout
    files = list(moved.iterdir()) if moved.exists() else []
    assert len(files) == 1, move.stdout
    assert dataset_bytes(files[0].read_bytes()) == dataset_bytes(path.read_bytes())


def test_gdcmscu_echo_store_find(farm_router, clean_orthanc_farm, tmp_path, router_port):
    require("/usr/bin/gdcmscu")
    common = ["--aetitle", CALLING, "--call", CALLED, "-D", HOST, str(router_port)]

    echo = run(["/usr/bin/gdcmscu", "--echo", *common])
    assert (C_ECHO_RSP, SUCCESS) in gdcm_responses(echo.stdout), echo.stdout[-3000:]

    path, ds = _instance(tmp_path, "GDCM01")
    store = run(["/usr/bin/gdcmscu", "--store", "-i", str(path), *common])
    assert gdcm_responses(store.stdout) == {(C_STORE_RSP, SUCCESS)}, store.stdout[-3000:]
    assert clean_orthanc_farm[0].wait_for_instance_count(1) == 1
    _same_instance(_stored(clean_orthanc_farm, ds, tmp_path), ds)

    def find(patient_id: str) -> set[tuple[int, int]]:
        result = run(
            [
                "/usr/bin/gdcmscu",
                "--find",
                "--studyroot",
                "--study",
                "--key",
                f"10,20={patient_id}",
                "--key",
                "20,d=",
                *common,
            ]
        )
        assert "C-Find was successful." in result.stdout, result.stdout[-3000:]
        return gdcm_responses(result.stdout)

    assert find("GDCM01") == {(C_FIND_RSP, PENDING), (C_FIND_RSP, SUCCESS)}
    assert find("NOBODY") == {(C_FIND_RSP, SUCCESS)}
    # Its abort at release costs the router nothing: the next association is served.
    again = run(["/usr/bin/gdcmscu", "--echo", *common])
    assert (C_ECHO_RSP, SUCCESS) in gdcm_responses(again.stdout)


@pytest.fixture(scope="module")
def pixelmed_peer(tmp_path_factory) -> list[str]:
    return compile_pixelmed_peer(tmp_path_factory.mktemp("pixelmed"))


def test_pixelmed_echo_store_find(
    pixelmed_peer, farm_router, clean_orthanc_farm, tmp_path, router_port
):
    where = [HOST, str(router_port), CALLED, CALLING]
    echo = run([*pixelmed_peer, "echo", *where])
    assert echo.returncode == 0 and "echo done" in echo.stdout, echo.stdout
    refused = run([*pixelmed_peer, "echo", HOST, str(router_port), CALLED, "NOT_A_CLIENT"])
    assert refused.returncode != 0 and "echo done" not in refused.stdout, refused.stdout

    path, ds = _instance(tmp_path, "PIXELMED01")
    store = run([*pixelmed_peer, "store", *where, str(path)])
    assert f"stored {ds.SOPInstanceUID} completed=1 failed=0 warning=0" in store.stdout, (
        store.stdout
    )
    assert clean_orthanc_farm[0].wait_for_instance_count(1) == 1
    _same_instance(_stored(clean_orthanc_farm, ds, tmp_path), ds)

    find = run([*pixelmed_peer, "find", *where, "PIXELMED01"])
    assert "find done" in find.stdout, find.stdout
    assert [line for line in find.stdout.splitlines() if line.startswith("study ")] == [
        f"study {ds.StudyInstanceUID}"
    ], find.stdout


def test_odil_echo_store_find_get(farm_router, clean_orthanc_farm, tmp_path, router_port):
    require("/usr/bin/odil")
    where = [HOST, str(router_port), CALLING, CALLED]
    echo = run(["/usr/bin/odil", "echo", "-v", "info", *where])
    assert echo.returncode == 0 and "C-ECHO successful" in echo.stdout, echo.stdout

    path, ds = _instance(tmp_path, "ODIL01")
    store = run(["/usr/bin/odil", "store", "-v", "info", *where, str(path)])
    # odil store prints only failures.
    assert store.returncode == 0 and "Could not store" not in store.stdout, store.stdout
    assert clean_orthanc_farm[0].wait_for_instance_count(1) == 1
    _same_instance(_stored(clean_orthanc_farm, ds, tmp_path), ds)

    find = run(
        [
            "/usr/bin/odil",
            "find",
            *where,
            "study",
            "QueryRetrieveLevel=STUDY",
            "PatientID=ODIL01",
            "StudyInstanceUID=",
        ]
    )
    assert find.returncode == 0 and "1 answer" in find.stdout, find.stdout
    assert str(ds.StudyInstanceUID) in find.stdout

    received = tmp_path / "get"
    received.mkdir()
    get = run(
        [
            "/usr/bin/odil",
            "get",
            "-v",
            "info",
            "-d",
            str(received),
            *where,
            "study",
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={ds.StudyInstanceUID}",
        ]
    )
    assert get.returncode == 0 and "completed: 1, failed: 0" in get.stdout, get.stdout
    files = [file for file in received.rglob("*") if file.is_file()]
    assert len(files) == 1, get.stdout
    _same_instance(files[0], ds)


def test_ctn_echo_and_store_with_role_selection(
    farm_router, clean_orthanc_farm, tmp_path, router_port
):
    require("/usr/bin/dicom_echo", "/usr/bin/send_image")
    echo = run(["/usr/bin/dicom_echo", "-a", CALLING, "-c", CALLED, HOST, str(router_port)])
    assert echo.returncode == 0, echo.stdout
    assert "Verification Status:     0000" in echo.stdout, echo.stdout

    path, ds = _instance(tmp_path, "CTN01")
    # -r: stop on any status but Success. send_image proposes SCU role selection for the storage class.
    store = run(
        [
            "/usr/bin/send_image",
            "-a",
            CALLING,
            "-c",
            CALLED,
            "-r",
            HOST,
            str(router_port),
            str(path),
        ]
    )
    assert store.returncode == 0, store.stdout
    assert "Proposed SCU/SCP Role:  SCU" in store.stdout, store.stdout
    assert (
        f"Instance UID:   {ds.SOPInstanceUID}" in store.stdout
        and "Status:         0000" in store.stdout
    )
    assert clean_orthanc_farm[0].wait_for_instance_count(1) == 1
    # send_image re-encodes the file in implicit VR: the same instance, not the same bytes.
    _same_instance(_stored(clean_orthanc_farm, ds, tmp_path), ds)


DCMQR_AE = "DCMQR"


@pytest.fixture
def dcmqrscp_behind_router(
    farm_config, clean_orthanc_farm, tmp_path, router_port, workstation_port
):
    """dcmqrscp as a test server of the router beside the Orthanc farm; the router serving; both stopped after."""
    require("/usr/bin/dcmqrscp", "/usr/bin/storescp")
    pacs = Dcmqrscp(
        tmp_path / "dcmqrscp",
        DCMQR_AE,
        [(CALLED, HOST, router_port), (CALLING, HOST, workstation_port)],
    )

    def add_server(data):
        data["servers"].append(
            {
                "name": "DCMTK QR",
                "ae_title": DCMQR_AE,
                "host": HOST,
                "port": pacs.port,
                "environment": "test",
                "active": True,
                "primary": False,
                "deleted": False,
                "move_routing": {CALLING: CALLING, CALLED: CALLED},
            }
        )

    edit_config(farm_config, add_server)
    pacs.start()
    router = RouterProcess(farm_config, router_port)
    try:
        router.start()
        yield pacs, router
    finally:
        router.stop()
        pacs.stop()


def test_dcmqrscp_behind_router_find_and_move(
    dcmqrscp_behind_router, clean_orthanc_farm, tmp_path, router_port, workstation_port
):
    pacs, router = dcmqrscp_behind_router
    # One study in Orthanc (Test PACS 1), one in dcmqrscp, same patient.
    in_orthanc, orthanc_ds = _instance(tmp_path / "orthanc", "FEDERATED01")
    clean_orthanc_farm[0].upload(in_orthanc.read_bytes())
    in_dcmqr, dcmqr_ds = _instance(tmp_path / "dcmqr", "FEDERATED01", study_uid=generate_uid())
    sent = run_dcmtk(
        "storescu", "-aet", CALLING, "-aec", DCMQR_AE, HOST, str(pacs.port), str(in_dcmqr)
    )
    assert sent.returncode == 0, sent.stderr + pacs.log_text()

    answers = tmp_path / "answers"
    answers.mkdir()
    find = run_dcmtk(
        "findscu",
        "-S",
        "-aet",
        CALLING,
        "-aec",
        CALLED,
        "-X",
        "-od",
        str(answers),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientID=FEDERATED01",
        "-k",
        "StudyInstanceUID",
        HOST,
        str(router_port),
    )
    assert find.returncode == 0, find.stderr
    found = {str(pydicom.dcmread(answer).StudyInstanceUID) for answer in answers.iterdir()}
    assert found == {str(orthanc_ds.StudyInstanceUID), str(dcmqr_ds.StudyInstanceUID)}, (
        find.stderr + router.log_tail()
    )

    workstation = StoreScp(tmp_path / "workstation", CALLING, workstation_port).start()
    try:
        move = run_dcmtk(
            "movescu",
            "-v",
            "-S",
            "-aet",
            CALLING,
            "-aec",
            CALLED,
            "-aem",
            CALLING,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={dcmqr_ds.StudyInstanceUID}",
            HOST,
            str(router_port),
        )
    finally:
        workstation.stop()
    output = move.stdout + move.stderr
    assert move.returncode == 0, output + router.log_tail()
    assert "Received Final Move Response (Success)" in output, (
        output + router.log_tail() + pacs.log_text()
    )
    received = list(workstation.folder.iterdir())
    assert len(received) == 1, output
    assert dataset_bytes(received[0].read_bytes()) == dataset_bytes(in_dcmqr.read_bytes())
    assert str(dcmqr_ds.SOPInstanceUID) in received[0].name
    # The study came from dcmqrscp: no Orthanc ever held it.
    assert all(
        str(dcmqr_ds.StudyInstanceUID) not in server.study_uids() for server in clean_orthanc_farm
    )
