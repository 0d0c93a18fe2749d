"""A lean DICOM upper layer for one requestor association on a blocking socket (PS3.8).

pynetdicom runs two threads per association and decodes every command set through pydicom:
about a millisecond of CPU per C-FIND answer, and the threads fight over the GIL when several
PACS answer at once. A federated query reads thousands of small answers, so the find client
speaks the protocol itself: one thread, struct-packed PDUs, identifiers decoded lazily.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from dicomrouter.dul.connection import PduRefused, PduStream, PduTimeout, PeerClosed
from dicomrouter.dul.dimse import (
    MAX_COMMAND_SET,
    encode_command,
    us,  # noqa: F401  (re-exported: the requestor's modules use it from here)
)
from dicomrouter.dul.pdata import FileSlice, send_message
from dicomrouter.dul.pdu import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    APPLICATION_CONTEXT,
    MAX_ASSOCIATION_PDU_LENGTH,
    P_DATA_TF,
)
from dicomrouter.logging import get_logger
from dicomrouter.net.sockets import set_nodelay
from dicomrouter.net.tls import describe_peer_tls_error, pending_alert

log = get_logger(__name__)

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.9.7433.1.1"  # dicomrouter's, fixed
IMPLEMENTATION_VERSION = "DICOMROUTER"


# What a peer may send us, checked as soon as the lengths arrive (a PACS is a peer like any other).
# A-ASSOCIATE-AC/RJ, release, abort: a few hundred bytes in practice
ASSOCIATION_PDU_LIMIT = MAX_ASSOCIATION_PDU_LENGTH
# Over the maximum length we announce: tolerated, a peer miscounting its headers is harmless
PDATA_SLACK = 4096
COMMAND_LIMIT = MAX_COMMAND_SET  # a command set is a few hundred bytes
IDENTIFIER_LIMIT = 1024 * 1024  # a C-FIND answer or a C-MOVE/C-GET response identifier
MIN_PEER_PDU = 1024  # a peer taking less per P-DATA-TF is refused (real ones take 4 KiB and more)
# Received at a time: a PACS answering a C-FIND sends many small PDUs back to back.
READ_AHEAD = 64 * 1024
# A-ABORT source 2 (service provider), reason 6: "invalid PDU parameter value"
PEER_ABORT_REASON_INVALID_VALUE = 6

# A-ASSOCIATE-RJ (source, reason) in words (PS3.8 9.3.4)
REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


class UpperLayerError(Exception):
    """The peer refused, aborted or broke the protocol; `kind` as in PeerFindError."""

    def __init__(self, kind: str, reason: str):
        self.kind = kind
        self.reason = reason
        super().__init__(f"{kind}: {reason}")


class ProtocolViolation(UpperLayerError):
    """The peer sent what PS3.8 or our limits forbid (a length over its cap, a malformed PDV):
    the association is aborted at once, nothing more is read from it."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__("aborted", f"protocol violation: {detail}")


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(payload)) + payload


def _uid_item(item_type: int, uid: str) -> bytes:
    return _item(item_type, uid.encode("ascii"))


def _ae(title: str) -> bytes:
    return title.encode("ascii")[:16].ljust(16, b" ")


def associate_request(
    calling_ae: str,
    called_ae: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    max_pdu: int,
    scp_roles: Sequence[str] = (),
) -> bytes:
    """A-ASSOCIATE-RQ proposing `contexts` (abstract syntax, transfer syntaxes) as IDs 1, 3, 5...

    `scp_roles`: SOP classes for which we offer the SCP role (C-GET's sub-operations).
    """
    items = b""
    for index, (abstract_syntax, transfer_syntaxes) in enumerate(contexts):
        context = struct.pack(">BBBB", 2 * index + 1, 0, 0, 0) + _uid_item(0x30, abstract_syntax)
        context += b"".join(_uid_item(0x40, syntax) for syntax in transfer_syntaxes)
        items += _item(0x20, context)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _uid_item(0x52, IMPLEMENTATION_CLASS_UID)
    user += _item(0x55, IMPLEMENTATION_VERSION.encode("ascii"))
    for sop_class in scp_roles:
        uid = sop_class.encode("ascii")
        user += _item(0x54, struct.pack(">H", len(uid)) + uid + bytes([0, 1]))  # SCU no, SCP yes
    body = struct.pack(">HH", 1, 0) + _ae(called_ae) + _ae(calling_ae) + bytes(32)
    body += _uid_item(0x10, APPLICATION_CONTEXT) + items + _item(0x50, user)
    return struct.pack(">BxI", A_ASSOCIATE_RQ, len(body)) + body


