"""Malformed datasets through C-STORE and C-FIND: a clear status, nothing unreadable spooled, still serving."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import generate_uid

from dicomrouter.net.upper_layer import EXPLICIT_VR_LE, IMPLICIT_VR_LE, parse_command, pdvs
from tests.front.test_echo_scp import write_router_config
from tests.front.test_front_pdus import crashes_in_log, echo_succeeds
from tests.support.pdus import A_RELEASE_RQ, P_DATA_TF, find_command, p_data, pdu
from tests.support.raw_peer import RawPeer, process_figures
from tests.support.router_process import RouterProcess

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
SUCCESS = 0x0000
# What a malformed dataset may get back: refused with a reason, never an internal error.
CLEAR_REFUSALS = {0xA900, 0xC000}


def base_dataset(sop_instance_uid: str, nesting: int = 1) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.PatientName = "Fuzz^Case"
    ds.PatientID = "FUZZ"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.9.7433.99.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9.7433.99.2"
    ds.Modality = "CT"
    ds.StudyDescription = "malformed input"
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(nesting):
        outer = Dataset()
        outer.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        outer.ContentSequence = [inner]
        inner = outer
    ds.ContentSequence = [inner]
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x00\x01\x02\x03"
    return ds


def encode(ds: Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def element(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """An explicit VR little endian element; `length` overrides the true one."""
    length = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"UC", b"UR"):
        return struct.pack("<HH2sxxI", group, elem, vr, length) + value
    return struct.pack("<HH2sH", group, elem, vr, length & 0xFFFF) + value


def never_closing_sequence(items: int) -> bytes:
    """ContentSequence of undefined length whose items never get their delimiters."""
    body = element(0x0040, 0xA730, b"SQ", b"", 0xFFFFFFFF)
    for _ in range(items):
        body += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + element(0x0008, 0x0100, b"SH", b"X ")
    return body


def with_file_meta(dataset: bytes, sop_instance_uid: str) -> bytes:
    """A whole Part 10 file (preamble, DICM, meta) where the dataset alone belongs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = EXPLICIT_VR_LE
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, meta)
    return b"\x00" * 128 + b"DICM" + fp.getvalue() + dataset


# --------------------------------------------------------------------------- the wire


def read_response(peer: RawPeer, timeout: float = 15.0) -> tuple[int | None, list[int]]:
    """(final status, pending statuses) of one DIMSE exchange; status None when the router hung up."""
    pending: list[int] = []
    command = b""
    while True:
        answer = peer.read_pdu(timeout=timeout)
        if answer is None or answer[0] != P_DATA_TF:
            return None, pending
        for _context, header, fragment in pdvs(answer[1]):
            if not header & 1:
                continue  # a pending answer's identifier
            command += fragment
            if header & 2:
                status = struct.unpack("<H", parse_command(command)[0x0900])[0]
                command = b""
                if status in (0xFF00, 0xFF01):
                    pending.append(status)
                else:
                    return status, pending


def send_store(port: int, dataset: bytes, sop_instance_uid: str, transfer_syntax: str) -> int | None:
    from tests.support.pdus import store_command

    with RawPeer(port) as peer:
        peer.associate(abstract_syntax=CT_IMAGE_STORAGE, transfer_syntaxes=(transfer_syntax,))
        peer.send(p_data(1, store_command(CT_IMAGE_STORAGE, sop_instance_uid), True))
        for start in range(0, max(len(dataset), 1), 8000):
            last = start + 8000 >= len(dataset)
            peer.send(p_data(1, dataset[start : start + 8000], False, last=last))
        status, _ = read_response(peer)
        if status is not None:
            peer.send(pdu(A_RELEASE_RQ, bytes(4)))
            peer.read_pdu(timeout=5)
        return status


def send_find(port: int, identifier: bytes, transfer_syntax: str = EXPLICIT_VR_LE) -> tuple[int | None, int]:
    with RawPeer(port) as peer:
        peer.associate(abstract_syntax=STUDY_ROOT_FIND, transfer_syntaxes=(transfer_syntax,))
        peer.send(p_data(1, find_command(STUDY_ROOT_FIND), True))
        peer.send(p_data(1, identifier, False))
        status, pending = read_response(peer)
        if status is not None:
            peer.send(pdu(A_RELEASE_RQ, bytes(4)))
            peer.read_pdu(timeout=5)
        return status, len(pending)


