"""One accepted TCP (or TLS) connection, and the capped, deadline-bound PDU reader over it."""

from __future__ import annotations

import os
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
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
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


def set_timeout(sock: socket.socket, seconds: float) -> None:
    """The socket's timeout for sends, set only when it changes (each setting is a system call)."""
    if sock.gettimeout() != seconds:
        sock.settimeout(seconds)


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

    def mark_heard_from(self) -> None:
        self.heard_from = True  # from now on never dropped to make room for another connection

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


class PduTimeout(Exception):
    """The deadline passed before a whole PDU arrived; what did arrive is kept for the next read."""


class PeerClosed(Exception):
    """The peer closed the connection (or it broke) between or inside PDUs."""


class PduRefused(Exception):
    """A PDU header the reader will not read on from: an unknown type or a length over its cap."""

    def __init__(self, reason: str, abort_pdu: bytes):
        super().__init__(reason)
        self.reason = reason
        self.abort_pdu = abort_pdu


def pdu_cap(pdu_type: int, pdata_limit: int) -> int:
    """The largest length the router reads for a PDU of `pdu_type` (PS3.8 9.3: release and abort are 4 bytes)."""
    if pdu_type == P_DATA_TF:
        return pdata_limit
    if pdu_type in (A_RELEASE_RQ, A_RELEASE_RP, A_ABORT):
        return 4
    return MAX_ASSOCIATION_PDU_LENGTH


class PduStream:
    """The one PDU reader, for the acceptor and the requestor alike.

    Whole PDUs off one socket: each length checked against its cap as soon as the 6-byte header is
    in, before a byte of the body is read or allocated; every wait bounded by a deadline (poll, not
    the socket's timeout, which is shared with the thread sending on the same socket). A deadline
    passing mid-PDU keeps what arrived: the next call goes on with the same PDU.

    `read_ahead`: receive up to this many bytes at a time and keep what follows the PDU for the next
    call. A requestor reading a thousand small C-FIND answers then makes one system call for many
    PDUs instead of two per PDU (each one a trip through the GIL). Bodies larger than it are still
    read straight into their own buffer. Only for a stream that reads the socket for as long as it
    is open (the acceptor hands the socket from one reader to the next: it reads exactly).
    """

    def __init__(
        self,
        sock: socket.socket,
        pdata_limit: int,
        on_first_byte: Callable[[], None] | None = None,
        read_ahead: int = 0,
    ):
        self.sock = sock
        self.pdata_limit = pdata_limit  # P-DATA-TF: the maximum length we announced, plus slack
        self._on_first_byte = on_first_byte
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        self._header = bytearray(PDU_HEADER_LENGTH)
        self._header_got = 0
        self._pdu_type = 0
        self._body: bytearray | None = None
        self._body_got = 0
        self.heard_from = False
        self._ahead = bytearray(read_ahead)
        self._ahead_view = memoryview(self._ahead)
        self._buffered = bytearray()  # received, not yet returned (read_ahead only)

    @property
    def mid_pdu(self) -> bool:
        """Part of a PDU arrived and the rest is awaited."""
        return self._header_got > 0 or bool(self._buffered)

    def _wait(self, deadline: float) -> None:
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PduTimeout()
        try:
            ready = self._poll.poll(remaining * 1000)
        except (OSError, ValueError):  # closed by another thread (stop) meanwhile
            raise PeerClosed("connection closed by the router") from None
        if not ready:
            raise PduTimeout()

    def _recv_into(self, view: memoryview, deadline: float) -> int:
        sock = self.sock
        if sock.gettimeout() is not None and not isinstance(sock, ssl.SSLSocket):
            count = self._recv_ready(view, deadline)
        else:
            self._wait(deadline)
            try:
                count = sock.recv_into(view)
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                return 0  # TLS record bytes, not yet a whole record: wait again
        if count == 0:
            raise PeerClosed("the peer closed the connection")
        if not self.heard_from:
            self.heard_from = True
            if self._on_first_byte is not None:
                self._on_first_byte()
        return count

    def _recv_ready(self, view: memoryview, deadline: float) -> int:
        """Read from a plain socket with a timeout (its descriptor never blocks): what is there at once,
        polling only when nothing is. The socket's own recv would poll before every read, and each
        system call is a trip through the GIL."""
        while True:
            try:
                return os.readv(self.sock.fileno(), (view,))
            except BlockingIOError:
                self._wait(deadline)

    def enable_read_ahead(self, size: int) -> None:
        """From now on receive up to `size` bytes at a time (see the class); for a reader that keeps
        the socket from here on. Nothing is buffered yet: until now it read exactly."""
        if not self._ahead and size > 0 and not self.mid_pdu:
            self._ahead = bytearray(size)
            self._ahead_view = memoryview(self._ahead)

    def _check_header(self) -> tuple[int, int]:
        pdu_type, length = struct.unpack(">BxI", self._header)
        if pdu_type not in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ,
                            A_RELEASE_RP, A_ABORT):
            raise PduRefused(f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNEXPECTED_PDU)
        cap = pdu_cap(pdu_type, self.pdata_limit)
        if length > cap:
            raise PduRefused(
                f"PDU type 0x{pdu_type:02X} announces {length} bytes, more than {cap}", ABORT_INVALID_PARAMETER
            )
        return pdu_type, length

    def _read_ahead(self, deadline: float) -> None:
        count = self._recv_into(self._ahead_view, deadline)
        self._buffered += self._ahead_view[:count]

    def _read_buffered(self, deadline: float) -> tuple[int, bytearray]:
        buffered = self._buffered
        while len(buffered) < PDU_HEADER_LENGTH:
            self._read_ahead(deadline)
        self._header[:] = buffered[:PDU_HEADER_LENGTH]
        pdu_type, length = self._check_header()
        end = PDU_HEADER_LENGTH + length
        if length <= len(self._ahead):
            while len(buffered) < end:
                self._read_ahead(deadline)
            body = buffered[PDU_HEADER_LENGTH:end]
            del buffered[:end]
            return pdu_type, body
        # A large body: what came with the header starts it, the rest is read into it directly.
        taken = min(len(buffered), end) - PDU_HEADER_LENGTH
        self._pdu_type, self._body, self._body_got = pdu_type, bytearray(length), taken
        self._body[:taken] = buffered[PDU_HEADER_LENGTH : PDU_HEADER_LENGTH + taken]
        del buffered[: PDU_HEADER_LENGTH + taken]
        self._header_got = PDU_HEADER_LENGTH
        return self._read_body(deadline)

    def read(self, deadline: float) -> tuple[int, bytearray]:
        """(PDU type, body). PduTimeout, PeerClosed, PduRefused; OSError (ssl.SSLError) as the socket raised it."""
        if self._ahead and self._body is None:
            return self._read_buffered(deadline)
        header = memoryview(self._header)
        while self._header_got < PDU_HEADER_LENGTH:
            self._header_got += self._recv_into(header[self._header_got :], deadline)
        if self._body is None:
            pdu_type, length = self._check_header()
            self._pdu_type, self._body, self._body_got = pdu_type, bytearray(length), 0
        return self._read_body(deadline)

    def _read_body(self, deadline: float) -> tuple[int, bytearray]:
        body = self._body
        assert body is not None
        view = memoryview(body)
        while self._body_got < len(body):
            self._body_got += self._recv_into(view[self._body_got :], deadline)
        self._header_got, self._body = 0, None
        return self._pdu_type, body


