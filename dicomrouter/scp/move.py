"""C-MOVE SCP (Patient Root, Study Root): a proxy that passes the source's answers on as they come.

On the direct route the *source* PACS stores to the destination; on the relay route the router
retrieves and stores on. Either way the caller gets the sub-operation counts as they change, and
a C-CANCEL (read by the association while the move runs) is passed on to the source.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from pydicom import Dataset

from dicomrouter.catalog.queries import Catalog
from dicomrouter.dul.association import Association, Request
from dicomrouter.dul.dimse import (
    C_MOVE_RQ,
    COMPLETED,
    FAILED,
    MOVE_DESTINATION,
    REMAINING,
    WARNING_COUNT,
    us,
)
from dicomrouter.logging import get_logger
from dicomrouter.net.encoding import decode_identifier, encode_dataset
from dicomrouter.net.move_client import CANCELLED, PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE
from dicomrouter.reload import ConfigHolder
from dicomrouter.retrieve.mover import SUCCESS, UNABLE_TO_PERFORM, MoveRun, MoveTotals, move_outcome
from dicomrouter.routing.access import Caller
from dicomrouter.routing.move_routes import (
    destination_refusal,
    move_permission,
    resolve_destination,
)
from dicomrouter.scp.identifier_service import IdentifierService
from dicomrouter.scp.retrieve_request import (
    IDENTIFIER_MISMATCH,
    PENDING,
    MoveRefused,
    check_retrieve_identifier,
    retrieve_sources,
)

log = get_logger(__name__)

MOVE_MODELS = (PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE)
DESTINATION_UNKNOWN = 0xA801
NOT_PERMITTED = 0xC001
REFUSED_NOT_AUTHORIZED = 0x0124  # the destination takes nothing now (inactive), as a C-STORE to it
UNABLE_TO_PROCESS = 0xC000
# Pending responses are optional (PS3.4 C.4.2.1.5): a few a second show progress; one per
# instance costs the router an encode and a send each and slows the move it reports on.
PENDING_INTERVAL_S = 0.2


def sub_operation_counts(status: int, totals: MoveTotals) -> list[tuple[int, bytes]]:
    """The Number of ... Sub-operations elements of a C-MOVE or C-GET response (PS3.7 9.3.4.2)."""
    elements = [(COMPLETED, us(totals.completed)), (FAILED, us(totals.failed)), (WARNING_COUNT, us(totals.warning))]
    if status in (PENDING, CANCELLED):
        elements.append((REMAINING, us(totals.remaining)))
    return elements


def failed_uids_dataset(totals: MoveTotals, transfer_syntax: str) -> bytes | None:
    """The Failed SOP Instance UID List identifier of a final response that is not Success."""
    failed = Dataset()
    failed.FailedSOPInstanceUIDList = totals.failed_sop_uids
    return encode_dataset(failed, transfer_syntax)


@dataclass
class MoveExchange:
    """One C-MOVE request on the caller's association."""

    association: Association
    request: Request

    def identifier(self) -> Dataset:
        return decode_identifier(self.request.held(), self.request.context.transfer_syntax)

    def send(self, status: int, totals: MoveTotals | None = None, comment: str = "") -> None:
        if totals is None:
            self.association.respond(self.request, status, comment)
            return
        dataset = None
        if status not in (PENDING, SUCCESS):
            dataset = failed_uids_dataset(totals, self.request.context.transfer_syntax)
        self.association.respond(self.request, status, comment, dataset, sub_operation_counts(status, totals))


