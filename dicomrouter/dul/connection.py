"""One accepted TCP (or TLS) connection, and the capped, deadline-bound PDU reader over it."""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dicomrouter.dul.pdu import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    ABORT_INVALID_PARAMETER,
    ABORT_NOT_SPECIFIED,
    ABORT_UNEXPECTED_PDU,
    MAX_ASSOCIATION_PDU_LENGTH,
    P_DATA_SLACK,
    P_DATA_TF,
    PDU_HEADER_LENGTH,
)

ABORT_DRAIN_S = 1.0  # after an A-ABORT, read what the peer still sends for at most this long


class SessionEnded(Exception):
    """The association is over (released, aborted, dropped); `reason` for the log."""

    def __init__(self, reason: str, warn: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.warn = warn


class ProtocolViolation(Exception):
    """The peer broke the protocol: answer with `abort_pdu`, then hang up."""

    def __init__(self, reason: str, abort_pdu: bytes = ABORT_UNEXPECTED_PDU):
        super().__init__(reason)
        self.reason = reason
        self.abort_pdu = abort_pdu


@dataclass(eq=False)
class Connection:
    """An accepted connection as the front counts, stops and writes to it."""

    sock: socket.socket
    address: str
    accepted_at: float = field(default_factory=time.monotonic)
    is_established: bool = False
    heard_from: bool = False  # the peer sent at least one byte (a silent connection may be evicted)
    kind: str | None = None  # the caller's kind once associated (client, server, unknown)
    _send_lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False

    @property
    def send_lock(self) -> threading.Lock:
        """Held while one message's PDUs go out, so another thread's PDU never lands inside them."""
        return self._send_lock

    def send(self, data: bytes | memoryview) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def send_locked(self, data: bytes | memoryview) -> None:
        """Send while the caller holds `send_lock`."""
        self.sock.sendall(data)

    def send_quietly(self, data: bytes) -> None:
        try:
            self.sock.settimeout(1.0)
            self.send(data)
        except OSError:
            pass

    def abort(self) -> None:
        """A-ABORT (when associated) and hang up; the thread serving it ends on its next read."""
        if self._closed:
            return
        if self.is_established:
            self.send_quietly(ABORT_NOT_SPECIFIED)
        self.close()

    def abort_and_drain(self, abort_pdu: bytes) -> None:
        """A-ABORT, then read what the peer still sends for a moment before closing: closing with
        unread data resets the connection, and the peer might never see the A-ABORT."""
        self.send_quietly(abort_pdu)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        self.read_until_closed(ABORT_DRAIN_S)

    def read_until_closed(self, seconds: float) -> None:
        """Read and drop what the peer sends until it closes, for at most `seconds`."""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
                if not self.sock.recv(65536):
                    break
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class PduReader:
    """Whole PDUs off a blocking socket, each within a deadline, every length capped on its header.

    Deadlines are kept with select(), not the socket's timeout: another thread may be sending on
    the same socket (a C-FIND's answers while the reader waits for a C-CANCEL), and the timeout
    is the socket's, shared by both directions.
    """

    def __init__(self, connection: Connection, max_pdu_size: int, timeout_s: float):
        self.connection = connection
        self.sock = connection.sock
        self.max_pdu_size = max_pdu_size  # what we announced: P-DATA-TF bodies may not exceed it (plus slack)
        self.timeout_s = timeout_s
        self._header = bytearray(PDU_HEADER_LENGTH)

    def _readable(self, timeout_s: float) -> bool:
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], max(timeout_s, 0.0))
        except (OSError, ValueError):  # closed by stop() meanwhile
            raise SessionEnded("connection closed by the router") from None
        return bool(readable)

    def _recv_into(self, view: memoryview) -> int:
        try:
            count = self.sock.recv_into(view)
        except (ssl.SSLWantReadError, BlockingIOError, TimeoutError):
            return -1  # select saw TLS record bytes, not yet a whole record
        except OSError as exc:
            raise SessionEnded(f"connection lost ({exc})") from None
        if count == 0:
            raise SessionEnded("the peer closed the connection")
        return count

    def fill(self, view: memoryview, deadline: float, what: str) -> None:
        got = 0
        while got < len(view):
            if not self._readable(deadline - time.monotonic()):
                raise SessionEnded(f"no complete {what} within {self.timeout_s:g} s", warn=True)
            count = self._recv_into(view[got:])
            if count > 0:
                got += count

    def read_header(self, idle_reason: str, busy: Callable[[], bool] | None = None) -> tuple[int, int, float]:
        """(PDU type, length, deadline for its body); the length is checked before any body byte is read.

        A peer silent for the whole timeout ends the session, unless `busy()` says it is waiting
        for us (a long C-MOVE), in which case the wait goes on.
        """
        header = memoryview(self._header)
        while True:
            if self._readable(self.timeout_s):
                first = self._recv_into(header)
                if first > 0:
                    break
                continue
            if busy is None or not busy():
                raise SessionEnded(idle_reason, warn=True)
        deadline = time.monotonic() + self.timeout_s
        self.connection.heard_from = True
        self.fill(header[first:], deadline, "PDU")
        pdu_type, length = struct.unpack(">BxI", self._header)
        if pdu_type not in (P_DATA_TF, A_RELEASE_RQ, A_ABORT, A_ASSOCIATE_RQ, A_RELEASE_RP):
            raise ProtocolViolation(f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNEXPECTED_PDU)
        cap = self.max_pdu_size + P_DATA_SLACK if pdu_type == P_DATA_TF else MAX_ASSOCIATION_PDU_LENGTH
        if pdu_type in (A_RELEASE_RQ, A_RELEASE_RP, A_ABORT):
            cap = 4
        if length > cap:
            raise ProtocolViolation(
                f"PDU type 0x{pdu_type:02X} announces {length} bytes, more than {cap}", ABORT_INVALID_PARAMETER
            )
        return pdu_type, length, deadline

    def read(self, idle_reason: str | None = None, busy: Callable[[], bool] | None = None) -> tuple[int, bytearray]:
        """(PDU type, body); an idle or slow peer ends the session after the timeout."""
        pdu_type, length, deadline = self.read_header(idle_reason or f"idle for {self.timeout_s:g} s", busy)
        body = bytearray(length)
        self.fill(memoryview(body), deadline, "PDU")
        return pdu_type, body
