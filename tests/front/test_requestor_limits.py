"""What a PACS sends the router's requestor is bounded: a fake PACS on a raw socket sends
oversized lengths, endless messages and slow drips; the router aborts with a clear error and
keeps its memory."""

from __future__ import annotations

import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import Dataset

from dicomrouter.config import RouterSettings
from dicomrouter.dul.dimse import us
from dicomrouter.net.find_client import STUDY_ROOT_FIND, PeerFind, PeerFindError
from dicomrouter.net.get_client import STUDY_ROOT_GET, ReceivedInstance, get_instances
from dicomrouter.net.move_client import PeerMoveError
from dicomrouter.net.peer import echo_peer
from dicomrouter.net.upper_layer import (
    COMMAND_LIMIT,
    EXPLICIT_VR_LE,
    PDATA_SLACK,
    FileSlice,
    ProtocolViolation,
    UpperLayerError,
    command_set,
    open_link,
    parse_command,
)
from tests.support.configs import server_config
from tests.support.pdus import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
    associate_ac_body,
    p_data,
    pdu,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
OUR_MAX_PDU = 16384


def read_pdu(conn: socket.socket) -> tuple[int, bytes] | None:
    header = _read(conn, 6)
    if len(header) < 6:
        return None
    pdu_type, length = struct.unpack(">BxI", header)
    return pdu_type, _read(conn, length)


