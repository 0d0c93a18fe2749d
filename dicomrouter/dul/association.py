"""One accepted association: read PDUs, assemble DIMSE messages, hand requests to services, answer.

The connection's own thread reads every PDU (PS3.8 state Sta6) for as long as the association
lives. Short requests (C-ECHO, C-STORE) are answered on that thread; long ones (C-FIND, C-MOVE,
C-GET) run on an operation thread, so the reader still sees a C-CANCEL, the C-STORE responses
to a C-GET's sub-operations, or the peer going away. Services raise `DimseRefusal` to refuse;
this module turns it into the response, the log line and the audit row.

Every length from the peer is capped before it is trusted: PDUs on their header (reader),
command sets at 64 KiB, data sets by the sink the service chose for them.
"""

from __future__ import annotations

import queue
import struct
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dicomrouter.audit import AssociationAudit
from dicomrouter.dul.connection import (
    Connection,
    PduReader,
    ProtocolViolation,
    SessionEnded,
    set_timeout,
)
from dicomrouter.dul.dimse import (
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    C_CANCEL_RQ,
    COMMAND_FIELD,
    DATASET_TYPE,
    ERROR_COMMENT,
    MAX_COMMAND_SET,
    MESSAGE_ID,
    MESSAGE_ID_RESPONDED,
    NO_DATASET,
    REQUESTED_SOP_CLASS,
    REQUESTED_SOP_INSTANCE,
    RESPONSE_BIT,
    STATUS,
    Command,
    comment_value,
    encode_command,
    parse_command,
    us,
)
from dicomrouter.dul.pdata import FileSlice, iter_pdata_pdus, send_message
from dicomrouter.dul.pdu import (
    A_ABORT,
    A_RELEASE_RQ,
    ABORT_INVALID_PARAMETER,
    ABORT_NOT_SPECIFIED,
    P_DATA_TF,
    RELEASE_RP,
    AssociateRequest,
    ContextResult,
)
from dicomrouter.logging import get_logger

log = get_logger(__name__)

PDV_HEADER_LENGTH = 6  # item length (4), presentation context ID, message control header
RELEASE_WAIT_S = 2.0  # after A-RELEASE-RP the requestor closes the connection (Sta13)
OPERATION_JOIN_S = 10.0  # at the end, how long a cancelled operation gets to finish
READ_AHEAD_BYTES = 64 * 1024  # what the reader of an established association receives at a time
UNRECOGNIZED_OPERATION = 0x0211
PROCESSING_FAILURE = 0xC000
SUCCESS, PENDING_STATUSES = 0x0000, (0xFF00, 0xFF01)


class DimseRefusal(Exception):
    """A request refused with `status` and `comment` (sent to the peer); `reason` is logged and audited."""

    def __init__(self, status: int, comment: str, reason: str | None = None, **audit: Any):
        super().__init__(reason or comment)
        self.status = status
        self.comment = comment
        self.reason = reason or comment
        self.audit = audit


class DataSink(Protocol):
    """Where a request's data set goes while it arrives."""

    max_size: int  # more than this (fragments plus PDV headers) aborts the association

    def write(self, fragment: memoryview, pdu_length: int) -> None: ...

    def discard(self) -> None: ...


class HeldDataset:
    """A small data set (an identifier) kept in memory, up to `max_size` bytes."""

    limit_name = "the identifier limit"

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.data = bytearray()

    def write(self, fragment: memoryview, pdu_length: int) -> None:
        self.data += fragment

    def discard(self) -> None:
        self.data = bytearray()


class DroppedDataset:
    """A data set read and thrown away: its request was refused at the command (`refusal`). Only its
    first bytes are kept, for the audit trail (the study it belonged to)."""

    limit_name = "router.max_dataset_size"
    KEEP_BYTES = 64 * 1024

    def __init__(self, max_size: int, refusal: DimseRefusal):
        self.max_size = max_size
        self.refusal = refusal
        self.prefix = bytearray()

    def write(self, fragment: memoryview, pdu_length: int) -> None:
        room = self.KEEP_BYTES - len(self.prefix)
        if room > 0:
            self.prefix += fragment[:room]

    def discard(self) -> None:
        pass


