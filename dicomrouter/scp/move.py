"""C-MOVE SCP (Patient Root, Study Root): a proxy that passes the source's answers on as they come.

pynetdicom's own C-MOVE service always opens the association to the destination itself; on the
direct route the *source* PACS stores to the destination. So on each accepted association the
router takes over the C-MOVE requests (and only those) and answers them with the source's
sub-operation counts.
"""

from __future__ import annotations

import threading
import time
from io import BytesIO
from typing import Any

from pydicom import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.events import Event

from dicomrouter.audit import association_audit
from dicomrouter.catalog.queries import Catalog
from dicomrouter.logging import get_logger
from dicomrouter.net.move_client import CANCELLED, PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE
from dicomrouter.reload import ConfigHolder
from dicomrouter.retrieve.mover import SUCCESS, UNABLE_TO_PERFORM, MoveRun, MoveTotals, move_outcome
from dicomrouter.routing.access import Caller
from dicomrouter.routing.move_routes import (
    destination_refusal,
    move_permission,
    resolve_destination,
)
from dicomrouter.scp.get import get_bindings
from dicomrouter.scp.retrieve_request import (
    IDENTIFIER_MISMATCH,
    PENDING,
    MoveRefused,
    check_retrieve_identifier,
    retrieve_sources,
)
from dicomrouter.scp.server import SupportedContext

log = get_logger(__name__)

MOVE_MODELS = (PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE)
DESTINATION_UNKNOWN = 0xA801
NOT_PERMITTED = 0xC001
REFUSED_NOT_AUTHORIZED = 0x0124  # the destination takes nothing now (inactive), as a C-STORE to it
UNABLE_TO_PROCESS = 0xC000
# Pending responses are optional (PS3.4 C.4.2.1.5): a few a second show progress; one per
# instance costs the router an encode and a send each and slows the move it reports on.
PENDING_INTERVAL_S = 0.2


class MoveExchange:
    """One C-MOVE request on the caller's association: decode, answer, watch for C-CANCEL."""

    def __init__(self, assoc, request: C_MOVE, context_id: int):
        self.assoc = assoc
        self.request = request
        self.context_id = context_id
        self.transfer_syntax = assoc._accepted_cx[context_id].transfer_syntax[0]

    def identifier(self) -> Dataset:
        ts = self.transfer_syntax
        return decode(
            self.request.Identifier, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated
        )

    def is_cancelled(self) -> bool:
        return self.assoc.dimse.cancel_req.pop(self.request.MessageID, None) is not None

    def send(self, status: int, totals: MoveTotals | None = None, comment: str = "") -> None:
        rsp = C_MOVE()
        rsp.MessageIDBeingRespondedTo = self.request.MessageID
        rsp.AffectedSOPClassUID = self.request.AffectedSOPClassUID
        rsp.Status = status
        if comment and status not in (SUCCESS, PENDING):
            rsp.ErrorComment = comment[:64]
        if totals is not None:
            if status in (PENDING, CANCELLED):
                rsp.NumberOfRemainingSuboperations = totals.remaining
            rsp.NumberOfCompletedSuboperations = totals.completed
            rsp.NumberOfFailedSuboperations = totals.failed
            rsp.NumberOfWarningSuboperations = totals.warning
            if status not in (PENDING, SUCCESS):
                failed = Dataset()
                failed.FailedSOPInstanceUIDList = totals.failed_sop_uids
                ts = self.transfer_syntax
                rsp.Identifier = BytesIO(
                    encode(failed, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
                )
        self.assoc.dimse.send_msg(rsp, self.context_id)


def serve_move(exchange: MoveExchange, holder: ConfigHolder, catalog: Catalog | None) -> None:
    """Answer one C-MOVE request from start to final response."""
    config = holder.current
    started = time.monotonic()
    caller: Caller = exchange.assoc.router_caller
    audit = association_audit(exchange.assoc)
    move_destination = str(exchange.request.MoveDestination or "").strip()
    query_model = str(exchange.request.AffectedSOPClassUID)

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
    originator = (caller.ae_title, int(exchange.request.MessageID))
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
            if exchange.is_cancelled() or not exchange.assoc.is_established:
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
            if not exchange.assoc.is_established:
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


def take_over_moves(event: Event, holder: ConfigHolder, catalog: Catalog | None) -> None:
    """On an accepted association: answer C-MOVE requests ourselves, the rest as pynetdicom does."""
    assoc = event.assoc
    serve_default = assoc._serve_request

    def serve_request(msg, context_id: int) -> None:
        context = assoc._accepted_cx.get(context_id)
        if (
            not isinstance(msg, C_MOVE)
            or context is None
            or context.abstract_syntax not in MOVE_MODELS
        ):
            serve_default(msg, context_id)
            return
        assoc.dimse.cancel_req = {}
        exchange = MoveExchange(assoc, msg, context_id)
        try:
            serve_move(exchange, holder, catalog)
        except Exception:
            log.exception("move_failed", calling_ae=assoc.requestor.ae_title)
            if assoc.is_established:
                exchange.send(UNABLE_TO_PROCESS, comment="internal error in the router")
        finally:
            assoc.dimse.cancel_req = {}

    assoc._serve_request = serve_request


def move_bindings(
    holder: ConfigHolder, catalog: Catalog | None = None
) -> tuple[list[SupportedContext], list[tuple[Any, ...]]]:
    """The presentation contexts and handlers for C-MOVE and C-GET (app.py wires them)."""
    get_contexts, get_handlers = get_bindings(holder, catalog)
    contexts = [*(SupportedContext(model) for model in MOVE_MODELS), *get_contexts]
    handlers: list[tuple[Any, ...]] = [
        (evt.EVT_ESTABLISHED, take_over_moves, [holder, catalog]),
        *get_handlers,
    ]
    return contexts, handlers
