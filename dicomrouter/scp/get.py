"""C-GET SCP: the router C-GETs from the holding PACS and returns the instances on the caller's
own association (workstations behind NAT, no fixed port).

The instances are held on disk beside the spool while they are collected, then sent to the
caller as C-STORE sub-operations on the contexts where it took the SCP role, each in the
transfer syntax it arrived in (never transcoded: an instance the caller cannot take in its own
syntax is a failed sub-operation, with the reason logged).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from threading import Event
from typing import Any

from pydicom import Dataset
from pydicom.uid import UID

from dicomrouter.audit import AssociationAudit
from dicomrouter.catalog.queries import Catalog
from dicomrouter.dicom_file import dataset_offset
from dicomrouter.dul.association import Association, Request
from dicomrouter.dul.dimse import (
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    C_GET_RQ,
    C_STORE_RQ,
    COMMAND_FIELD,
    PRIORITY,
    STATUS,
    text_value,
    us,
)
from dicomrouter.dul.pdata import FileSlice
from dicomrouter.logging import get_logger
from dicomrouter.net.encoding import decode_identifier
from dicomrouter.net.get_client import PATIENT_ROOT_GET, STUDY_ROOT_GET, ReceivedInstance
from dicomrouter.reload import ConfigHolder
from dicomrouter.retrieve.collect import collect_instances
from dicomrouter.retrieve.mover import UNABLE_TO_PERFORM, MoveTotals
from dicomrouter.routing.access import Caller
from dicomrouter.scp.identifier_service import IdentifierService
from dicomrouter.scp.move import failed_uids_dataset, sub_operation_counts
from dicomrouter.scp.retrieve_request import (
    IDENTIFIER_MISMATCH,
    PENDING,
    MoveRefused,
    check_retrieve_identifier,
    retrieve_sources,
)
from dicomrouter.scp.status import status_dataset
from dicomrouter.store.scratch import scratch_folder

log = get_logger(__name__)

GET_MODELS = (PATIENT_ROOT_GET, STUDY_ROOT_GET)
CANCELLED = 0xFE00
WARNING = 0xB000
SUB_OPERATIONS_FAILED = 0xA702  # Refused: out of resources, unable to perform sub-operations
PENDING_INTERVAL_S = 0.2

# The sub-operation count, then (PENDING, held file path) per instance, then an optional final status.
GetResponse = int | tuple[int | Dataset, Path | Dataset | None]


@dataclass
class GetEvent:
    """What `handle_get` reads of one C-GET request."""

    caller: Caller
    query_model: str
    encoded_identifier: bytes
    transfer_syntax: str
    storage: list[tuple[str, list[str]]]  # (SOP class, [syntax]) the caller takes as SCP
    audit: AssociationAudit
    cancelled: Event

    def identifier(self) -> Dataset:
        return decode_identifier(self.encoded_identifier, self.transfer_syntax)


def caller_storage(association: Association) -> list[tuple[str, list[str]]]:
    """What the caller accepted to receive (it took the SCP role): one (SOP class, [syntax]) per
    accepted context. Proposed to the source as they are, one syntax per context, so it sends each
    instance in a syntax the caller takes (its own where the caller takes that)."""
    storage: dict[tuple[str, str], None] = {}
    for context in association.contexts.values():
        if context.scp_role and context.abstract_syntax not in GET_MODELS:
            storage[(context.abstract_syntax, context.transfer_syntax)] = None
    return [(sop_class, [syntax]) for sop_class, syntax in storage]


def hold_instance(folder: Path, instance: ReceivedInstance, index: int) -> Path:
    """Write the received bytes as a DICOM file (file meta + data set as received) under `folder`;
    a large instance is copied from its spill file, never read into memory whole."""
    from dicomrouter.scp.store import file_meta

    meta = file_meta(instance.sop_class_uid, instance.sop_instance_uid, instance.transfer_syntax, "", "", "")
    path = folder / f"{index:06d}.dcm"
    try:
        with open(path, "wb") as handle:
            handle.write(meta)
            instance.write_to(handle)
    finally:
        instance.discard()
    return path


def handle_get(
    event: GetEvent, holder: ConfigHolder, catalog: Catalog | None
) -> Iterator[GetResponse]:
    """Obtain the instances from every holding server, then send them as C-STORE sub-operations."""
    audit_row: dict[str, Any] = {"outcome": "cancelled", "detail": "the caller went away"}
    started = time.monotonic()
    try:
        yield from _answer_get(event, holder, catalog, audit_row)
    finally:
        event.audit.record("get", duration_s=time.monotonic() - started, **audit_row)


def _answer_get(
    event: Event, holder: ConfigHolder, catalog: Catalog | None, audit_row: dict[str, Any]
) -> Iterator[GetResponse]:
    config = holder.current
    caller = event.caller
    query_model = event.query_model
    try:
        identifier = event.identifier()
        level, study_uid = check_retrieve_identifier(identifier, query_model == STUDY_ROOT_GET)
    except MoveRefused as exc:
        log.warning("get_refused", calling_ae=caller.ae_title, reason=exc.comment)
        audit_row.update(outcome="refused", detail=exc.comment)
        yield 1
        yield status_dataset(exc.status, exc.comment), None
        return
    except Exception as exc:
        log.warning(
            "get_refused", calling_ae=caller.ae_title, reason=f"undecodable identifier: {exc}"
        )
        audit_row.update(outcome="refused", detail="cannot decode the identifier")
        yield 1
        yield status_dataset(IDENTIFIER_MISMATCH, "cannot decode the identifier"), None
        return
    sources, unreachable = retrieve_sources(config, catalog, caller, identifier, query_model)
    audit_row.update(study_uid=study_uid, servers=[s.name for s in sources] or list(unreachable), detail=level)
    # The PACS is asked for what the caller accepted, one (class, syntax) per context: it sends each
    # instance in a syntax the caller takes (converting it itself where the caller takes no other). An
    # instance that still comes in a syntax the caller has no context for fails at the sub-operation,
    # with the reason; the router never converts one.
    storage = event.storage
    # Held on disk beside the spool, not in memory: a study can be larger than the router's RAM.
    with scratch_folder(config.router.spool) as folder:
        yield from _collect_and_send(event, config, caller, query_model, identifier, level, study_uid,
                                     sources, unreachable, storage, folder, audit_row)


def _collect_and_send(event, config, caller, query_model, identifier, level, study_uid,
                      sources, unreachable, storage, folder: Path, audit_row: dict[str, Any]) -> Iterator[GetResponse]:
    instances: list[Path] = []

    def hold(instance: ReceivedInstance) -> int:
        """The C-STORE status the source gets for this sub-operation."""
        try:
            instances.append(hold_instance(folder, instance, len(instances)))
        except OSError as exc:
            log.error("get_hold_failed", sop_instance_uid=instance.sop_instance_uid, reason=str(exc))
            return 0xA700  # out of resources: the source counts it as failed
        return 0x0000

    errors = (
        [f"{name} unreachable: {reason}" for name, reason in unreachable.items()]
        if not sources
        else []
    )
    missed: list[int] = []  # sub-operations a source counted failed or left undone
    more_errors, cancelled = collect_instances(
        config, sources, storage, hold, event.cancelled.is_set, spill_folder=folder, on_missed=missed.append
    )
    errors += more_errors
    if cancelled:
        audit_row.update(outcome="cancelled", detail=f"{level}: cancelled while collecting")
        yield 0
        return
    log.info(
        "get_collected",
        calling_ae=caller.ae_title,
        query_level=level,
        study_uid=study_uid,
        sources=[s.name for s in sources],
        instances=len(instances),
        errors=errors,
    )
    # A source that failed counts as one failed sub-operation, so the final status shows it.
    detail = f"{level}: " + "; ".join(errors) if errors else level
    audit_row.update(counts={"instances": len(instances), "sent": 0}, detail=detail)
    # What a source could not send counts as failed (at least one per failed source), so the
    # caller's counts are those of what it received.
    yield len(instances) + (max(sum(missed), 1) if errors else 0)
    for sent, held in enumerate(instances):
        if event.cancelled.is_set():
            audit_row["outcome"] = "cancelled"
            yield CANCELLED, None
            return
        audit_row["counts"]["sent"] = sent
        yield PENDING, held
    audit_row["counts"]["sent"] = len(instances)
    audit_row["outcome"] = ("partial" if instances else "failed") if errors else "success"
    if errors:
        status = WARNING if instances else UNABLE_TO_PERFORM
        yield status_dataset(status, "; ".join(errors)), None


class GetService(IdentifierService):
    operation = "get"
    commands = frozenset({C_GET_RQ})
    sop_classes = GET_MODELS

    def __init__(self, holder: ConfigHolder, catalog: Catalog | None):
        self.holder = holder
        self.catalog = catalog

    def answer(self, request: Request, association: Association) -> None:
        event = GetEvent(
            association.caller, request.context.abstract_syntax, request.held(), request.context.transfer_syntax,
            caller_storage(association), association.audit, request.cancelled,
        )
        totals = MoveTotals()
        refused_syntaxes: dict[str, None] = {}  # syntaxes the caller took no context for, in order
        last_pending = float("-inf")
        responses = handle_get(event, self.holder, self.catalog)
        try:
            for item in responses:
                if not association.open:
                    return
                if isinstance(item, int):
                    totals.remaining = item
                    continue
                status, value = item
                if isinstance(status, Dataset):  # a final status from the collection
                    final = int(status.Status)
                    comment = str(status.get("ErrorComment", "") or "")
                    self._finish(association, request, totals, final, comment)
                    return
                if status == CANCELLED:
                    self._finish(association, request, totals, CANCELLED, "")
                    return
                assert isinstance(value, Path)
                refused = self._send_sub_operation(association, request, value, totals)
                if refused:
                    refused_syntaxes.setdefault(refused, None)
                if time.monotonic() - last_pending >= PENDING_INTERVAL_S and totals.remaining:
                    association.respond(request, PENDING, elements=sub_operation_counts(PENDING, totals))
                    last_pending = time.monotonic()
        finally:
            responses.close()
        if association.open:
            if totals.failed or totals.warning:
                status = WARNING if totals.completed or totals.warning else SUB_OPERATIONS_FAILED
            else:
                status = 0x0000
            self._finish(association, request, totals, status, refused_comment(refused_syntaxes))

    def _finish(self, association: Association, request: Request, totals: MoveTotals, status: int, comment: str) -> None:
        if status in (WARNING, UNABLE_TO_PERFORM, 0xC000):
            # A source that failed counts as one failed sub-operation, so the final status shows it.
            totals.failed += totals.remaining
        if status != CANCELLED:
            totals.remaining = 0
        dataset = None
        if status not in (PENDING, 0x0000) and totals.failed_sop_uids:
            dataset = failed_uids_dataset(totals, request.context.transfer_syntax)
        association.respond(request, status, comment, dataset, sub_operation_counts(status, totals))

    def _send_sub_operation(
        self, association: Association, request: Request, path: Path, totals: MoveTotals
    ) -> str | None:
        """One C-STORE to the caller in the instance's own transfer syntax; counts its outcome. Returns the
        syntax when the caller took no context for it (the router does not transcode)."""
        totals.remaining = max(totals.remaining - 1, 0)
        with open(path, "rb") as handle:
            head = handle.read(8192)
        size = path.stat().st_size
        offset = dataset_offset(head)
        meta = _meta_values(head[:offset])
        sop_class, sop_instance, syntax = meta.get(2, ""), meta.get(3, ""), meta.get(0x10, "")
        context_id = next(
            (c.context_id for c in association.contexts.values()
             if c.scp_role and c.abstract_syntax == sop_class and c.transfer_syntax == syntax),
            None,
        )
        if context_id is None:
            association.log.warning(
                "get_sub_operation_failed", sop_instance_uid=sop_instance, sop_class_uid=sop_class,
                reason=f"the caller took no presentation context for this SOP class in {syntax}; the router does not transcode",
            )
            totals.failed += 1
            totals.failed_sop_uids.append(sop_instance)
            return syntax
        elements = [
            (AFFECTED_SOP_CLASS, text_value(sop_class, b"\0")),
            (COMMAND_FIELD, us(C_STORE_RQ)),
            (PRIORITY, us(0)),
            (AFFECTED_SOP_INSTANCE, text_value(sop_instance, b"\0")),
        ]
        message_id, waiter = association.send_request(context_id, elements, FileSlice(path, offset, size - offset))
        try:
            response = waiter.get(timeout=association.limits.dimse_timeout_s)
        except Exception:
            response = None
        finally:
            association.forget_request(message_id)
        status = response.number(STATUS) if response is not None else None
        if status == 0x0000:
            totals.completed += 1
        elif status is not None and (status >> 12 == 0xB):
            totals.warning += 1
        else:
            totals.failed += 1
            totals.failed_sop_uids.append(sop_instance)
            association.log.warning(
                "get_sub_operation_failed", sop_instance_uid=sop_instance,
                reason="no response" if status is None else f"status 0x{status:04X}",
            )
        return None


def refused_comment(syntaxes: dict[str, None]) -> str:
    """The final response's comment when some instances were in syntaxes the caller takes no context for."""
    if not syntaxes:
        return ""
    names = ", ".join(UID(syntax).name or syntax for syntax in syntaxes)
    return f"not transcoded; no context for {names}"


def _meta_values(meta: bytes) -> Mapping[int, str]:
    """The UI elements of a file meta group written by `file_meta` (explicit VR little endian)."""
    values: dict[int, str] = {}
    offset = 132
    while offset + 8 <= len(meta):
        element = int.from_bytes(meta[offset + 2 : offset + 4], "little")
        vr = meta[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            length = int.from_bytes(meta[offset + 8 : offset + 12], "little")
            start = offset + 12
        else:
            length = int.from_bytes(meta[offset + 6 : offset + 8], "little")
            start = offset + 8
        if vr == b"UI":
            values[element] = meta[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        offset = start + length
    return values
