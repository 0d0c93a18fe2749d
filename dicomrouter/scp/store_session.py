"""The front's lean path for storage associations: C-STORE and C-ECHO on one thread, no pynetdicom.

A modality's association is hundreds of C-STOREs, each answered only once the instance is safe
in the spool. pynetdicom passes every PDU through two threads (its DUL reader and the
association reactor, polling with sleeps), a state machine and pydicom's command decoding: on
a 2-core machine that was ~40% of the wall time of a 512 KiB C-STORE, time the modality
spends waiting for the response. Here one thread reads PDUs straight off the socket, keeps the
data set as the fragments arrived, calls the same receive service, and writes the response.

Only plain storage associations come here: an A-ASSOCIATE-RQ from a known client proposing
only storage and verification classes, with no role selection, extended negotiation or user
identity. Everything else (C-FIND, C-MOVE, C-GET, PACS delivering sub-operations, requests
this path does not parse) goes to pynetdicom unchanged: see scp/gate.py.

The same limits hold as on pynetdicom's path (scp/limits.py): PDU length caps checked on the
header, a deadline for every PDU, idle associations dropped after the network timeout,
router.max_dataset_size counted while a data set streams in. A peer breaking the protocol
gets an A-ABORT and a log line; the router keeps serving.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from dicomrouter.audit import AssociationAudit
from dicomrouter.logging import get_logger
from dicomrouter.net.acceptor_pdus import ACCEPTED, AssociateRequest, ContextResult
from dicomrouter.net.upper_layer import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
    command_set,
    parse_command,
    pdata_pdus,
    us,
)
from dicomrouter.routing.access import Caller
from dicomrouter.scp.limits import MAX_ASSOCIATION_PDU_LENGTH, P_DATA_SLACK, PDU_HEADER_LENGTH
from dicomrouter.scp.store import audit_outcome
from dicomrouter.store.receive import OUT_OF_RESOURCES, ReceiveResult
from dicomrouter.store.spool import PartialFile, Spool, SpoolError

log = get_logger(__name__)

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
ECHO_REFUSED = 0x0124  # refused: not authorized (the called AE is an inactive server), as a store to it
NO_DATASET = 0x0101
PDV_HEADER_LENGTH = 6  # item length (4), presentation context ID, message control header
VIEW_MIN_BYTES = 4096  # smaller data set fragments are copied, not held as views into their PDU
MAX_ERROR_COMMENT = 64  # (0000,0902) is LO

# A-ABORT, source 2 (service provider): reason 2 unexpected PDU, 6 invalid PDU parameter value (PS3.8 9.3.8)
ABORT_UNEXPECTED_PDU = struct.pack(">BxIxxBB", A_ABORT, 4, 2, 2)
ABORT_INVALID_PARAMETER = struct.pack(">BxIxxBB", A_ABORT, 4, 2, 6)
ABORT_NOT_SPECIFIED = struct.pack(">BxIxxBB", A_ABORT, 4, 2, 0)
ABORT_DRAIN_S = 1.0
RELEASE_WAIT_S = 2.0  # after A-RELEASE-RP the requestor closes the connection (Sta13)
RELEASE_RP = struct.pack(">BxIxxxx", A_RELEASE_RP, 4)

FILE_PREAMBLE = b"\0" * 128 + b"DICM"

# Receives one instance: (caller, called AE, Affected SOP Instance UID, file meta + data set, in memory or
# already in a spool file) -> result
StoreInstance = Callable[[Caller, str, str, "bytes | PartialFile", AssociationAudit], ReceiveResult]
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"


class SessionEnded(Exception):
    """The association is over (released, aborted, dropped); `reason` for the log."""

    def __init__(self, reason: str, warn: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.warn = warn


def _text(value: bytes) -> bytes:
    """A UI value as received, without its padding."""
    return value.rstrip(b"\0 ")


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH2sxxI", 2, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def file_meta(sop_class: bytes, sop_instance: bytes, transfer_syntax: str, implementation_uid: str, version: str,
              source_ae: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) for a received data set."""
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\0\1"),
            _meta_element(0x0002, b"UI", sop_class),
            _meta_element(0x0003, b"UI", sop_instance),
            _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii")),
            _meta_element(0x0012, b"UI", implementation_uid.encode("ascii")),
            _meta_element(0x0013, b"SH", version.encode("ascii")[:16]),
            _meta_element(0x0016, b"AE", source_ae.encode("ascii", "replace")[:16]),
        )
    )
    return FILE_PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<I", len(elements))) + elements