def parse_accepted(body: bytes) -> tuple[dict[int, str], int]:
    """(accepted context ID -> transfer syntax, the peer's maximum PDU length, 0: unlimited)."""
    offset = 68  # version, reserved, AE titles, reserved
    accepted: dict[int, str] = {}
    max_pdu = 0
    while offset + 4 <= len(body):
        item_type, length = struct.unpack_from(">BxH", body, offset)
        value = body[offset + 4 : offset + 4 + length]
        offset += 4 + length
        if item_type == 0x21 and len(value) >= 4 and value[2] == 0:  # context, acceptance
            syntax = b""
            if len(value) >= 8 and value[4] == 0x40:
                (sub_length,) = struct.unpack_from(">H", value, 6)
                syntax = value[8 : 8 + sub_length]
            # A syntax that is not ASCII matches none we proposed: the context counts as refused
            accepted[value[0]] = syntax.rstrip(b"\0 ").decode("ascii", "replace")
        elif item_type == 0x50:
            sub = 0
            while sub + 4 <= len(value):
                sub_type, sub_length = struct.unpack_from(">BxH", value, sub)
                if sub_type == 0x51 and sub_length == 4:
                    (max_pdu,) = struct.unpack_from(">I", value, sub + 4)
                sub += 4 + sub_length
    return accepted, max_pdu


# --------------------------------------------------------------------------- command sets


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """An implicit VR little endian command set, group length first (PS3.7 E.1)."""
    return encode_command(elements)


def parse_command(data: bytes) -> dict[int, bytes]:
    """Element number -> raw value for a command set (group 0000, implicit VR LE)."""
    elements = {}
    offset = 0
    while offset + 8 <= len(data):
        _group, element, length = struct.unpack_from("<HHI", data, offset)
        elements[element] = data[offset + 8 : offset + 8 + length]
        offset += 8 + length
    return elements


# --------------------------------------------------------------------------- the connection


