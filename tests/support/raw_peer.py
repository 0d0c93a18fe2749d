"""A DICOM peer on a raw socket, for sending what no well-behaved library would."""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

from tests.support.pdus import (  # noqa: F401  (re-exported: the canonical PDUs live in pdus.py)
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
    VERIFICATION,
    associate_ac_body,
    associate_rq,
    echo_command,
    find_command,
    p_data,
    pdu,
    store_command,
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