def _read(conn: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


class FakePacs:
    """One connection, served by `script(conn)`; then every PDU the router sent until it closed."""

    def __init__(self, script: Callable[[socket.socket], None]):
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.after_script: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        try:
            self.script(conn)
            while (answer := read_pdu(conn)) is not None:
                self.after_script.append(answer[0])
        except OSError:
            pass  # the router hung up while we were still talking: what the test checks
        finally:
            conn.close()


@contextmanager
def fake_pacs(script: Callable[[socket.socket], None]) -> Iterator[FakePacs]:
    pacs = FakePacs(script)
    pacs.thread.start()
    try:
        yield pacs
    finally:
        pacs.listener.close()
        pacs.thread.join(timeout=10)


def accept_association(accepted: dict[int, str]) -> Callable[[socket.socket], None]:
    def script(conn: socket.socket) -> None:
        assert read_pdu(conn)[0] == 0x01
        conn.sendall(pdu(A_ASSOCIATE_AC, associate_ac_body(accepted, max_pdu=OUR_MAX_PDU)))

    return script


def link_to(pacs: FakePacs, contexts=((CT, [EXPLICIT_VR_LE]),)):
    return open_link("127.0.0.1", pacs.port, "ROUTER", "PACS", list(contexts), OUR_MAX_PDU, 5, 5)


@contextmanager
def peak_allocation() -> Iterator[list[int]]:
    """The peak of Python allocations while the body ran, in bytes (list of one, filled at exit)."""
    tracemalloc.start()
    peak: list[int] = []
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


def test_an_associate_answer_announcing_two_gigabytes_is_aborted_before_its_body():
    def script(conn: socket.socket) -> None:
        read_pdu(conn)
        conn.sendall(struct.pack(">BxI", A_ASSOCIATE_AC, 0x7FFFFFFF) + b"\0" * 1000)

    with fake_pacs(script) as pacs, peak_allocation() as peak:
        started = time.monotonic()
        with pytest.raises(
            UpperLayerError, match="protocol violation.*2147483647 bytes, more than 1048576"
        ):
            link_to(pacs)
        elapsed = time.monotonic() - started
    pacs.thread.join(timeout=5)
    assert elapsed < 2
    assert pacs.after_script == [A_ABORT]
    assert peak[0] < 2 * 1024 * 1024


def test_a_pdata_pdu_longer_than_we_announced_aborts_the_association():
    def script(conn: socket.socket) -> None:
        accept_association({1: EXPLICIT_VR_LE})(conn)
        conn.sendall(struct.pack(">BxI", P_DATA_TF, OUR_MAX_PDU + PDATA_SLACK + 1) + b"\0" * 100)

    with fake_pacs(script) as pacs:
        link = link_to(pacs)
        with pytest.raises(
            ProtocolViolation, match=f"announces {OUR_MAX_PDU + PDATA_SLACK + 1} bytes"
        ):
            link.receive_messages(5)
        assert link.closed
    pacs.thread.join(timeout=5)
    assert pacs.after_script == [A_ABORT]


def test_an_endless_command_set_is_cut_at_64_kib(caplog):
    def script(conn: socket.socket) -> None:
        accept_association({1: EXPLICIT_VR_LE})(conn)
        for _ in range(COMMAND_LIMIT // 4000 + 5):
            conn.sendall(p_data(1, b"\0" * 4000, command=True, last=False))

    with fake_pacs(script) as pacs:
        link = link_to(pacs)
        with pytest.raises(ProtocolViolation, match="command set over 65536 bytes"):
            while True:
                link.receive_messages(5)
    pacs.thread.join(timeout=5)
    assert A_ABORT in pacs.after_script


def test_a_data_set_fragment_without_its_command_is_a_violation():
    def script(conn: socket.socket) -> None:
        accept_association({1: EXPLICIT_VR_LE})(conn)
        conn.sendall(p_data(1, b"\0" * 100, command=False, last=True))

    with fake_pacs(script) as pacs:
        link = link_to(pacs)
        with pytest.raises(ProtocolViolation, match="without its command"):
            link.receive_messages(5)


def test_a_pdu_dripping_in_byte_by_byte_times_out_on_its_own_deadline():
    """Each byte comes well within the timeout; the PDU as a whole does not."""
    stop = threading.Event()

    def script(conn: socket.socket) -> None:
        accept_association({1: EXPLICIT_VR_LE})(conn)
        conn.sendall(struct.pack(">BxI", P_DATA_TF, 100))
        for _ in range(100):
            if stop.wait(0.1):
                return
            conn.sendall(b"\0")

    with fake_pacs(script) as pacs:
        link = link_to(pacs)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            link.receive_messages(0.6)
        elapsed = time.monotonic() - started
        stop.set()
        link.abort()
    assert 0.5 < elapsed < 1.5


def endless_find_answer(conn: socket.socket) -> None:
    """Accept, read the C-FIND request, then answer with one pending identifier that never ends."""
    accept_association({1: EXPLICIT_VR_LE})(conn)
    while (request := read_pdu(conn)) is not None and request[1][5] != 2:
        pass  # until the identifier's last fragment
    pending = command_set(
        [(0x0100, us(0x8020)), (0x0120, us(1)), (0x0800, us(0)), (0x0900, us(0xFF00))]
    )
    conn.sendall(p_data(1, pending, command=True))
    chunk = p_data(1, b"\0" * (OUR_MAX_PDU - 6), command=False, last=False)
    for _ in range(64 * 1024 * 1024 // len(chunk)):
        conn.sendall(chunk)


def test_a_find_answer_of_64_mib_is_aborted_at_one_mib_with_bounded_memory():
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    with fake_pacs(endless_find_answer) as pacs, peak_allocation() as peak:
        find = PeerFind(
            server_config(pacs.port),
            RouterSettings(max_pdu_size=OUR_MAX_PDU),
            STUDY_ROOT_FIND,
            query,
            20,
        )
        with pytest.raises(PeerFindError, match="data set over 1048576 bytes") as raised:
            list(find.answers())
        find.close()
    assert raised.value.kind == "aborted"
    assert peak[0] < 6 * 1024 * 1024


def get_script(dataset: bytes, answers: list) -> Callable[[socket.socket], None]:
    """A C-GET source: one C-STORE sub-operation carrying `dataset`, then the final C-GET-RSP.
    `answers` gets the C-STORE-RSP status, ("pdu", type) for anything else, ("reset", None) when the
    router closed the connection under it."""

    def script(conn: socket.socket) -> None:
        accept_association({1: EXPLICIT_VR_LE, 3: EXPLICIT_VR_LE})(conn)
        while (request := read_pdu(conn)) is not None and request[1][5] != 2:
            pass  # until the identifier's last fragment
        store = command_set(
            [
                (0x0002, CT.encode()),
                (0x0100, us(0x0001)),
                (0x0110, us(7)),
                (0x0700, us(0)),
                (0x0800, us(0)),
                (0x1000, b"1.2.3.4"),
            ]
        )
        step = OUR_MAX_PDU - 6
        try:
            conn.sendall(p_data(3, store, command=True))
            for start in range(0, len(dataset), step):
                conn.sendall(
                    p_data(
                        3,
                        dataset[start : start + step],
                        command=False,
                        last=start + step >= len(dataset),
                    )
                )
            response = read_pdu(conn)
        except OSError:
            # The router aborted and closed with our last PDUs unread (its kernel then resets the
            # connection): whether that reached us before the A-ABORT depends on socket buffers.
            answers.append(("reset", None))
            return
        if response is None or response[0] != P_DATA_TF:
            answers.append(("pdu", response and response[0]))
            return
        answers.append(struct.unpack("<H", parse_command(response[1][6:])[0x0900])[0])
        final = command_set(
            [(0x0100, us(0x8010)), (0x0120, us(1)), (0x0800, us(0x0101)), (0x0900, us(0))]
        )
        conn.sendall(p_data(1, final, command=True))
        if (release := read_pdu(conn)) is not None and release[0] == A_RELEASE_RQ:
            conn.sendall(pdu(A_RELEASE_RP, bytes(4)))

    return script


def get_from(pacs: FakePacs, router: RouterSettings, take, spill_folder: Path | None = None):
    """C-GET one study from the fake PACS, offering CT in explicit VR little endian."""
    storage = {CT: [EXPLICIT_VR_LE]}
    return get_instances(
        server_config(pacs.port), router, STUDY_ROOT_GET, identifier(), storage, take, spill_folder
    )


def identifier() -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    return query


def test_a_get_sub_operation_over_max_dataset_size_aborts_the_retrieve():
    router = replace(RouterSettings(), max_pdu_size=OUR_MAX_PDU, max_dataset_size=256 * 1024)
    answers: list = []
    with fake_pacs(get_script(b"\0" * (300 * 1024), answers)) as pacs:
        with pytest.raises(PeerMoveError, match="data set over 262144 bytes"):
            get_from(pacs, router, lambda instance: 0)
    pacs.thread.join(timeout=5)
    assert answers in ([("pdu", A_ABORT)], [("reset", None)]), "no C-STORE-RSP: the association was abandoned"


def test_a_large_get_sub_operation_goes_to_a_spill_file_as_it_arrives(tmp_path: Path):
    router = replace(RouterSettings(), max_pdu_size=OUR_MAX_PDU, max_in_memory_dataset=64 * 1024)
    dataset = bytes(range(256)) * 1200  # 300 KiB
    received: list[ReceivedInstance] = []
    answers: list[int] = []

    def take(instance: ReceivedInstance) -> int:
        received.append(instance)
        return 0

    with fake_pacs(get_script(dataset, answers)) as pacs:
        progress = get_from(pacs, router, take, tmp_path / "spill")
    assert progress.status == 0 and answers == [0]
    [instance] = received
    assert isinstance(instance.dataset, FileSlice)
    assert instance.dataset.path.parent == tmp_path / "spill"
    assert instance.dataset.path.read_bytes() == dataset and instance.dataset.length == len(dataset)
    instance.discard()
    assert list((tmp_path / "spill").iterdir()) == []


def test_a_small_get_sub_operation_stays_in_memory(tmp_path: Path):
    router = replace(RouterSettings(), max_pdu_size=OUR_MAX_PDU)
    received: list[ReceivedInstance] = []
    with fake_pacs(get_script(b"\1" * 5000, [])) as pacs:
        get_from(pacs, router, lambda instance: received.append(instance) or 0, tmp_path)
    assert received[0].dataset == b"\1" * 5000
    assert list(tmp_path.iterdir()) == []


def test_echo_reports_a_peer_breaking_the_protocol_as_unreachable():
    def script(conn: socket.socket) -> None:
        read_pdu(conn)
        conn.sendall(struct.pack(">BxI", A_ASSOCIATE_AC, 0x7FFFFFFF))

    with fake_pacs(script) as pacs:
        result = echo_peer(server_config(pacs.port), RouterSettings(), timeout_s=2)
    assert result.status == "unreachable"
    assert "protocol violation" in result.detail and "more than 1048576" in result.detail


def test_a_peer_announcing_a_tiny_maximum_pdu_length_is_refused():
    """One PDU per byte of a 2 GB data set would cost the router its CPU."""

    def script(conn: socket.socket) -> None:
        read_pdu(conn)
        conn.sendall(pdu(A_ASSOCIATE_AC, associate_ac_body({1: EXPLICIT_VR_LE}, max_pdu=16)))

    with fake_pacs(script) as pacs:
        with pytest.raises(ProtocolViolation, match="maximum PDU length of 16 bytes"):
            link_to(pacs)
    pacs.thread.join(timeout=5)
    assert pacs.after_script == [A_ABORT]


def test_an_accepted_transfer_syntax_that_is_not_ascii_counts_as_refused():
    def script(conn: socket.socket) -> None:
        read_pdu(conn)
        body = associate_ac_body({1: EXPLICIT_VR_LE}).replace(EXPLICIT_VR_LE.encode(), b"\xff" * 19)
        conn.sendall(pdu(A_ASSOCIATE_AC, body))

    with fake_pacs(script) as pacs:
        link = link_to(pacs)
        assert link.contexts == {} and link.refused == [(CT, EXPLICIT_VR_LE)]
        link.abort()