def serve_move(exchange: MoveExchange, holder: ConfigHolder, catalog: Catalog | None) -> None:
    """Answer one C-MOVE request from start to final response."""
    config = holder.current
    started = time.monotonic()
    caller: Caller = exchange.association.caller
    audit = exchange.association.audit
    move_destination = exchange.request.command.text(MOVE_DESTINATION)
    query_model = exchange.request.context.abstract_syntax

    def refuse(status: int, comment: str, reason: str, study_uid: str | None = None) -> None:
        log.warning("move_refused", calling_ae=caller.ae_title, move_destination=move_destination, reason=reason)
        audit.record("move", "refused", study_uid=study_uid, detail=f"to {move_destination}: {reason}")
        exchange.send(status, comment=comment)

    destination = resolve_destination(config, move_destination)
    if destination is None:
        # No open relay: only configured servers and clients are destinations.
        reason = "unknown move destination (neither a server nor a client with host and port)"
        refuse(DESTINATION_UNKNOWN, f"unknown move destination {move_destination}", reason)
        return
    inactive = destination_refusal(destination)
    if inactive:  # refused as a store to it would be
        refuse(REFUSED_NOT_AUTHORIZED, inactive, inactive)
        return
    allowed, why = move_permission(caller, destination, config)
    if not allowed:
        refuse(NOT_PERMITTED, f"{caller.ae_title} may not send to {move_destination}", why)
        return
    try:
        identifier = exchange.identifier()
        level, study_uid = check_retrieve_identifier(identifier, query_model == STUDY_ROOT_MOVE)
    except MoveRefused as exc:
        refuse(exc.status, exc.comment, exc.comment)
        return
    except Exception as exc:
        refuse(IDENTIFIER_MISMATCH, "cannot decode the identifier", f"undecodable identifier: {exc}")
        return
    sources, unreachable = retrieve_sources(config, catalog, caller, identifier, query_model)
    if not sources:
        detail = f"{level} to {destination.name}: not found on any server {caller.ae_title} may read"
        if unreachable:
            comment = "not found; unreachable: " + ", ".join(unreachable)
            log.warning("move_study_not_found", study_uid=study_uid, unreachable=unreachable)
            audit.record("move", "failed", study_uid=study_uid, servers=list(unreachable), detail=f"{detail}; {comment}")
            exchange.send(UNABLE_TO_PERFORM, MoveTotals(), comment=comment)
        else:
            log.warning("move_study_not_found", study_uid=study_uid, calling_ae=caller.ae_title)
            audit.record("move", "success", study_uid=study_uid, detail=detail, counts={"completed": 0})
            exchange.send(SUCCESS, MoveTotals())
        return
    originator = (caller.ae_title, exchange.request.message_id)
    run = MoveRun(config, catalog, sources, destination, study_uid, originator)
    log.info(
        "move_requested",
        calling_ae=caller.ae_title,
        query_level=level,
        study_uid=study_uid,
        destination=destination.name,
        sources=[s.name for s in sources],
    )
    done = threading.Event()

    def watch_for_cancel() -> None:
        # The source may take long between answers: pass a C-CANCEL on as soon as it arrives.
        while not done.wait(0.05):
            if exchange.request.cancelled.is_set() or not exchange.association.open:
                log.info("move_cancel_requested", calling_ae=caller.ae_title, study_uid=study_uid)
                run.cancel()
                return

    watcher = threading.Thread(target=watch_for_cancel, name="move-cancel-watch", daemon=True)
    watcher.start()
    last = MoveTotals()
    last_pending = float("-inf")
    try:
        for totals in run.progress():
            last = totals
            if not exchange.association.open:
                continue
            if totals.final:
                exchange.send(totals.status, totals, comment=totals.comment)
            elif time.monotonic() - last_pending >= PENDING_INTERVAL_S:
                exchange.send(PENDING, totals)
                last_pending = time.monotonic()
    finally:
        done.set()
        counts = {"completed": last.completed, "failed": last.failed, "warning": last.warning}
        detail = f"{level} to {destination.name} ({why})" + (f": {last.comment}" if last.comment else "")
        audit.record(
            "move", move_outcome(last.status) if last.final else "cancelled", study_uid=study_uid, servers=[s.name for s in sources],
            detail=detail, counts=counts, duration_s=time.monotonic() - started,
        )


class MoveService(IdentifierService):
    operation = "move"
    commands = frozenset({C_MOVE_RQ})
    sop_classes = MOVE_MODELS

    def __init__(self, holder: ConfigHolder, catalog: Catalog | None):
        self.holder = holder
        self.catalog = catalog

    def answer(self, request: Request, association: Association) -> None:
        serve_move(MoveExchange(association, request), self.holder, self.catalog)
