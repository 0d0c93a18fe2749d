"""The front's C-STORE service on real associations: the bytes as sent, refusals, streaming, limits.

The destinations are ports nobody listens on: a C-STORE is Success once the instance is in the
spool and its job is queued, which is what these tests look at.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

from dicomrouter.app import build_app
from dicomrouter.config import load_config
from dicomrouter.net.upper_layer import IMPLICIT_VR_LE, parse_command
from tests.front.test_echo_scp import ROUTER_AE, write_router_config
from tests.support.pdus import A_ABORT, A_RELEASE_RP, A_RELEASE_RQ, P_DATA_TF, pdu, store_command
from tests.support.raw_peer import RawPeer
from tests.support.scu_sockets import OUTGOING_SOCKET_HANDLERS
from tests.support.store_helpers import dataset_bytes


def ct_dataset(pixels: int = 64) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "LEAN", "Lean^Path", "CT"
    ds.Rows = ds.Columns = pixels
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * (pixels * pixels * 2 // 256)
    return ds


def implicit_bytes(ds: Dataset) -> bytes:
    """The data set as pynetdicom sends it in Implicit VR Little Endian."""
    return encode(ds, True, True)


@pytest.fixture
def app(tmp_path, monkeypatch):
    path, _port = write_router_config(tmp_path, router={"network_timeout": 3, "max_pdu_size": 16384})
    monkeypatch.chdir(tmp_path)  # the config's relative spool and catalog
    router = build_app(load_config(path), host="127.0.0.1", port=0, watch_file=False)
    router.start()
    try:
        yield router
    finally:
        router.stop(drain_timeout_s=5)


def spooled_files(app) -> list[Path]:
    return sorted(Path(app.spool.objects).rglob("*.dcm"))


def front_connections(app) -> list:
    return app.front.table.everyone()


def store_with_pynetdicom(app, datasets, extra_contexts=()) -> tuple[list[int], bool]:
    """(C-STORE statuses, whether the front counted the association while it ran)."""
    client = AE(ae_title="WORKSTATION")
    client.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian])
    for context in extra_contexts:
        client.add_requested_context(context)
    assoc = client.associate("127.0.0.1", app.front.bound_port, ae_title=ROUTER_AE, evt_handlers=OUTGOING_SOCKET_HANDLERS)
    assert assoc.is_established
    try:
        served_lean = bool(front_connections(app))
        return [assoc.send_c_store(ds).Status for ds in datasets], served_lean
    finally:
        assoc.release()


@pytest.mark.parametrize("mixed", [False, True], ids=["storage only", "storage and find"])
def test_stores_spool_the_bytes_as_sent(app, mixed):
    datasets = [ct_dataset() for _ in range(3)]
    extra = (StudyRootQueryRetrieveInformationModelFind,) if mixed else ()
    statuses, counted = store_with_pynetdicom(app, datasets, extra)
    assert statuses == [0x0000] * 3
    assert counted
    files = spooled_files(app)
    assert len(files) == 3
    by_uid = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    for ds in datasets:
        stored = by_uid[ds.SOPInstanceUID].read_bytes()
        assert dataset_bytes(stored) == implicit_bytes(ds)
        meta = dcmread(by_uid[ds.SOPInstanceUID]).file_meta
        assert meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.MediaStorageSOPClassUID == CTImageStorage


def associate_for_store(peer: RawPeer) -> None:
    peer.associate(abstract_syntax=CTImageStorage, transfer_syntaxes=(IMPLICIT_VR_LE,), max_pdu=16384)


def read_response(peer: RawPeer) -> dict[int, bytes]:
    answer = peer.read_pdu()
    assert answer is not None and answer[0] == P_DATA_TF, answer
    body = answer[1]
    assert body[5] == 0x03  # one PDV: the last fragment of a command
    return parse_command(body[6:])


def test_command_and_data_set_in_one_pdu_in_many_fragments(app):
    """PDVs may share a PDU and a data set may come in any number of fragments (PS3.8 9.3.5)."""
    ds = ct_dataset(pixels=32)
    data = implicit_bytes(ds)
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    pdvs = _pdv(1, 0x03, store_command(CTImageStorage, ds.SOPInstanceUID, message_id=7))
    pdvs += b"".join(_pdv(1, 0x00, piece) for piece in pieces[:3])
    rest = b"".join(pieces[3:])
    with RawPeer(app.front.bound_port) as peer:
        associate_for_store(peer)
        peer.send(pdu(P_DATA_TF, pdvs) + pdu(P_DATA_TF, _pdv(1, 0x02, rest)))
        response = read_response(peer)
        assert int.from_bytes(response[0x0100], "little") == 0x8001
        assert int.from_bytes(response[0x0120], "little") == 7
        assert int.from_bytes(response[0x0900], "little") == 0x0000
        assert response[0x1000].rstrip(b"\0").decode() == ds.SOPInstanceUID
        peer.send(pdu(A_RELEASE_RQ, bytes(4)))
        assert peer.read_pdu()[0] == A_RELEASE_RP
    (spooled,) = spooled_files(app)
    assert dataset_bytes(spooled.read_bytes()) == data


def test_a_refused_store_answers_with_status_and_comment(app):
    """A data set whose SOP Instance UID differs from the request's: 0xA900 with a reason, nothing spooled."""
    ds = ct_dataset(pixels=8)
    with RawPeer(app.front.bound_port) as peer:
        associate_for_store(peer)
        peer.send(
            pdu(P_DATA_TF, _pdv(1, 0x03, store_command(CTImageStorage, "1.2.3.4")))
            + pdu(P_DATA_TF, _pdv(1, 0x02, implicit_bytes(ds)))
        )
        response = read_response(peer)
    assert int.from_bytes(response[0x0900], "little") == 0xA900
    assert b"does not match" in response[0x0902]
    assert len(response[0x0902]) % 2 == 0
    assert spooled_files(app) == []


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(lambda: pdu(P_DATA_TF, _pdv(3, 0x03, store_command(CTImageStorage, "1.2.3"))), id="context not accepted"),
        pytest.param(lambda: pdu(P_DATA_TF, _pdv(1, 0x02, b"\0" * 64)), id="data set without a command"),
        pytest.param(lambda: pdu(P_DATA_TF, struct.pack(">IBB", 1, 1, 0x03)), id="PDV shorter than its header"),
        pytest.param(lambda: pdu(P_DATA_TF, _pdv(1, 0x03, b"\x08\x00\x00\x00\x02\x00\x00\x00ab")), id="command without a command field"),
        pytest.param(lambda: pdu(0x01, bytes(80)), id="a second association request"),
    ],
)
def test_protocol_errors_abort_and_the_front_keeps_serving(app, stream):
    with RawPeer(app.front.bound_port) as peer:
        associate_for_store(peer)
        peer.send(stream())
        closed = peer.wait_closed(timeout=5)
    assert closed.closed and A_ABORT in closed.pdu_types
    assert store_with_pynetdicom(app, [ct_dataset(pixels=8)])[0] == [0x0000]