class UpperLayer:
    """One association's socket: send PDUs from any thread, receive them in one.

    Every PDU is read whole under one deadline, its length checked against its cap as soon as
    the header arrives: `pdata_limit` (the maximum length we announced, plus slack) for P-DATA-TF,
    ASSOCIATION_PDU_LIMIT for the others. A peer over a cap is aborted before its body is read.
    """

    def __init__(
        self,
        host: str,
        port: int,
        connect_timeout_s: float,
        tls_context: ssl.SSLContext | None = None,
        send_timeout_s: float = 60.0,
    ):
        self.address = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=connect_timeout_s)
        except OSError as exc:
            raise UpperLayerError(
                "unreachable", f"cannot connect to {host}:{port} ({exc.strerror or exc})"
            ) from None
        set_nodelay(self.sock)
        if tls_context is not None:
            try:  # the handshake runs within the connect timeout
                self.sock = tls_context.wrap_socket(self.sock, server_hostname=host)
            except OSError as exc:
                self.sock.close()
                raise UpperLayerError("unreachable", self.tls_failure(exc)) from None
        # Sends are bounded by this; receives by their own deadlines (poll), so a thread sending a
        # C-CANCEL never changes how long the reading thread waits.
        self.sock.settimeout(send_timeout_s)
        # The one PDU reader (dul/connection.py), shared with the acceptor.
        self._stream = PduStream(  # P-DATA capped once we announce our maximum
            self.sock, ASSOCIATION_PDU_LIMIT, read_ahead=READ_AHEAD
        )
        self._send_lock = threading.Lock()
        self.closed = False
        # Over TLS, until the peer's first PDU: a failure is TLS refusing us (TLS 1.3 says so late)
        self.in_tls_setup = tls_context is not None

    def tls_failure(self, exc: BaseException) -> str:
        return f"TLS with {self.address} failed: {describe_peer_tls_error(exc)}"

    def send(self, pdu: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(pdu)

    def send_failure(self, exc: OSError) -> UpperLayerError:
        """Why a send failed. Over TLS the peer's alert (our certificate refused...) is still
        waiting to be read, and says more than the broken pipe."""
        if isinstance(self.sock, ssl.SSLSocket):
            return UpperLayerError("unreachable", self.tls_failure(pending_alert(self.sock, exc)))
        return UpperLayerError("aborted", f"connection lost ({exc})")

    @property
    def send_lock(self) -> threading.Lock:
        """Held across the parts of one message: another thread's PDUs (a C-CANCEL) never land inside it."""
        return self._send_lock

    @property
    def pdata_limit(self) -> int:
        return self._stream.pdata_limit

    @pdata_limit.setter
    def pdata_limit(self, value: int) -> None:
        self._stream.pdata_limit = value

    def receive(self, timeout_s: float) -> tuple[int, bytes]:
        """(PDU type, body), the whole PDU within `timeout_s`; TimeoutError when it did not come in
        time (what came is kept: the next call goes on with the same PDU); UpperLayerError when the
        connection broke, ProtocolViolation (after an A-ABORT) when the peer announced a length over
        its cap or a PDU type that does not exist."""
        deadline = time.monotonic() + max(timeout_s, 0.001)
        try:
            pdu_type, body = self._stream.read(deadline)
        except PduTimeout:
            raise TimeoutError("no complete PDU in time") from None
        except PduRefused as refused:
            if self.in_tls_setup and not self._stream.heard_from:
                raise UpperLayerError("unreachable", self.tls_failure(ConnectionError())) from None
            self.violation(refused.reason)
        except PeerClosed as closed:
            if self.in_tls_setup:  # closed before any answer: TLS said no without saying why
                raise UpperLayerError("unreachable", self.tls_failure(ConnectionError())) from None
            raise UpperLayerError("aborted", str(closed)) from None
        except ssl.SSLError as exc:  # TLS 1.3: a refused client certificate shows up here
            raise UpperLayerError("unreachable", self.tls_failure(exc)) from None
        except OSError as exc:
            if self.in_tls_setup:  # a reset before any answer: TLS said no without saying why
                raise UpperLayerError("unreachable", self.tls_failure(exc)) from None
            raise UpperLayerError("aborted", f"connection lost ({exc})") from None
        self.in_tls_setup = False
        return pdu_type, bytes(body)

    def violation(self, detail: str) -> NoReturn:
        """Abort the association for what the peer sent, log it, raise ProtocolViolation."""
        log.warning("peer_protocol_violation", peer=self.address, reason=detail)
        self.abort(source=2, reason=PEER_ABORT_REASON_INVALID_VALUE)
        raise ProtocolViolation(f"{self.address}: {detail}; association aborted")

    def abort(self, source: int = 0, reason: int = 0) -> None:
        if self.closed:
            return
        try:
            self.send(struct.pack(">BxIxxBB", A_ABORT, 4, source, reason))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def pdvs(body: bytes) -> list[tuple[int, int, memoryview]]:
    """(context ID, control header, fragment) of each PDV in a P-DATA-TF body; ProtocolViolation
    when an item's length does not fit the body (PS3.8 9.3.5.1)."""
    items = []
    view = memoryview(body)
    offset = 0
    while offset < len(body):
        if offset + 6 > len(body):
            raise ProtocolViolation(
                f"P-DATA-TF ends inside a PDV header ({len(body) - offset} bytes left)"
            )
        (length,) = struct.unpack_from(">I", body, offset)
        if length < 2 or offset + 4 + length > len(body):
            raise ProtocolViolation(
                f"PDV item length {length} does not fit its P-DATA-TF ({len(body)} bytes)"
            )
        items.append((body[offset + 4], body[offset + 5], view[offset + 6 : offset + 4 + length]))
        offset += 4 + length
    return items


def describe_reject(result: int, source: int, reason: int) -> str:
    """An A-ASSOCIATE-RJ's result, source and reason/diagnostic in words an admin understands."""
    permanence = "permanent" if result == 1 else "transient"
    return f"{REJECT_REASONS.get((source, reason), f'source {source}, reason {reason}')} ({permanence})"


def reject_text(body: bytes) -> str:
    if len(body) < 4:
        return "association rejected (malformed A-ASSOCIATE-RJ)"
    return describe_reject(body[1], body[2], body[3])


# --------------------------------------------------------------------------- DIMSE messages

NO_DATASET = 0x0101


@dataclass
class Message:
    """One DIMSE message: its command elements (element number -> raw value) and data set, in
    memory or (a large one, see MessageLimits) in a file the receiver now owns."""

    context_id: int
    command: dict[int, bytes]
    dataset: bytes | FileSlice | None = None

    def us(self, element: int, default: int = 0) -> int:
        value = self.command.get(element)
        return int.from_bytes(value[:2], "little") if value else default

    def text(self, element: int) -> str:
        return self.command.get(element, b"").decode("latin-1").strip(" \x00")

    @property
    def command_field(self) -> int:
        return self.us(0x0100)

    @property
    def status(self) -> int:
        return self.us(0x0900, 0xFFFF)


@dataclass(frozen=True)
class MessageLimits:
    """How much of one DIMSE message a peer may send us.

    `max_dataset`: a larger data set aborts the association while it arrives. `spill_over` and
    `spill_folder`: a data set over `spill_over` bytes goes to a file in `spill_folder` as it
    arrives (Message.dataset is then a FileSlice) instead of being held in memory.
    """

    max_dataset: int = IDENTIFIER_LIMIT
    spill_over: int | None = None
    spill_folder: Path | None = None


class _Spill:
    """A data set being written to a file as its fragments arrive."""

    def __init__(self, folder: Path, held: bytearray):
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="dataset-", suffix=".part", dir=folder)
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")
        self.size = 0
        self.write(held)

    def write(self, fragment: bytes | bytearray | memoryview) -> None:
        self.file.write(fragment)
        self.size += len(fragment)

    def finish(self) -> FileSlice:
        self.file.close()
        return FileSlice(self.path, 0, self.size)

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class MessageReader:
    """Reassembles DIMSE messages from the PDVs of P-DATA-TF PDUs, within MessageLimits.

    Raises ProtocolViolation for a command set over COMMAND_LIMIT, a data set over
    `max_dataset`, or a data set fragment that belongs to no command.
    """

    def __init__(self, limits: MessageLimits | None = None) -> None:
        self.limits = limits or MessageLimits()
        self._command = bytearray()
        self._dataset = bytearray()
        self._spill: _Spill | None = None
        self._size = 0
        self._pending: Message | None = None  # the command is complete, its data set is coming

    def feed(self, body: bytes) -> list[Message]:
        messages = []
        for context_id, header, fragment in pdvs(body):
            last = bool(header & 2)
            if header & 1:
                if self._pending is not None:
                    raise ProtocolViolation(
                        "a command began before the previous message's data set was complete"
                    )
                if len(self._command) + len(fragment) > COMMAND_LIMIT:
                    raise ProtocolViolation(f"command set over {COMMAND_LIMIT} bytes")
                self._command += fragment
                if not last:
                    continue
                message = Message(context_id, parse_command(bytes(self._command)))
                self._command = bytearray()
                if message.us(0x0800, NO_DATASET) == NO_DATASET:
                    messages.append(message)
                else:
                    self._pending = message
            else:
                if self._pending is None or context_id != self._pending.context_id:
                    raise ProtocolViolation("a data set fragment without its command")
                self._add_dataset_fragment(fragment)
                if last:
                    self._pending.dataset = (
                        self._spill.finish() if self._spill else bytes(self._dataset)
                    )
                    messages.append(self._pending)
                    self._pending, self._dataset, self._spill, self._size = (
                        None,
                        bytearray(),
                        None,
                        0,
                    )
        return messages

    def _add_dataset_fragment(self, fragment: memoryview) -> None:
        limits = self.limits
        self._size += len(fragment)
        if self._size > limits.max_dataset:
            raise ProtocolViolation(f"data set over {limits.max_dataset} bytes")
        if self._spill is not None:
            self._spill.write(fragment)
            return
        self._dataset += fragment
        if (
            limits.spill_over is not None
            and limits.spill_folder is not None
            and self._size > limits.spill_over
        ):
            self._spill = _Spill(limits.spill_folder, self._dataset)
            self._dataset = bytearray()

    def discard(self) -> None:
        """Drop a message still arriving (its spill file included): the association ended."""
        if self._spill is not None:
            self._spill.discard()
        self._pending, self._dataset, self._spill, self._command = (
            None,
            bytearray(),
            None,
            bytearray(),
        )