@dataclass
class SessionLimits:
    max_pdu_size: int  # what we announced: P-DATA-TF bodies may not exceed it (plus slack)
    max_dataset_size: int
    max_in_memory_dataset: int  # beyond it a data set is written to the spool as it arrives
    network_timeout_s: float
    implementation_class_uid: str
    implementation_version: str


@dataclass(eq=False)
class LeanConnection:
    """A connection on the lean path, as the front counts and stops it (like a pynetdicom Association)."""

    sock: socket.socket
    address: str
    is_established: bool = False
    router_admitted: bool = False
    _router_dropped: bool = False
    _send_lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def abort(self) -> None:
        """A-ABORT (when associated) and hang up; the session's thread ends on its next read."""
        if self._closed:
            return
        if self.is_established:
            try:
                self.sock.settimeout(1.0)
                self.send(ABORT_NOT_SPECIFIED)  # source 2, reason 0: not specified
            except OSError:
                pass
        self.close()

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
    """Whole PDUs off a blocking socket, each within a deadline, lengths capped on the header."""

    def __init__(self, connection: LeanConnection, limits: SessionLimits):
        self.sock = connection.sock
        self.limits = limits
        self._header = bytearray(PDU_HEADER_LENGTH)

    def _fill(self, view: memoryview, deadline: float, what: str) -> None:
        got = 0
        while got < len(view):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SessionEnded(f"no complete {what} within {self.limits.network_timeout_s:g} s", warn=True)
            self.sock.settimeout(remaining)
            try:
                count = self.sock.recv_into(view[got:])
            except TimeoutError:
                continue
            except OSError as exc:
                raise SessionEnded(f"connection lost ({exc})") from None
            if count == 0:
                raise SessionEnded("the peer closed the connection")
            got += count

    def read(self) -> tuple[int, bytearray]:
        """(PDU type, body); idle or slow peers end the session after the network timeout."""
        timeout = self.limits.network_timeout_s
        deadline = time.monotonic() + timeout
        header = memoryview(self._header)
        self.sock.settimeout(timeout)
        try:
            first = self.sock.recv_into(header)
        except TimeoutError:
            raise SessionEnded(f"idle for {timeout:g} s (router.network_timeout)", warn=True) from None
        except OSError as exc:
            raise SessionEnded(f"connection lost ({exc})") from None
        if first == 0:
            raise SessionEnded("the peer closed the connection")
        self._fill(header[first:], deadline, "PDU")
        pdu_type, length = struct.unpack(">BxI", self._header)
        cap = self.limits.max_pdu_size + P_DATA_SLACK if pdu_type == P_DATA_TF else MAX_ASSOCIATION_PDU_LENGTH
        if pdu_type not in (P_DATA_TF, A_RELEASE_RQ, A_ABORT, A_ASSOCIATE_RQ, A_RELEASE_RP):
            raise ProtocolViolation(f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNEXPECTED_PDU)
        if length > cap:
            raise ProtocolViolation(f"PDU type 0x{pdu_type:02X} announces {length} bytes, more than {cap}",
                                    ABORT_INVALID_PARAMETER)
        body = bytearray(length)
        self._fill(memoryview(body), deadline, "PDU")
        return pdu_type, body


class ProtocolViolation(Exception):
    """The peer broke the protocol: answer with `abort_pdu`, then hang up."""

    def __init__(self, reason: str, abort_pdu: bytes = ABORT_UNEXPECTED_PDU):
        super().__init__(reason)
        self.reason = reason
        self.abort_pdu = abort_pdu


@dataclass
class _Incoming:
    """A C-STORE whose command arrived and whose data set is streaming in."""

    context_id: int
    message_id: int
    sop_class: bytes
    sop_instance: bytes
    # File meta, then the data set so far: large fragments as views into their PDU (no copy), small ones
    # copied together, so a peer sending tiny fragments cannot keep one PDU alive per byte.
    chunks: list[memoryview | bytearray] = field(default_factory=list)
    size: int = 0  # data set bytes, plus the PDV header of each fragment (empty fragments are not free)
    partial: PartialFile | None = None  # a large data set goes to the spool as it arrives
    failure: ReceiveResult | None = None  # it could not be kept: the rest is read and dropped

    def keep(self, fragment: memoryview, pdu_length: int) -> None:
        if len(fragment) >= VIEW_MIN_BYTES and 2 * len(fragment) >= pdu_length:
            self.chunks.append(fragment)  # most of its PDU: holding the PDU costs at most as much again
        elif self.chunks and isinstance(self.chunks[-1], bytearray):
            self.chunks[-1] += fragment
        else:
            self.chunks.append(bytearray(fragment))

    def drop(self) -> None:
        self.chunks.clear()
        if self.partial is not None:
            self.partial.discard()