class Service(Protocol):
    operation: str  # the audit trail's and log's name for it: echo, store, find, move, get
    commands: frozenset[int]  # command fields it answers
    long_running: bool  # runs on an operation thread (the reader keeps reading)

    def open_dataset(self, request: Request, association: Association) -> DataSink: ...

    def handle(self, request: Request, association: Association) -> None: ...

    def refused(self, request: Request, refusal: DimseRefusal, association: Association) -> None: ...


@dataclass(eq=False)
class Request:
    """A request message: its context, command and (once complete) its data set's sink."""

    context: ContextResult
    command: Command
    service: Service
    dataset: DataSink | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def context_id(self) -> int:
        return self.context.context_id

    @property
    def message_id(self) -> int:
        return self.command.number(MESSAGE_ID) or 0

    @property
    def command_field(self) -> int:
        return self.command.command_field or 0

    @property
    def sop_class(self) -> str:
        return self.command.uid(AFFECTED_SOP_CLASS)

    def held(self) -> bytes:
        """The data set of a request whose service held it in memory."""
        assert isinstance(self.dataset, HeldDataset)
        return bytes(self.dataset.data)


@dataclass(frozen=True)
class AssociationLimits:
    max_pdu_size: int  # what we announced
    max_dataset_size: int
    max_in_memory_dataset: int
    network_timeout_s: float
    dimse_timeout_s: float
    implementation_class_uid: str
    implementation_version: str