def test_idle_lean_association_is_dropped_after_the_network_timeout(app):
    with RawPeer(app.front.bound_port) as peer:
        associate_for_store(peer)
        assert front_connections(app)
        closed = peer.wait_closed(timeout=10)
    assert closed.closed and 2.5 < closed.seconds < 6, closed
    assert A_ABORT in closed.pdu_types
    deadline = time.monotonic() + 2  # the slot is given back just after the socket closes
    while front_connections(app) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not front_connections(app)


def test_stop_aborts_an_open_lean_association(app):
    port = app.front.bound_port
    peer = RawPeer(port)
    try:
        associate_for_store(peer)
        started = time.monotonic()
        stopper = threading.Thread(target=app.stop, kwargs={"drain_timeout_s": 0.5})
        stopper.start()
        closed = peer.wait_closed(timeout=5)
        stopper.join(timeout=10)
        assert closed.closed and A_ABORT in closed.pdu_types
        assert time.monotonic() - started < 3
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1)
    finally:
        peer.close()


def test_private_classes_are_taken_and_services_not_offered_are_refused(app):
    """A private storage class (Siemens CSA Non-Image) is accepted, as real modalities need; a service the
    router does not offer (Modality Performed Procedure Step) is refused: abstract syntax not supported."""
    private_class = "1.3.12.2.1107.5.9.1"
    commitment = "1.2.840.10008.3.1.2.3.3"  # MPPS: not offered
    client = AE(ae_title="WORKSTATION")
    client.add_requested_context(private_class, [ImplicitVRLittleEndian])
    client.add_requested_context(commitment, [ImplicitVRLittleEndian])
    client.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian])
    assoc = client.associate("127.0.0.1", app.front.bound_port, ae_title=ROUTER_AE, evt_handlers=OUTGOING_SOCKET_HANDLERS)
    assert assoc.is_established
    try:
        assert front_connections(app)
        (refused,) = assoc.rejected_contexts
        assert refused.abstract_syntax == commitment and refused.result == 0x03
        assert sorted(cx.abstract_syntax for cx in assoc.accepted_contexts) == sorted([CTImageStorage, private_class])
        assert assoc.send_c_store(ct_dataset(pixels=8)).Status == 0x0000
    finally:
        assoc.release()