class StoreSession:
    """One accepted storage association, served on the calling thread until it ends."""

    def __init__(
        self,
        connection: LeanConnection,
        request: AssociateRequest,
        results: list[ContextResult],
        caller: Caller,
        audit: AssociationAudit,
        store: StoreInstance,
        limits: SessionLimits,
        spool: Spool,
        echo_refusal: Callable[[str], str | None] | None = None,
    ):
        self.echo_refusal = echo_refusal  # called AE -> why an echo to it is refused (an inactive server)
        self.connection = connection
        self.request = request
        self.contexts: Mapping[int, ContextResult] = {r.context_id: r for r in results if r.result == ACCEPTED}
        self.caller = caller
        self.audit = audit
        self.store = store
        self.limits = limits
        self.spool = spool
        self.reader = PduReader(connection, limits)
        self._command = bytearray()
        self._incoming: _Incoming | None = None
        self.outcomes: Counter[str] = Counter()  # C-STORE outcomes (success, refused, failed), for the closing log line
        self.log = log.bind(calling_ae=request.calling_ae, called_ae=request.called_ae, address=connection.address)

    def serve(self) -> None:
        """Read and answer until release, abort or a broken peer; never raises."""
        try:
            while True:
                pdu_type, body = self.reader.read()
                if pdu_type == P_DATA_TF:
                    self._on_pdata(body)
                elif pdu_type == A_RELEASE_RQ:
                    self._release()
                    return
                elif pdu_type == A_ABORT:
                    self.log.info("association_aborted", by="peer")
                    return
                else:
                    raise ProtocolViolation(f"unexpected PDU type 0x{pdu_type:02X} on an established association")
        except SessionEnded as ended:
            if ended.warn:  # idle or stalled: tell the peer why the connection goes
                self.log.warning("association_dropped", reason=ended.reason)
                self._send_quietly(ABORT_NOT_SPECIFIED)
            else:
                self.log.info("association_ended", reason=ended.reason)
        except OSError as exc:  # a response could not be sent: the peer or stop() hung up
            self.log.info("association_ended", reason=f"connection lost ({exc})")
        except ProtocolViolation as violation:
            self.log.warning("association_dropped", reason=violation.reason)
            self._abort(violation.abort_pdu)
        except Exception:
            self.log.exception("association_failed")
            self._abort(ABORT_NOT_SPECIFIED)
        finally:
            self.connection.close()
            if self._incoming is not None:  # cut off mid data set: nothing of it is kept
                self._incoming.drop()
            if self.outcomes:
                self.log.info("stores_received", **dict(self.outcomes))

    def _abort(self, abort_pdu: bytes) -> None:
        """A-ABORT, then read what the peer still sends for a moment before closing: closing with
        unread data would reset the connection, and the peer might never see the A-ABORT."""
        self._send_quietly(abort_pdu)
        try:
            self.connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        self._read_until_closed(ABORT_DRAIN_S)

    def _read_until_closed(self, seconds: float) -> None:
        """Read and drop what the peer sends until it closes, for at most `seconds`."""
        sock = self.connection.sock
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                if not sock.recv(65536):
                    break
        except OSError:
            pass

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.connection.sock.settimeout(1.0)
            self.connection.send(data)
        except OSError:
            pass

    def _release(self) -> None:
        """A-RELEASE-RP, then let the requestor close first (Sta13), for at most a moment."""
        self.connection.sock.settimeout(self.limits.network_timeout_s)
        self.connection.send(RELEASE_RP)
        self._read_until_closed(RELEASE_WAIT_S)
        self.log.debug("association_released")

    # ------------------------------------------------------------------ DIMSE

    def _on_pdata(self, body: bytearray) -> None:
        view = memoryview(body)
        offset = 0
        while offset < len(body):
            if offset + 6 > len(body):
                raise ProtocolViolation("truncated PDV header", ABORT_INVALID_PARAMETER)
            (length,) = struct.unpack_from(">I", body, offset)
            end = offset + 4 + length
            if length < 2 or end > len(body):
                raise ProtocolViolation(f"PDV of {length} bytes does not fit its PDU", ABORT_INVALID_PARAMETER)
            context_id, control = body[offset + 4], body[offset + 5]
            if context_id not in self.contexts:
                raise ProtocolViolation(f"PDV on presentation context {context_id}, which was not accepted")
            fragment = view[offset + 6 : end]
            if control & 1:
                self._on_command_fragment(context_id, fragment, bool(control & 2))
            else:
                self._on_dataset_fragment(context_id, fragment, bool(control & 2), len(body))
            offset = end

    def _on_command_fragment(self, context_id: int, fragment: memoryview, last: bool) -> None:
        if self._incoming is not None:
            raise ProtocolViolation("a command arrived while a data set was incomplete")
        self._command += fragment
        if len(self._command) > 65536:
            raise ProtocolViolation("command set over 64 KiB", ABORT_INVALID_PARAMETER)
        if not last:
            return
        command = parse_command(bytes(self._command))
        self._command = bytearray()

        def number(element: int) -> int | None:
            value = command.get(element)
            return int.from_bytes(value[:2], "little") if value and len(value) >= 2 else None

        command_field, message_id, dataset_type = number(0x0100), number(0x0110), number(0x0800)
        if command_field is None or message_id is None or dataset_type is None:
            raise ProtocolViolation("command set without Command Field, Message ID or Command Data Set Type")
        sop_class = _text(command.get(0x0002, b""))
        if command_field == C_ECHO_RQ:
            if dataset_type != NO_DATASET:
                raise ProtocolViolation("C-ECHO-RQ announcing a data set")
            refusal = self.echo_refusal(self.request.called_ae) if self.echo_refusal else None
            if refusal:
                self.log.warning("echo_refused", reason=refusal, status="0x0124")
                self.audit.record("echo", "refused", detail=refusal)
                self._respond(context_id, C_ECHO_RSP, message_id, sop_class, None, ECHO_REFUSED, refusal)
            else:
                self._respond(context_id, C_ECHO_RSP, message_id, sop_class, None, 0x0000, "")
                self.log.debug("echo")
                self.audit.record("echo", "success")
        elif command_field == C_STORE_RQ:
            if dataset_type == NO_DATASET:
                raise ProtocolViolation("C-STORE-RQ without a data set")
            incoming = _Incoming(context_id, message_id, sop_class, _text(command.get(0x1000, b"")))
            incoming.chunks.append(bytearray(self._file_meta(incoming)))
            self._incoming = incoming
        else:
            raise ProtocolViolation(f"command 0x{command_field:04X} on a storage association")

    def _on_dataset_fragment(self, context_id: int, fragment: memoryview, last: bool, pdu_length: int) -> None:
        incoming = self._incoming
        if incoming is None or incoming.context_id != context_id:
            raise ProtocolViolation("a data set fragment without its C-STORE command")
        incoming.size += len(fragment) + PDV_HEADER_LENGTH
        if incoming.size > self.limits.max_dataset_size:
            raise ProtocolViolation(
                f"data set over router.max_dataset_size ({self.limits.max_dataset_size} bytes)", ABORT_INVALID_PARAMETER
            )
        if incoming.failure is None:
            try:
                if incoming.partial is not None:
                    incoming.partial.write(fragment)
                else:
                    incoming.keep(fragment, pdu_length)
                    if incoming.size > self.limits.max_in_memory_dataset and self._may_stream(incoming):
                        self._start_streaming(incoming)
            except SpoolError as exc:
                incoming.drop()
                incoming.failure = ReceiveResult(OUT_OF_RESOURCES, str(exc))
                self.log.error("store_refused", reason=str(exc), sop_instance_uid=incoming.sop_instance[:80].decode("latin-1"))
        if last:
            self._incoming = None
            self._store(incoming)

    def _may_stream(self, incoming: _Incoming) -> bool:
        # A deflated data set must be inflated to be checked: it stays in memory (max_dataset_size bounds it).
        return self.contexts[incoming.context_id].transfer_syntax != DEFLATED_EXPLICIT_VR_LE

    def _start_streaming(self, incoming: _Incoming) -> None:
        """Move what arrived so far into a spool file; the rest is written there as it comes."""
        partial = self.spool.open_partial()
        incoming.partial = partial
        self.log.info(
            "store_streaming_to_spool", sop_instance_uid=incoming.sop_instance[:80].decode("latin-1"),
            received_bytes=incoming.size, max_in_memory_dataset=self.limits.max_in_memory_dataset,
        )
        for chunk in incoming.chunks:
            partial.write(chunk)
        incoming.chunks.clear()

    def _file_meta(self, incoming: _Incoming) -> bytes:
        return file_meta(
            incoming.sop_class,
            incoming.sop_instance,
            self.contexts[incoming.context_id].transfer_syntax,
            self.limits.implementation_class_uid,
            self.limits.implementation_version,
            self.request.calling_ae,
        )

    def _store(self, incoming: _Incoming) -> None:
        sop_instance_uid = incoming.sop_instance.decode("latin-1")
        if incoming.failure is not None:
            result = incoming.failure
            self.audit.count_store(None, audit_outcome(result.status), (), result.comment)
        elif incoming.partial is not None:
            result = self.store(self.caller, self.request.called_ae, sop_instance_uid, incoming.partial, self.audit)
        else:
            encoded = b"".join(incoming.chunks)
            incoming.chunks.clear()
            result = self.store(self.caller, self.request.called_ae, sop_instance_uid, encoded, self.audit)
        self.outcomes[audit_outcome(result.status)] += 1
        self._respond(
            incoming.context_id, C_STORE_RSP, incoming.message_id, incoming.sop_class, incoming.sop_instance,
            result.status, result.comment,
        )

    def _respond(
        self, context_id: int, command_field: int, message_id: int, sop_class: bytes, sop_instance: bytes | None,
        status: int, comment: str,
    ) -> None:
        elements = [(0x0002, sop_class), (0x0100, us(command_field)), (0x0120, us(message_id)),
                    (0x0800, us(NO_DATASET)), (0x0900, us(status))]
        if comment and status != 0x0000:
            text = comment[:MAX_ERROR_COMMENT].encode("latin-1", "replace")
            elements.append((0x0902, text + b" " * (len(text) % 2)))
        if sop_instance is not None:
            elements.append((0x1000, sop_instance))
        self.connection.sock.settimeout(self.limits.network_timeout_s)  # not what was left of the last read's deadline
        self.connection.send(pdata_pdus(context_id, command_set(elements), True, self.request.max_pdu))