class PduReader:
    """The acceptor's view of the PDU stream: an idle peer ends the association after the timeout
    (unless it is waiting for us), a slow one once a PDU takes longer than that, a refused header
    with an A-ABORT."""

    def __init__(self, connection: Connection, max_pdu_size: int, timeout_s: float):
        self.connection = connection
        self.timeout_s = timeout_s
        self.stream = PduStream(connection.sock, max_pdu_size + P_DATA_SLACK, connection.mark_heard_from)

    def read(self, idle_reason: str | None = None, busy: Callable[[], bool] | None = None) -> tuple[int, bytearray]:
        """(PDU type, body); SessionEnded when the peer is gone, idle or too slow; ProtocolViolation."""
        idle_reason = idle_reason or f"idle for {self.timeout_s:g} s"
        while True:
            try:
                result = self.stream.read(time.monotonic() + self.timeout_s)
            except PduTimeout:
                if self.stream.mid_pdu:
                    raise SessionEnded(f"no complete PDU within {self.timeout_s:g} s", warn=True) from None
                if busy is not None and busy():
                    continue
                raise SessionEnded(idle_reason, warn=True) from None
            except PeerClosed as closed:
                raise SessionEnded(str(closed)) from None
            except PduRefused as refused:
                raise ProtocolViolation(refused.reason, refused.abort_pdu) from None
            except OSError as exc:
                raise SessionEnded(f"connection lost ({exc})") from None
            return result