@dataclass
class Link:
    """An established association on a lean upper layer: send and receive whole DIMSE messages."""

    layer: UpperLayer
    contexts: dict[
        int, tuple[str, str]
    ]  # accepted context ID -> (abstract syntax, transfer syntax)
    peer_max_pdu: int
    limits: MessageLimits = field(default_factory=MessageLimits)
    # (abstract syntax, transfer syntax) pairs proposed and not accepted, as far as the answer says
    refused: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reader = MessageReader(self.limits)

    def context_for(self, abstract_syntax: str, transfer_syntax: str | None = None) -> int | None:
        for context_id, (abstract, syntax) in self.contexts.items():
            if abstract == abstract_syntax and transfer_syntax in (None, syntax):
                return context_id
        return None

    def send_message(
        self, context_id: int, command: bytes, dataset: bytes | memoryview | FileSlice | None = None
    ) -> None:
        with self.layer.send_lock:
            send_message(self.layer.sock, context_id, command, dataset, self.peer_max_pdu)

    def receive_messages(self, timeout_s: float) -> list[Message]:
        """The messages completed by the next PDU (often none); TimeoutError, UpperLayerError."""
        try:
            pdu_type, body = self.layer.receive(timeout_s)
        except UpperLayerError:
            self._reader.discard()
            raise
        if pdu_type == P_DATA_TF:
            try:
                return self._reader.feed(body)
            except ProtocolViolation as exc:
                self._reader.discard()
                self.layer.violation(exc.detail)
        self._reader.discard()
        if pdu_type == A_ABORT:
            self.layer.close()
            raise UpperLayerError("aborted", "the peer aborted the association")
        if pdu_type == A_RELEASE_RQ:
            self.layer.close()
            raise UpperLayerError("aborted", "the peer released the association mid-exchange")
        self.layer.violation(f"unexpected PDU type {pdu_type} on an established association")

    def release(self, wait_s: float = 1.0) -> None:
        """A-RELEASE, waiting up to `wait_s` for the answer, then close."""
        self._reader.discard()
        if self.layer.closed:
            return
        try:
            self.layer.send(bytes([A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                pdu_type, _ = self.layer.receive(deadline - time.monotonic())
                if pdu_type in (A_RELEASE_RP, A_ABORT):
                    break
        except (OSError, UpperLayerError):
            pass
        self.layer.close()

    def abort(self) -> None:
        self._reader.discard()
        self.layer.abort()

    @property
    def closed(self) -> bool:
        return self.layer.closed


def open_link(
    host: str,
    port: int,
    calling_ae: str,
    called_ae: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    max_pdu: int,
    connect_timeout_s: float,
    acse_timeout_s: float,
    scp_roles: Sequence[str] = (),
    tls_context: ssl.SSLContext | None = None,
    limits: MessageLimits | None = None,
    send_timeout_s: float = 60.0,
) -> Link:
    """Connect (over TLS with `tls_context`) and associate; UpperLayerError (unreachable |
    rejected | aborted) says why not.

    `max_pdu` is the maximum P-DATA-TF length we announce, and what the peer's PDUs are held to.
    """
    layer = UpperLayer(host, port, connect_timeout_s, tls_context, send_timeout_s)
    layer.pdata_limit = (max_pdu or ASSOCIATION_PDU_LIMIT) + PDATA_SLACK
    try:
        try:
            layer.send(associate_request(calling_ae, called_ae, contexts, max_pdu, scp_roles))
        except OSError as exc:
            raise layer.send_failure(exc) from None
        try:
            pdu_type, body = layer.receive(acse_timeout_s)
        except TimeoutError:
            raise UpperLayerError(
                "unreachable",
                f"no answer to the association request from {host}:{port} in {acse_timeout_s:g} s",
            ) from None
        if pdu_type == A_ASSOCIATE_RJ:
            raise UpperLayerError("rejected", reject_text(body))
        if pdu_type != A_ASSOCIATE_AC:
            raise UpperLayerError("unreachable", "association aborted by the peer")
        accepted, peer_max_pdu = parse_accepted(body)
        if 0 < peer_max_pdu < MIN_PEER_PDU:  # each byte would cost a PDU of its own
            layer.violation(
                f"announces a maximum PDU length of {peer_max_pdu} bytes (under {MIN_PEER_PDU})"
            )
    except BaseException:
        layer.close()
        raise
    proposed = {
        2 * index + 1: (abstract, list(syntaxes))
        for index, (abstract, syntaxes) in enumerate(contexts)
    }
    refused = [  # every syntax of a context not accepted (one accepted syntax says nothing of the others)
        (abstract, syntax)
        for context_id, (abstract, syntaxes) in proposed.items()
        if accepted.get(context_id) not in syntaxes
        for syntax in syntaxes
    ]
    return Link(
        layer,
        {
            cid: (proposed[cid][0], syntax)
            for cid, syntax in accepted.items()
            if syntax in proposed.get(cid, ("", []))[1]
        },
        peer_max_pdu,
        limits or MessageLimits(),
        refused,
    )
