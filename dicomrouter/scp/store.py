"""C-STORE SCP: check the command, keep the data set as it arrives, hand it to the receive service.

Everything that can be decided without the data set is decided at the command, before a byte
of it is kept: the SOP Class UID must be a valid UID and the presentation context's; the SOP
Instance UID must be valid; the caller must be able to write to a destination this store could
reach. A refused store's data set is read and dropped. An accepted one is held in memory, or
past `router.max_in_memory_dataset` written to the spool while it arrives; Success goes back
only once the receive service has it fsynced and queued.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from weakref import WeakKeyDictionary

from pydicom.filereader import read_dataset

from dicomrouter.config import Config
from dicomrouter.dul.association import Association, DimseRefusal, DroppedDataset, Request
from dicomrouter.dul.dimse import AFFECTED_SOP_INSTANCE, C_STORE_RQ
from dicomrouter.logging import get_logger
from dicomrouter.reload import ConfigHolder
from dicomrouter.routing.store_rules import StoreRefusal, store_refusal
from dicomrouter.scp.registry import valid_uid
from dicomrouter.store.receive import (
    DUPLICATE_REFUSED,
    NO_DESTINATION,
    OUT_OF_RESOURCES,
    REFUSED_NOT_AUTHORIZED,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    ReceiveResult,
    ReceiveService,
)
from dicomrouter.store.spool import PartialFile, Spool, SpoolError

log = get_logger(__name__)

DATASET_MISMATCH = 0xA900
VIEW_MIN_BYTES = 4096  # smaller data set fragments are copied, not held as views into their PDU
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
IMPLICIT_VR_LE, EXPLICIT_VR_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
STUDY_INSTANCE_UID_TAG = 0x0020000D
FILE_PREAMBLE = b"\0" * 128 + b"DICM"


def audit_outcome(status: int) -> str:
    """The audit trail's word for a C-STORE status."""
    if status == SUCCESS:
        return "success"
    if status in (REFUSED_NOT_AUTHORIZED, DUPLICATE_REFUSED, NO_DESTINATION, SOP_CLASS_NOT_SUPPORTED, DATASET_MISMATCH):
        return "refused"
    return "failed"


def store_instance(
    receive: ReceiveService, caller, called_ae: str, sop_instance_uid: str, received: bytes | PartialFile, audit
) -> ReceiveResult:
    """Hand one received instance (file meta and data set, as bytes or already in a spool file) to the
    receive service; tally it in `audit`."""
    try:
        if isinstance(received, PartialFile):
            result = receive.receive_partial(caller, called_ae, sop_instance_uid, received)
        else:
            result = receive.receive(caller, called_ae, sop_instance_uid, received)
    except MemoryError:
        result = ReceiveResult(OUT_OF_RESOURCES, "out of memory")
    except Exception:
        log.exception("store_failed", calling_ae=caller.ae_title, sop_instance_uid=sop_instance_uid[:80])
        result = ReceiveResult(OUT_OF_RESOURCES, "internal error; not stored")
    reason = result.comment if result.status != SUCCESS else None
    audit.count_store(result.study_uid, audit_outcome(result.status), result.servers, reason)
    return result


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH2sxxI", 2, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, implementation_uid: str, version: str,
              source_ae: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) for a received data set."""
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\0\1"),
            _meta_element(0x0002, b"UI", sop_class.encode("ascii")),
            _meta_element(0x0003, b"UI", sop_instance.encode("ascii")),
            _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii")),
            _meta_element(0x0012, b"UI", implementation_uid.encode("ascii")),
            _meta_element(0x0013, b"SH", version.encode("ascii")[:16]),
            _meta_element(0x0016, b"AE", source_ae.encode("ascii", "replace")[:16]),
        )
    )
    return FILE_PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<I", len(elements))) + elements


@dataclass
class IncomingInstance:
    """A C-STORE's data set while it arrives: in memory, or in a spool file once it grew large."""

    max_size: int
    max_in_memory: int
    limit_name = "router.max_dataset_size"
    spool: Spool
    may_stream: bool  # a deflated data set must be inflated to be checked: it stays in memory
    # File meta, then the data set so far: large fragments as views into their PDU (no copy), small ones
    # copied together, so a peer sending tiny fragments cannot keep one PDU alive per byte.
    chunks: list[memoryview | bytearray] = field(default_factory=list)
    size: int = 0
    partial: PartialFile | None = None
    failure: ReceiveResult | None = None  # it could not be kept: the rest is read and dropped
    on_stream: Callable[[int], None] | None = None
    hashed: bool = True  # False: passed on, never spooled (no sha256 on the way)

    def write(self, fragment: memoryview, pdu_length: int) -> None:
        self.size += len(fragment)
        if self.failure is not None:
            return
        try:
            if self.partial is not None:
                self.partial.write(fragment)
                return
            self._keep(fragment, pdu_length)
            if self.size > self.max_in_memory and self.may_stream:
                self._start_streaming()
        except SpoolError as exc:
            self.discard()
            self.failure = ReceiveResult(OUT_OF_RESOURCES, str(exc))

    def _keep(self, fragment: memoryview, pdu_length: int) -> None:
        if len(fragment) >= VIEW_MIN_BYTES and 2 * len(fragment) >= pdu_length:
            self.chunks.append(fragment)  # most of its PDU: holding the PDU costs at most as much again
        elif self.chunks and isinstance(self.chunks[-1], bytearray):
            self.chunks[-1] += fragment
        else:
            self.chunks.append(bytearray(fragment))

    def _start_streaming(self) -> None:
        """Move what arrived so far into a spool file; the rest is written there as it comes."""
        partial = self.spool.open_partial(self.hashed)
        self.partial = partial
        if self.on_stream is not None:
            self.on_stream(self.size)
        for chunk in self.chunks:
            partial.write(chunk)
        self.chunks.clear()

    def discard(self) -> None:
        self.chunks.clear()
        if self.partial is not None:
            self.partial.discard()

    def received(self) -> bytes | PartialFile:
        if self.partial is not None:
            return self.partial
        encoded = b"".join(self.chunks)
        self.chunks.clear()
        return encoded