# ---------------------------------------------------------------------- the association request


@dataclass(frozen=True)
class FirstPdu:
    """What a new connection sent before anything was decided."""

    data: bytes  # every byte read, to replay to pynetdicom if this path does not take the connection
    complete: bool  # a whole A-ASSOCIATE-RQ (header and body) within the caps
    ended: str | None = None  # why reading stopped short: the peer closed or stalled
    stalled: bool = False


def read_first_pdu(sock: socket.socket, timeout_s: float) -> FirstPdu:
    """Read the connection's first PDU if it is an A-ASSOCIATE-RQ of acceptable length.

    Anything else (another PDU type, an oversized length) stops after the header: the bytes go
    to pynetdicom's acceptor, which answers them as before.
    """
    deadline = time.monotonic() + timeout_s
    data = bytearray()

    def fill(count: int) -> str | None:
        while len(data) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "stalled"
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(min(65536, count - len(data)))
            except TimeoutError:
                return "stalled"
            except OSError as exc:
                return f"connection lost ({exc})"
            if not chunk:
                return "closed"
            data.extend(chunk)
        return None

    def ended(why: str) -> FirstPdu:
        if why == "stalled":
            return FirstPdu(bytes(data), False, f"no complete A-ASSOCIATE-RQ within {timeout_s:g} s", stalled=True)
        return FirstPdu(bytes(data), False, "the peer closed the connection" if why == "closed" else why)

    why = fill(PDU_HEADER_LENGTH)
    if why:
        return ended(why)
    pdu_type, length = struct.unpack_from(">BxI", data)
    if pdu_type != A_ASSOCIATE_RQ or length > MAX_ASSOCIATION_PDU_LENGTH:
        return FirstPdu(bytes(data), False)
    why = fill(PDU_HEADER_LENGTH + length)
    if why:
        return ended(why)
    return FirstPdu(bytes(data), True)


@dataclass(frozen=True)
class LeanStorePath:
    """What the front needs to serve storage associations itself."""

    supported: Mapping[str, frozenset[str]]  # abstract syntax -> transfer syntaxes (storage and verification)
    store: StoreInstance
    spool: Spool
    max_in_memory_dataset: Callable[[], int]
    elsewhere: frozenset[str] = frozenset()  # abstract syntaxes the front serves through pynetdicom (C-FIND...)
    echo_refusal: Callable[[str], str | None] | None = None  # called AE -> why an echo to it is refused

    def takes(self, request: AssociateRequest) -> bool:
        """Nothing proposed is served elsewhere; classes nobody supports are refused here as there."""
        return not any(context.abstract_syntax in self.elsewhere for context in request.contexts)
