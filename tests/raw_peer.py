"""A DICOM peer on a raw socket, for sending what no well-behaved library would."""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

from dicomrouter.dul.dimse import us
from dicomrouter.net.upper_layer import (
    APPLICATION_CONTEXT,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    command_set,
)

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
VERIFICATION = "1.2.840.10008.1.1"


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body)) + body


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(payload)) + payload


def associate_rq(
    calling_ae: str,
    called_ae: str,
    abstract_syntax: str = VERIFICATION,
    transfer_syntaxes: tuple[str, ...] = (EXPLICIT_VR_LE, IMPLICIT_VR_LE),
    max_pdu: int = 65536,
) -> bytes:
    """A-ASSOCIATE-RQ with one presentation context (ID 1)."""
    context = bytes([1, 0, 0, 0]) + _item(0x30, abstract_syntax.encode())
    context += b"".join(_item(0x40, syntax.encode()) for syntax in transfer_syntaxes)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4.5")
    body = struct.pack(">HH", 1, 0) + called_ae.encode().ljust(16) + calling_ae.encode().ljust(16) + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode()) + _item(0x20, context) + _item(0x50, user)
    return pdu(A_ASSOCIATE_RQ, body)


def associate_ac_body(accepted: dict[int, str], rejected: tuple[int, ...] = (), max_pdu: int = 16384) -> bytes:
    """The body of an A-ASSOCIATE-AC (no PDU header): context ID -> accepted transfer syntax,
    the IDs of contexts rejected (result 3: abstract syntax not supported), our maximum length."""
    body = struct.pack(">HH", 1, 0) + b" " * 32 + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, syntax in accepted.items():
        body += _item(0x21, bytes([context_id, 0, 0, 0]) + _item(0x40, syntax.encode()))
    for context_id in rejected:
        body += _item(0x21, bytes([context_id, 0, 3, 0]) + _item(0x40, IMPLICIT_VR_LE.encode()))
    return body + _item(0x50, _item(0x51, struct.pack(">I", max_pdu)))


def p_data(context_id: int, data: bytes, command: bool, last: bool = True) -> bytes:
    header = (1 if command else 0) | (2 if last else 0)
    return pdu(P_DATA_TF, struct.pack(">IBB", len(data) + 2, context_id, header) + data)


def echo_command(message_id: int = 1) -> bytes:
    return command_set(
        [(0x0002, VERIFICATION.encode()), (0x0100, us(0x0030)), (0x0110, us(message_id)), (0x0800, us(0x0101))]
    )


def store_command(sop_class_uid: str, sop_instance_uid: str, message_id: int = 1) -> bytes:
    return command_set(
        [
            (0x0002, sop_class_uid.encode()),
            (0x0100, us(0x0001)),
            (0x0110, us(message_id)),
            (0x0700, us(0x0000)),
            (0x0800, us(0x0000)),
            (0x1000, sop_instance_uid.encode()),
        ]
    )


def find_command(sop_class_uid: str, message_id: int = 1) -> bytes:
    return command_set(
        [(0x0002, sop_class_uid.encode()), (0x0100, us(0x0020)), (0x0110, us(message_id)), (0x0700, us(0)), (0x0800, us(0))]
    )


@dataclass
class Closed:
    """How a connection ended from the peer's side."""

    seconds: float  # from the call to the router closing it (or the timeout)
    closed: bool  # False: still open at the timeout
    pdu_types: list[int]  # PDUs the router sent meanwhile


class RawPeer:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass  # the router may already have hung up: that is what the caller checks next

    def finish_sending(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def read_exactly(self, count: int, deadline: float) -> bytes:
        data = bytearray()
        while len(data) < count:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def read_pdu(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """The next PDU, or None when the router closed the connection."""
        deadline = time.monotonic() + timeout
        header = self.read_exactly(6, deadline)
        if len(header) < 6:
            return None
        pdu_type, length = struct.unpack(">BxI", header)
        return pdu_type, self.read_exactly(length, deadline)

    def associate(self, calling_ae: str = "WORKSTATION", called_ae: str = "DICOMROUTER", **kwargs) -> bytes:
        self.send(associate_rq(calling_ae, called_ae, **kwargs))
        answer = self.read_pdu()
        assert answer is not None and answer[0] == A_ASSOCIATE_AC, f"not accepted: {answer!r}"
        return answer[1]

    def wait_closed(self, timeout: float) -> Closed:
        """Read (and drop) whatever the router sends until it closes the connection."""
        started = time.monotonic()
        deadline = started + timeout
        types: list[int] = []
        buffered = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Closed(time.monotonic() - started, False, types)
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return Closed(time.monotonic() - started, False, types)
            except OSError:  # reset
                return Closed(time.monotonic() - started, True, types)
            if not chunk:
                return Closed(time.monotonic() - started, True, types)
            buffered += chunk
            while len(buffered) >= 6:
                pdu_type, length = struct.unpack(">BxI", buffered[:6])
                if len(buffered) < 6 + length:
                    break
                types.append(pdu_type)
                buffered = buffered[6 + length :]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def process_figures(pid: int) -> dict[str, int]:
    """Resident memory (KiB) and thread count of a process, from /proc."""
    figures = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                figures["rss_kib"] = int(value.split()[0])
            elif key == "Threads":
                figures["threads"] = int(value)
    figures["open_fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return figures