# ---------------------------------------------------------------- large data sets go to the spool as they arrive

IN_MEMORY_LIMIT = 32768


@pytest.fixture
def streaming_app(tmp_path, monkeypatch):
    """A front that keeps at most 32 KiB of a data set in memory."""
    path, _port = write_router_config(
        tmp_path, router={"network_timeout": 3, "max_pdu_size": 16384, "max_in_memory_dataset": IN_MEMORY_LIMIT}
    )
    monkeypatch.chdir(tmp_path)
    spool = tmp_path / "var" / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    yield lambda: build_app(load_config(path), host="127.0.0.1", port=0, watch_file=False), spool


def started(factory):
    router = factory()
    router.start()
    return router


def spool_tmp_files(spool: Path) -> list[Path]:
    return sorted((spool / "tmp").glob("*"))


def test_a_large_data_set_is_spooled_while_it_arrives(streaming_app):
    factory, spool = streaming_app
    app = started(factory)
    try:
        big, small = ct_dataset(pixels=256), ct_dataset(pixels=16)  # 128 KiB of pixels, and one kept in memory
        opened = []
        original = app.spool.open_partial
        app.spool.open_partial = lambda *args: opened.append(1) or original(*args)
        statuses, served_lean = store_with_pynetdicom(app, [big, small])
        assert statuses == [0x0000, 0x0000] and served_lean
        assert opened == [1]  # only the large one was streamed
        by_uid = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in spooled_files(app)}
        for ds in (big, small):
            assert dataset_bytes(by_uid[ds.SOPInstanceUID].read_bytes()) == implicit_bytes(ds)
            assert dcmread(by_uid[ds.SOPInstanceUID]).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert spool_tmp_files(spool) == []
    finally:
        app.stop(drain_timeout_s=5)


def send_store(peer: RawPeer, sop_instance_uid: str, data: bytes, fragment: int = 16000) -> None:
    """A CT C-STORE request, its data set in PDUs of `fragment` bytes."""
    peer.send(pdu(P_DATA_TF, _pdv(1, 0x03, store_command(CTImageStorage, sop_instance_uid))))
    for start in range(0, len(data), fragment):
        last = start + fragment >= len(data)
        peer.send(pdu(P_DATA_TF, _pdv(1, 0x02 if last else 0x00, data[start : start + fragment])))


def test_a_refused_large_data_set_leaves_nothing_behind(streaming_app):
    factory, spool = streaming_app
    app = started(factory)
    try:
        ds = ct_dataset(pixels=256)
        with RawPeer(app.front.bound_port) as peer:
            associate_for_store(peer)
            send_store(peer, "1.2.3.4", implicit_bytes(ds))
            response = read_response(peer)
        assert int.from_bytes(response[0x0900], "little") == 0xA900
        assert spooled_files(app) == [] and spool_tmp_files(spool) == []
    finally:
        app.stop(drain_timeout_s=5)