# --------------------------------------------------------------------------- the router


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    folder = tmp_path_factory.mktemp("malformed")
    path, port = write_router_config(
        folder,
        router={"acse_timeout": 5, "network_timeout": 10, "dimse_timeout": 10, "find_timeout": 2},
    )
    process = RouterProcess(path, port)
    process.start()
    process.spool = folder / "var" / "spool"
    process.counts = {"store": 0, "find": 0, "stored": 0}
    try:
        assert echo_succeeds(port)
        process.figures_before = process_figures(process.process.pid)
        yield process
    finally:
        process.stop()


def spooled_files(spool: Path) -> list[Path]:
    return [path for path in spool.rglob("*") if path.is_file() and not path.name.startswith(".")]


def read_back(path: Path) -> None:
    """Parse the spooled file completely, every nested value included."""
    ds = dcmread(path)
    for elem in ds.iterall():
        _ = elem.value
    assert ds.SOPInstanceUID


def mutate(data: bytes, kind: str, rnd: random.Random) -> bytes:
    if kind == "truncate":
        return data[: rnd.randrange(1, len(data))]
    if kind == "flip":
        mutable = bytearray(data)
        for _ in range(rnd.randint(1, 8)):
            mutable[rnd.randrange(len(mutable))] = rnd.randrange(256)
        return bytes(mutable)
    if kind == "wrong VR":
        mutable = bytearray(data)
        # the VR of an element near a random offset: search for an ASCII pair after a tag
        offset = rnd.randrange(0, len(mutable) - 6)
        mutable[offset + 4 : offset + 6] = rnd.choice([b"SQ", b"UN", b"OB", b"\x00\x00", b"XX", b"US", b"FD"])
        return bytes(mutable)
    if kind == "length":
        mutable = bytearray(data)
        offset = rnd.randrange(0, len(mutable) - 8)
        mutable[offset + 6 : offset + 8] = rnd.choice([b"\xff\xff", b"\x00\x00", b"\x01\x00", b"\xfe\xff"])
        return bytes(mutable)
    raise AssertionError(kind)


def record_store(router, status: int | None, dataset: bytes, note: str) -> None:
    router.counts["store"] += 1
    assert status is not None, f"the router hung up on {note}:\n{router.log_tail()}"
    if status == SUCCESS:
        router.counts["stored"] += 1
    else:
        assert status in CLEAR_REFUSALS, f"status 0x{status:04X} for {note}:\n{router.log_tail()}"


STORE_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def test_generated_malformed_stores(router):
    @STORE_SETTINGS
    @given(
        kind=st.sampled_from(["truncate", "flip", "wrong VR", "length"]),
        implicit=st.booleans(),
        seed=st.integers(0, 2**32 - 1),
    )
    def check(kind, implicit, seed):
        uid = generate_uid()
        data = mutate(encode(base_dataset(uid), implicit), kind, random.Random(seed))
        status = send_store(router.port, data, uid, IMPLICIT_VR_LE if implicit else EXPLICIT_VR_LE)
        record_store(router, status, data, f"{kind} (seed {seed}, implicit {implicit})")

    check()