class Association:
    """An accepted association, served on the calling thread until it ends."""

    def __init__(
        self,
        connection: Connection,
        request: AssociateRequest,
        results: Iterable[ContextResult],
        services: Mapping[int, Service],
        caller: Any,
        audit: AssociationAudit,
        limits: AssociationLimits,
        reader: PduReader | None = None,
    ):
        self.connection = connection
        self.request = request
        self.contexts: dict[int, ContextResult] = {r.context_id: r for r in results if r.accepted}
        self.services = services  # accepted context ID -> service
        self.caller = caller
        self.audit = audit
        self.limits = limits
        self.calling_ae = request.calling_ae
        self.called_ae = request.called_ae
        self.peer_max_pdu = request.max_pdu
        # The reader that read the A-ASSOCIATE-RQ reads on (one stream for the connection), from now
        # on ahead: a small C-STORE's command and data PDUs then come in one or two system calls.
        self.reader = reader or PduReader(connection, limits.max_pdu_size, limits.network_timeout_s)
        self.reader.timeout_s = limits.network_timeout_s
        self.reader.stream.enable_read_ahead(READ_AHEAD_BYTES)
        self.log = log.bind(calling_ae=request.calling_ae, called_ae=request.called_ae, address=connection.address)
        self._command = bytearray()
        self._incoming: Request | None = None
        self._incoming_size = 0
        self._lock = threading.Lock()
        self._operation: threading.Thread | None = None
        self._backlog: deque[Request] = deque()
        self._running: dict[int, Request] = {}  # message ID -> request in progress (for C-CANCEL)
        self._waiters: dict[int, queue.Queue[Command | None]] = {}  # our requests' IDs -> their responses
        self._next_message_id = 1
        self._ended = threading.Event()
        self.store_outcomes: Counter[str] = Counter()  # C-STORE outcomes, for the closing log line
        self.on_end: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ the reader

    def serve(self) -> None:
        """Read and answer until release, abort or a broken peer; never raises."""
        try:
            while True:
                pdu_type, body = self.reader.read(
                    f"idle for {self.limits.network_timeout_s:g} s (router.network_timeout)", busy=self._busy
                )
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
                self.connection.send_quietly(ABORT_NOT_SPECIFIED)
            else:
                self.log.info("association_ended", reason=ended.reason)
        except OSError as exc:  # a response could not be sent: the peer or stop() hung up
            self.log.info("association_ended", reason=f"connection lost ({exc})")
        except ProtocolViolation as violation:
            self.log.warning("association_dropped", reason=violation.reason)
            self._cancel_all()
            self.connection.abort_and_drain(violation.abort_pdu)
        except Exception:
            self.log.exception("association_failed")
            self._cancel_all()
            self.connection.abort_and_drain(ABORT_NOT_SPECIFIED)
        finally:
            self._end()

    def _busy(self) -> bool:
        """An operation is in progress: the peer may rightly say nothing for longer than the idle timeout."""
        with self._lock:
            return bool(self._running) or bool(self._waiters)

    def _end(self) -> None:
        self._cancel_all()
        self.connection.close()
        if self._incoming is not None and self._incoming.dataset is not None:
            self._incoming.dataset.discard()  # cut off mid data set: nothing of it is kept
        operation = self._operation
        if operation is not None:
            operation.join(OPERATION_JOIN_S)
        self._ended.set()
        if self.store_outcomes:
            self.log.info("stores_received", **dict(self.store_outcomes))
        for callback in self.on_end:
            try:
                callback()
            except Exception:
                self.log.exception("association_end_callback_failed")

    def _cancel_all(self) -> None:
        with self._lock:
            running = list(self._running.values()) + list(self._backlog)
            waiters = list(self._waiters.values())
        for request in running:
            request.cancelled.set()
        for waiter in waiters:
            waiter.put(None)

    @property
    def open(self) -> bool:
        return not self.connection.closed and not self._ended.is_set()

    def _release(self) -> None:
        """Let a running operation finish (it should not be running: the peer waits for its final
        response before releasing), then A-RELEASE-RP and let the requestor close first (Sta13)."""
        operation = self._operation
        if operation is not None and operation.is_alive():
            self._cancel_all()
            operation.join(self.limits.dimse_timeout_s)
        self.connection.send(RELEASE_RP)
        self.connection.read_until_closed(RELEASE_WAIT_S)
        self.log.debug("association_released")

    def _on_pdata(self, body: bytearray) -> None:
        view = memoryview(body)
        offset = 0
        while offset < len(body):
            if offset + PDV_HEADER_LENGTH > len(body):
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
        if len(self._command) > MAX_COMMAND_SET:
            raise ProtocolViolation(f"command set over {MAX_COMMAND_SET // 1024} KiB", ABORT_INVALID_PARAMETER)
        if not last:
            return
        command = parse_command(self._command)
        self._command = bytearray()
        command_field = command.command_field
        if command_field is None or command.number(DATASET_TYPE) is None:
            raise ProtocolViolation("command set without Command Field or Command Data Set Type")
        if command_field & RESPONSE_BIT:
            if command.has_dataset:
                raise ProtocolViolation("a response with a data set, which the router never asks for")
            self._deliver_response(command)
            return
        if command_field == C_CANCEL_RQ:
            self._cancel(command.number(MESSAGE_ID_RESPONDED))
            return
        if command.number(MESSAGE_ID) is None:
            raise ProtocolViolation("request without Message ID")
        request = Request(self.contexts[context_id], command, self.services[context_id])
        if not command.has_dataset:
            self._dispatch(request)
            return
        try:
            if command_field not in request.service.commands:
                raise DimseRefusal(UNRECOGNIZED_OPERATION, f"command 0x{command_field:04X} not supported here")
            request.dataset = request.service.open_dataset(request, self)
        except DimseRefusal as refusal:
            request.dataset = DroppedDataset(self.limits.max_dataset_size, refusal)
        self._incoming = request
        self._incoming_size = 0

    def _on_dataset_fragment(self, context_id: int, fragment: memoryview, last: bool, pdu_length: int) -> None:
        request = self._incoming
        if request is None or request.context_id != context_id:
            raise ProtocolViolation("a data set fragment without its command")
        sink = request.dataset
        assert sink is not None
        self._incoming_size += len(fragment) + PDV_HEADER_LENGTH  # empty fragments are not free
        if self._incoming_size > sink.max_size:
            limit = getattr(sink, "limit_name", "its limit")
            raise ProtocolViolation(f"data set over {limit} ({sink.max_size} bytes)", ABORT_INVALID_PARAMETER)
        sink.write(fragment, pdu_length)
        if last:
            self._incoming = None
            self._dispatch(request)

    def _cancel(self, message_id: int | None) -> None:
        with self._lock:
            request = self._running.get(message_id) if message_id is not None else None
            if request is None:
                request = next((r for r in self._backlog if r.message_id == message_id), None)
        if request is not None:
            self.log.info("cancel_requested", message_id=message_id, operation=request.service.operation)
            request.cancelled.set()

    def _deliver_response(self, command: Command) -> None:
        message_id = command.number(MESSAGE_ID_RESPONDED)
        with self._lock:
            waiter = self._waiters.get(message_id) if message_id is not None else None
        if waiter is None:
            self.log.warning("unexpected_response", message_id=message_id, command_field=command.command_field)
            return
        waiter.put(command)

    # ------------------------------------------------------------------ running requests

    def _dispatch(self, request: Request) -> None:
        if not request.service.long_running:
            self._run(request)
            return
        with self._lock:
            self._running[request.message_id] = request
            if self._operation is not None and self._operation.is_alive():
                del self._running[request.message_id]
                self._backlog.append(request)
                return
            self._operation = threading.Thread(
                target=self._run_operations, args=(request,), name=f"dimse-{request.service.operation}", daemon=True
            )
            self._operation.start()

    def _run_operations(self, request: Request) -> None:
        current: Request | None = request
        while current is not None:
            try:
                self._run(current)
            except OSError as exc:
                self.log.info("operation_ended", operation=current.service.operation, reason=f"connection lost ({exc})")
            finally:
                with self._lock:
                    self._running.pop(current.message_id, None)
                    current = self._backlog.popleft() if self._backlog else None
                    if current is not None:
                        self._running[current.message_id] = current
            if current is not None and not self.open:
                current = None

    def _run(self, request: Request) -> None:
        service = request.service
        try:
            if request.command_field not in service.commands:
                raise DimseRefusal(UNRECOGNIZED_OPERATION, f"command 0x{request.command_field:04X} not supported here")
            if isinstance(request.dataset, DroppedDataset):
                raise request.dataset.refusal
            service.handle(request, self)
        except DimseRefusal as refusal:
            self.log.warning(f"{service.operation}_refused", reason=refusal.reason, status=f"0x{refusal.status:04X}")
            service.refused(request, refusal, self)
            self.respond(request, refusal.status, refusal.comment)
        except OSError:
            raise
        except Exception:
            self.log.exception(f"{service.operation}_failed")
            refusal = DimseRefusal(PROCESSING_FAILURE, "internal error in the router")
            service.refused(request, refusal, self)
            if self.open:
                self.respond(request, PROCESSING_FAILURE, refusal.comment)

    # ------------------------------------------------------------------ writing

    def send_message(self, context_id: int, command: bytes, dataset: bytes | memoryview | FileSlice | None = None) -> None:
        """One message (command, then data set) in PDUs the peer accepts, under the send lock."""
        max_pdu = self.peer_max_pdu
        connection = self.connection
        with connection.send_lock:
            set_timeout(connection.sock, self.limits.network_timeout_s)
            send_message(connection.sock, context_id, command, dataset, max_pdu)

    def respond(
        self,
        request: Request,
        status: int,
        comment: str = "",
        dataset: bytes | None = None,
        elements: Iterable[tuple[int, bytes]] = (),
    ) -> None:
        """The response to `request` with `status` (an Error Comment only on a failure or warning)."""
        self.send_message(request.context_id, self.response_command(request, status, comment, dataset, elements), dataset)

    def response_pdus(self, request: Request, status: int, comment: str = "", dataset: bytes | None = None) -> bytes:
        """A response as the PDUs to send with `send_pdus`."""
        command = self.command_pdus(request, status, comment, with_dataset=dataset is not None)
        return command if dataset is None else command + self.dataset_pdus(request, dataset)

    def command_pdus(self, request: Request, status: int, comment: str = "", with_dataset: bool = False) -> bytes:
        """A response's command set as PDUs: the same for every pending answer to one C-FIND, made once."""
        command = self.response_command(request, status, comment, b"" if with_dataset else None)
        return b"".join(iter_pdata_pdus(request.context_id, command, True, self.peer_max_pdu))

    def dataset_pdus(self, request: Request, dataset: bytes) -> bytes:
        """A response's data set as PDUs (after its `command_pdus`)."""
        return b"".join(iter_pdata_pdus(request.context_id, dataset, False, self.peer_max_pdu))

    def send_pdus(self, pdus: bytes) -> None:
        """Whole messages' PDUs (from `response_pdus`) in one send: many small answers, one system call."""
        connection = self.connection
        with connection.send_lock:
            set_timeout(connection.sock, self.limits.network_timeout_s)
            connection.send_locked(pdus)

    def response_command(
        self,
        request: Request,
        status: int,
        comment: str = "",
        dataset: bytes | None = None,
        elements: Iterable[tuple[int, bytes]] = (),
    ) -> bytes:
        """The command set of the response to `request`."""
        command = request.command
        # An N-ACTION names its class and instance as Requested; the response calls them Affected.
        sop_class = command.elements.get(AFFECTED_SOP_CLASS) or command.elements.get(REQUESTED_SOP_CLASS, b"")
        sop_instance = command.elements.get(AFFECTED_SOP_INSTANCE) or command.elements.get(REQUESTED_SOP_INSTANCE)
        values = [
            (AFFECTED_SOP_CLASS, sop_class),
            (COMMAND_FIELD, us(request.command_field | RESPONSE_BIT)),
            (MESSAGE_ID_RESPONDED, us(request.message_id)),
            (DATASET_TYPE, us(0x0000 if dataset is not None else NO_DATASET)),
            (STATUS, us(status)),
            *elements,
        ]
        if comment and status != SUCCESS and status not in PENDING_STATUSES:
            values.append((ERROR_COMMENT, comment_value(comment)))
        if sop_instance is not None:
            values.append((AFFECTED_SOP_INSTANCE, sop_instance))
        return encode_command(values)

    def send_request(
        self, context_id: int, elements: list[tuple[int, bytes]], dataset: bytes | FileSlice | None = None
    ) -> tuple[int, queue.Queue[Command | None]]:
        """Send a request of ours (a C-GET's C-STORE sub-operation); returns its Message ID and where its
        response will arrive (None there: the association ended)."""
        with self._lock:
            message_id = self._next_message_id
            self._next_message_id = self._next_message_id % 0xFFFF + 1
            waiter: queue.Queue[Command | None] = queue.Queue()
            self._waiters[message_id] = waiter
        if not self.open:
            waiter.put(None)
            return message_id, waiter
        values = [*elements, (MESSAGE_ID, us(message_id)), (DATASET_TYPE, us(0x0000 if dataset is not None else NO_DATASET))]
        try:
            self.send_message(context_id, encode_command(values), dataset)
        except BaseException:
            self.forget_request(message_id)
            raise
        return message_id, waiter

    def forget_request(self, message_id: int) -> None:
        with self._lock:
            self._waiters.pop(message_id, None)