def test_an_association_aborted_mid_data_set_leaves_nothing_behind(streaming_app):
    factory, spool = streaming_app
    app = started(factory)
    try:
        ds = ct_dataset(pixels=256)
        data = implicit_bytes(ds)
        with RawPeer(app.front.bound_port) as peer:
            associate_for_store(peer)
            peer.send(pdu(P_DATA_TF, _pdv(1, 0x03, store_command(CTImageStorage, ds.SOPInstanceUID))))
            for start in range(0, 96000, 16000):  # well past the in-memory limit, not the end
                peer.send(pdu(P_DATA_TF, _pdv(1, 0x00, data[start : start + 16000])))
            deadline = time.monotonic() + 5
            while not spool_tmp_files(spool) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert spool_tmp_files(spool), "the data set should be streaming into tmp/"
            peer.send(pdu(A_ABORT, bytes(4)))
        deadline = time.monotonic() + 5
        while (spool_tmp_files(spool) or front_connections(app)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert spool_tmp_files(spool) == [] and spooled_files(app) == []
    finally:
        app.stop(drain_timeout_s=5)


def test_spool_full_while_streaming_answers_out_of_resources(streaming_app):
    factory, spool = streaming_app
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(spool)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        app = started(factory)
        try:
            too_big, fits = ct_dataset(pixels=512), ct_dataset(pixels=16)  # 512 KiB of pixels > 256 KiB of spool
            statuses, served_lean = store_with_pynetdicom(app, [too_big, fits])
            assert served_lean
            assert statuses == [0xA700, 0x0000]  # no false Success; the association and the spool go on
            assert spool_tmp_files(spool) == []
            (kept,) = spooled_files(app)
            assert dcmread(kept, stop_before_pixels=True).SOPInstanceUID == fits.SOPInstanceUID
        finally:
            app.stop(drain_timeout_s=5)
    finally:
        subprocess.run(["umount", "-l", str(spool)], capture_output=True)


def test_a_multi_valued_sop_class_uid_is_refused_as_a_mismatch(app):
    """Found by the generated malformed stores: a list where one UID belongs is 0xA900, not an internal error."""
    ds = ct_dataset(pixels=8)
    ds.SOPClassUID = [CTImageStorage, "1.2.3.4"]
    with RawPeer(app.front.bound_port) as peer:
        associate_for_store(peer)
        peer.send(pdu(P_DATA_TF, _pdv(1, 0x03, store_command(CTImageStorage, ds.SOPInstanceUID))))
        peer.send(pdu(P_DATA_TF, _pdv(1, 0x02, implicit_bytes(ds))))
        response = read_response(peer)
    assert int.from_bytes(response[0x0900], "little") == 0xA900
    assert spooled_files(app) == []


# ---------------------------------------------------------------- found in review: what a hostile peer could do


def test_empty_fragments_count_against_max_dataset_size(tmp_path, monkeypatch):
    """Data set PDVs with no payload are not free: without counting their headers a peer could pile up
    memory forever under a data set size of 0."""
    # An idle association would be dropped only after 30 s: a close within 5 s is the size limit's.
    path, _port = write_router_config(tmp_path, router={"network_timeout": 30, "max_dataset_size": 4096})
    monkeypatch.chdir(tmp_path)
    app = build_app(load_config(path), host="127.0.0.1", port=0, watch_file=False)
    app.start()
    try:
        with RawPeer(app.front.bound_port) as peer:
            associate_for_store(peer)
            peer.send(pdu(P_DATA_TF, _pdv(1, 0x03, store_command(CTImageStorage, "1.2.3.4"))))
            peer.send(pdu(P_DATA_TF, _pdv(1, 0x00, b"") * 1000))  # 6,000 bytes of PDV headers, nothing else
            closed = peer.wait_closed(timeout=5)
        assert closed.closed and A_ABORT in closed.pdu_types
        assert spooled_files(app) == []
    finally:
        app.stop(drain_timeout_s=5)


def test_file_meta_elements_inside_the_data_set_are_refused(app):
    """A data set starting with (0002,0010) Transfer Syntax UID could make pydicom read the rest as
    deflated, past the deflate-bomb check: refused as unreadable, nothing spooled."""
    ds = ct_dataset(pixels=8)
    smuggled = b"\x02\x00\x10\x00" + struct.pack("<I", 22) + b"1.2.840.10008.1.2.1.99"
    with RawPeer(app.front.bound_port) as peer:
        associate_for_store(peer)
        peer.send(pdu(P_DATA_TF, _pdv(1, 0x03, store_command(CTImageStorage, ds.SOPInstanceUID))))
        peer.send(pdu(P_DATA_TF, _pdv(1, 0x02, smuggled + implicit_bytes(ds))))
        response = read_response(peer)
    assert int.from_bytes(response[0x0900], "little") == 0xC000
    assert b"(group 0002)" in response[0x0902] or b"File Meta" in response[0x0902]
    assert spooled_files(app) == []


def test_truncated_pixel_data_in_a_streamed_data_set_is_refused(streaming_app):
    """The streamed check reads every element, pixel data included (by its bounds, without loading it)."""
    factory, spool = streaming_app
    app = started(factory)
    try:
        ds = ct_dataset(pixels=256)
        data = implicit_bytes(ds)[:-20000]  # Pixel Data declares 128 KiB; 20,000 bytes of it never come
        with RawPeer(app.front.bound_port) as peer:
            associate_for_store(peer)
            send_store(peer, ds.SOPInstanceUID, data)
            response = read_response(peer)
        assert int.from_bytes(response[0x0900], "little") == 0xC000
        assert b"(7FE0,0010) is truncated" in response[0x0902]
        assert spooled_files(app) == [] and spool_tmp_files(spool) == []
    finally:
        app.stop(drain_timeout_s=5)