def checked_store_command(request: Request) -> tuple[str, str]:
    """(SOP class, SOP instance UID) of a C-STORE request; DimseRefusal when they are not valid."""
    sop_class = request.sop_class
    sop_instance = request.command.uid(AFFECTED_SOP_INSTANCE)
    if not valid_uid(sop_class):
        raise DimseRefusal(DATASET_MISMATCH, "Affected SOP Class UID is not a valid UID")
    if sop_class != request.context.abstract_syntax:
        raise DimseRefusal(
            SOP_CLASS_NOT_SUPPORTED, "SOP class differs from the presentation context's",
            reason=f"Affected SOP Class UID {sop_class} on a context for {request.context.abstract_syntax}",
        )
    if not valid_uid(sop_instance):
        raise DimseRefusal(DATASET_MISMATCH, "Affected SOP Instance UID is not a valid UID")
    return sop_class, sop_instance


class StoreService:
    operation = "store"
    commands = frozenset({C_STORE_RQ})
    long_running = False

    def __init__(self, holder: ConfigHolder, receive: ReceiveService):
        self.holder = holder
        self.receive = receive
        # The refusal at the command depends on the config, the caller and the called AE only: worked out
        # once per association and config, not for each of its thousand C-STOREs.
        self._refusals: WeakKeyDictionary[Association, tuple[Config, StoreRefusal | None]] = WeakKeyDictionary()

    def _refusal(self, config: Config, association: Association) -> StoreRefusal | None:
        cached = self._refusals.get(association)
        if cached is None or cached[0] is not config:
            cached = (config, store_refusal(config, association.caller, association.called_ae))
            self._refusals[association] = cached
        return cached[1]

    def open_dataset(self, request: Request, association: Association) -> IncomingInstance:
        sop_class, sop_instance = checked_store_command(request)
        caller = association.caller
        config = self.holder.current
        if caller.kind == "server":
            raise DimseRefusal(REFUSED_NOT_AUTHORIZED, "server AE may only deliver relayed moves")
        refusal = self._refusal(config, association)
        if refusal is not None:
            raise DimseRefusal(REFUSED_NOT_AUTHORIZED, refusal.reason, servers=refusal.servers)
        router = config.router
        transfer_syntax = request.context.transfer_syntax
        incoming = IncomingInstance(
            max_size=association.limits.max_dataset_size,
            max_in_memory=association.limits.max_in_memory_dataset,
            spool=self.receive.spool,
            may_stream=transfer_syntax != DEFLATED_EXPLICIT_VR_LE,
        )
        incoming.on_stream = lambda size: association.log.info(
            "store_streaming_to_spool", sop_instance_uid=sop_instance, received_bytes=size,
            max_in_memory_dataset=router.max_in_memory_dataset,
        )
        meta = file_meta(
            sop_class, sop_instance, transfer_syntax, association.limits.implementation_class_uid,
            association.limits.implementation_version, association.calling_ae,
        )
        incoming.chunks.append(bytearray(meta))
        return incoming

    def handle(self, request: Request, association: Association) -> None:
        incoming = request.dataset
        assert isinstance(incoming, IncomingInstance)
        sop_instance_uid = request.command.uid(AFFECTED_SOP_INSTANCE)
        if incoming.failure is not None:
            result = incoming.failure
            association.log.error("store_refused", reason=result.comment, sop_instance_uid=sop_instance_uid[:80])
            association.audit.count_store(None, audit_outcome(result.status), (), result.comment)
        else:
            result = store_instance(
                self.receive, association.caller, association.called_ae, sop_instance_uid, incoming.received(),
                association.audit,
            )
        association.store_outcomes[audit_outcome(result.status)] += 1
        association.respond(request, result.status, result.comment)

    def refused(self, request: Request, refusal: DimseRefusal, association: Association) -> None:
        study_uid = None
        if isinstance(request.dataset, DroppedDataset):
            study_uid = study_of(request.dataset.prefix, request.context.transfer_syntax)
        association.store_outcomes[audit_outcome(refusal.status)] += 1
        association.audit.count_store(
            study_uid, audit_outcome(refusal.status), refusal.audit.get("servers", ()), refusal.reason
        )


def study_of(prefix: bytes | bytearray, transfer_syntax: str) -> str | None:
    """The Study Instance UID in the first bytes of a refused data set, for the audit trail (None if not there)."""
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LE or not prefix:
        return None
    try:
        dataset = read_dataset(
            BytesIO(bytes(prefix)), transfer_syntax == IMPLICIT_VR_LE, transfer_syntax != EXPLICIT_VR_BE,
            stop_when=lambda tag, _vr, _length: tag > STUDY_INSTANCE_UID_TAG,
        )
        value = dataset.get("StudyInstanceUID")
    except Exception:  # a truncated or malformed prefix: the row goes without a study
        return None
    return str(value) if value and valid_uid(str(value)) else None