@pytest.mark.parametrize(
    "name",
    [
        "deep nesting 50",
        "deep nesting 400",
        "deep nesting 3000",
        "undefined-length sequence that never closes",
        "undefined-length item after the pixel data",
        "Part 10 file where the dataset belongs",
        "random preamble",
        "empty dataset",
        "deflated: not deflate data",
        "deflated: cut short",
        "deflated: valid stream, garbage after",
        "deflated: a bomb of zeros",
    ],
)
def test_named_malformed_stores(router, name):
    uid = generate_uid()
    syntax = EXPLICIT_VR_LE
    plain = encode(base_dataset(uid))
    if name.startswith("deep nesting"):
        depth = int(name.split()[-1])
        data = encode(base_dataset(uid, nesting=1)) if depth < 1 else b""
        # Built by hand: pydicom itself recurses while writing.
        inner = element(0x0008, 0x0100, b"SH", b"X ")
        for _ in range(depth):
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
            inner = element(0x0040, 0xA730, b"SQ", item)
        data = plain.split(b"\x40\x00\x30\xa7")[0] + inner
    elif name == "undefined-length sequence that never closes":
        data = plain.split(b"\x40\x00\x30\xa7")[0] + never_closing_sequence(5)
    elif name == "undefined-length item after the pixel data":
        data = plain + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + b"\x00" * 10
    elif name == "Part 10 file where the dataset belongs":
        data = with_file_meta(plain, uid)
    elif name == "random preamble":
        data = random.Random(1).randbytes(132) + plain
    elif name == "empty dataset":
        data = b""
    else:
        syntax = DEFLATED
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        deflated = compressor.compress(plain) + compressor.flush()
        data = {
            "deflated: not deflate data": b"\x00\x01garbage" * 20,
            "deflated: cut short": deflated[: len(deflated) // 2],
            "deflated: valid stream, garbage after": deflated + b"\xff" * 64,
            "deflated: a bomb of zeros": zlib.compress(b"\x00" * (64 * 1024 * 1024))[2:-4],
        }[name]
    status = send_store(router.port, data, uid, syntax)
    record_store(router, status, data, name)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["truncate", "flip", "wrong VR", "length", "random"]), seed=st.integers(0, 2**32 - 1))
def test_generated_malformed_finds(router, kind, seed):
    rnd = random.Random(seed)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "Fuzz*"
    identifier.StudyInstanceUID = ""
    identifier.ReferencedStudySequence = [Dataset()]
    data = encode(identifier)
    data = rnd.randbytes(rnd.randint(0, 200)) if kind == "random" else mutate(data, kind, rnd)
    status, _pending = send_find(router.port, data)
    router.counts["find"] += 1
    assert status is not None, f"the router hung up on a {kind} identifier (seed {seed})"
    # 0xA700: the identifier was readable and every (dead) server failed
    assert status == 0xA700 or status in CLEAR_REFUSALS or 0xC000 <= status <= 0xCFFF, hex(status)


def test_after_the_malformed_input(router):
    """Runs last in this module: the spool holds only readable files and the router still serves."""
    unreadable = []
    files = spooled_files(router.spool)
    for path in files:
        try:
            read_back(path)
        except Exception as exc:
            unreadable.append(f"{path.name}: {exc.__class__.__name__}: {exc}")
    assert not unreadable, "\n".join(unreadable)
    assert router.process.poll() is None
    assert echo_succeeds(router.port)
    assert not crashes_in_log(router)
    print(
        f"\nmalformed datasets: {router.counts}; spooled files {len(files)}, all readable; "
        f"router before {router.figures_before}, after {process_figures(router.process.pid)}"
    )


# --------------------------------------------------------------------------- data set size cap


def _instance_file(folder: Path, pixel_bytes: int) -> tuple[Path, str]:
    ds = base_dataset(generate_uid())
    ds.Rows, ds.Columns = pixel_bytes // 1000, 500
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(ds.Rows * ds.Columns * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = EXPLICIT_VR_LE
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def test_a_data_set_over_max_dataset_size_aborts_the_association(tmp_path):
    """pynetdicom holds a whole data set in memory: one over the cap is cut off while it streams in."""
    from tests.support.router_process import run_dcmtk

    path, port = write_router_config(tmp_path, router={"max_dataset_size": 200_000, "max_pdu_size": 16384})
    spool = tmp_path / "var" / "spool"
    big, big_uid = _instance_file(tmp_path, 1_000_000)
    small, small_uid = _instance_file(tmp_path, 50_000)
    with RouterProcess(path, port) as router:
        refused = run_dcmtk("storescu", "-aet", "WORKSTATION", "-aec", "DICOMROUTER", "127.0.0.1", str(port), str(big))
        assert refused.returncode != 0
        dropped = [line for line in router.log_text().splitlines() if "association_dropped" in line]
        assert any("max_dataset_size" in line for line in dropped), router.log_tail()
        assert not any(big_uid in p.name for p in spooled_files(spool))
        assert echo_succeeds(port), "the router must keep serving"
        accepted = run_dcmtk("storescu", "-aet", "WORKSTATION", "-aec", "DICOMROUTER", "127.0.0.1", str(port), str(small))
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        stored = [p for p in spooled_files(spool) if p.suffix == ".dcm"]
        assert [dcmread(p).SOPInstanceUID for p in stored] == [small_uid]
        assert not crashes_in_log(router)
