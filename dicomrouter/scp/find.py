"""C-FIND SCP: Patient Root, Study Root and Modality Worklist, answered by the federation.

The answers are written to the caller's socket by the router itself. pynetdicom hands each
response to its DUL thread, which sleeps a millisecond whenever its queue is empty and sends
one PDU per loop: a federated query of a few hundred answers spent most of its time there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from pydicom import Dataset
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.events import Event

from dicomrouter.audit import association_audit
from dicomrouter.logging import get_logger
from dicomrouter.net.encoding import encode_answer
from dicomrouter.net.find_client import CANCELLED, FIND_MODELS, WORKLIST_FIND
from dicomrouter.net.upper_layer import NO_DATASET, command_set, pdata_pdus, us
from dicomrouter.query.federation import Federation
from dicomrouter.query.merge import InvalidIdentifier, check_identifier
from dicomrouter.reload import ConfigHolder
from dicomrouter.routing.find_targets import find_targets
from dicomrouter.scp.server import SupportedContext
from dicomrouter.scp.status import status_dataset

log = get_logger(__name__)

# pynetdicom formats every identifier and PDU for its debug log even when nobody reads it
# (logging.py keeps its logger at WARNING): a large share of the CPU per C-FIND answer.
pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
pynetdicom_config.LOG_HANDLER_LEVEL = "none"

PENDING = 0xFF00
PENDING_STATUSES = (0xFF00, 0xFF01)
OUT_OF_RESOURCES = 0xA700  # every server failed, or more matches than router.max_find_results
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
HANDLER_FAILED = 0xC311  # what pynetdicom answers when the handler raises
CANNOT_ENCODE = 0xC312
NOT_PERMITTED = 0xC001  # the caller may read no server (a C000-range "unable to process")

FindResponse = tuple[int | Dataset, Dataset | None]



def describe_query(identifier: Dataset, level: str) -> str:
    """The level and the keys given a value, for the audit trail (at most 500 characters)."""
    keys = []
    for element in identifier:
        if element.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet") or element.VR == "SQ":
            continue
        value = str(element.value or "").strip()
        if value:
            keys.append(f"{element.keyword or element.tag}={value}")
    return " ".join([level, *keys])[:500]


def handle_find(event: Event, holder: ConfigHolder, federation: Federation) -> Iterator[FindResponse]:
    """Validate, fan out, stream merged answers; the final status says how the servers did."""
    audit = association_audit(event.assoc)
    operation = "worklist" if str(event.request.AffectedSOPClassUID) == WORKLIST_FIND else "find"
    audit_row: dict[str, Any] = {"outcome": "cancelled", "detail": "the caller went away"}
    started = time.monotonic()
    try:
        yield from _answer_find(event, holder, federation, audit_row)
    finally:
        audit.record(operation, duration_s=time.monotonic() - started, **audit_row)


def _answer_find(
    event: Event, holder: ConfigHolder, federation: Federation, audit_row: dict[str, Any]
) -> Iterator[FindResponse]:
    config = holder.current
    caller = event.assoc.router_caller
    called_ae = getattr(event.assoc, "router_called_ae", config.router.ae_title)
    query_model = str(event.request.AffectedSOPClassUID)
    try:
        identifier = event.identifier
        level = check_identifier(identifier, query_model)
    except InvalidIdentifier as exc:
        log.warning("find_refused", calling_ae=caller.ae_title, reason=str(exc))
        audit_row.update(outcome="refused", detail=str(exc))
        yield status_dataset(IDENTIFIER_MISMATCH, str(exc)), None
        return
    except Exception as exc:  # pydicom could not even start decoding
        log.warning("find_refused", calling_ae=caller.ae_title, reason=f"undecodable identifier: {exc}")
        audit_row.update(outcome="refused", detail="cannot decode the identifier")
        yield status_dataset(IDENTIFIER_MISMATCH, "cannot decode the identifier"), None
        return
    query = describe_query(identifier, level)
    study_uid = str(identifier.get("StudyInstanceUID", "") or "").strip()
    audit_row["study_uid"] = study_uid if study_uid and "\\" not in study_uid and "*" not in study_uid else None
    worklist = query_model == WORKLIST_FIND
    targets = find_targets(config, caller, called_ae, worklist=worklist)
    if not targets.servers:
        log.warning("find_refused", calling_ae=caller.ae_title, reason=targets.refused)
        audit_row.update(outcome="refused", detail=f"{targets.refused}; {query}")
        yield status_dataset(NOT_PERMITTED, targets.refused or "no server to query"), None
        return
    audit_row.update(servers=[s.name for s in targets.servers], detail=query)
    # Worklist answers name no retrieve AE; Q/R answers name the AE the caller called (the router).
    retrieve_ae = None if worklist else called_ae
    answers = 0
    try:
        run = federation.start(
            targets.servers, config.router, query_model, identifier, level, retrieve_ae, calling_ae=caller.ae_title
        )
        for answer in run.answers(is_cancelled=lambda: event.is_cancelled):
            answers += 1
            audit_row["counts"] = {"answers": answers}
            yield PENDING, answer.identifier
    except Exception:
        log.exception("find_failed", calling_ae=caller.ae_title, query_level=level)
        audit_row.update(outcome="failed", detail=f"internal error in the router; {query}")
        yield status_dataset(UNABLE_TO_PROCESS, "internal error in the router"), None
        return
    summary = run.summary
    assert summary is not None
    failed = [r.name for r in summary.failed_servers]
    audit_row["counts"] = {"answers": summary.answers, "servers": len(summary.servers), "servers_failed": len(failed)}
    audit_row["outcome"] = {"complete": "success"}.get(summary.outcome, summary.outcome)
    if failed:
        audit_row["detail"] = f"{query}; failed: {summary.failure_comment(400)}"
    if summary.outcome == "cancelled":
        yield CANCELLED, None
    elif summary.outcome == "failed":
        yield status_dataset(OUT_OF_RESOURCES, summary.failure_comment()), None
    elif summary.outcome == "limited":
        comment = f"more than {run.max_results} matches; narrow the query"
        yield status_dataset(OUT_OF_RESOURCES, comment), None
    # complete or partial: pynetdicom sends Success after the last answer


class FindExchange:
    """One C-FIND request on the caller's association; responses go straight to its socket."""

    def __init__(self, assoc, request: C_FIND, context_id: int):
        self.assoc = assoc
        self.request = request
        self.context_id = context_id
        self.context = assoc._accepted_cx[context_id]
        self.transfer_syntax = self.context.transfer_syntax[0]
        self.max_pdu = assoc.requestor.maximum_length or 0

    def event(self) -> Event:
        """The EVT_C_FIND event `handle_find` reads (request, identifier, is_cancelled)."""
        return Event(
            self.assoc,
            evt.EVT_C_FIND,
            {"request": self.request, "context": self.context.as_tuple, "_is_cancelled": self.is_cancelled},
        )

    def is_cancelled(self, message_id: int) -> bool:
        return self.assoc.dimse.cancel_req.pop(message_id, None) is not None

    def send(self, status: int, identifier: bytes | None = None, comment: str = "") -> None:
        elements = [
            (0x0002, str(self.request.AffectedSOPClassUID).encode("ascii")),
            (0x0100, us(0x8020)),
            (0x0120, us(self.request.MessageID)),
            (0x0800, us(0x0000 if identifier is not None else NO_DATASET)),
            (0x0900, us(status)),
        ]
        if comment:
            text = comment[:64].encode("latin-1", "replace")
            elements.append((0x0902, text + b" " * (len(text) % 2)))  # LO pads with a space
        data = pdata_pdus(self.context_id, command_set(elements), True, self.max_pdu)
        if identifier is not None:
            data += pdata_pdus(self.context_id, identifier, False, self.max_pdu)
        # The DUL thread only writes what is put in its queue; nothing is while we answer.
        self.assoc.dul.socket.send(data)

    def encode(self, identifier: Dataset) -> bytes | None:
        ts = self.transfer_syntax
        if ts.is_little_endian and not ts.is_deflated:
            return encode_answer(identifier, ts.is_implicit_VR) or None
        return encode(identifier, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated) or None

    @property
    def open(self) -> bool:
        acse = self.assoc.acse
        return self.assoc.is_established and not acse.is_aborted() and not acse.is_release_requested()


def serve_find(exchange: FindExchange, holder: ConfigHolder, federation: Federation) -> None:
    """Answer one C-FIND request with `handle_find`'s results, as pynetdicom's Q/R SCP would."""
    responses = handle_find(exchange.event(), holder, federation)
    try:
        for status, identifier in responses:
            if not exchange.open:
                return
            comment = ""
            if isinstance(status, Dataset):
                comment = str(status.get("ErrorComment", "") or "")
                status = int(status.Status)
            if status not in PENDING_STATUSES:
                exchange.send(status, comment=comment)
                return
            encoded = exchange.encode(identifier) if identifier is not None else None
            if encoded is None:
                exchange.send(CANNOT_ENCODE, comment="cannot encode an answer")
                return
            exchange.send(status, encoded)
    except Exception:
        log.exception("find_failed", calling_ae=exchange.assoc.requestor.ae_title)
        if exchange.open:
            exchange.send(HANDLER_FAILED, comment="internal error in the router")
        return
    finally:
        responses.close()
    if exchange.open:
        exchange.send(0x0000)


def take_over_finds(event: Event, holder: ConfigHolder, federation: Federation) -> None:
    """On an accepted association: answer C-FIND requests ourselves, the rest as before."""
    assoc = event.assoc
    serve_default = assoc._serve_request

    def serve_request(msg, context_id: int) -> None:
        context = assoc._accepted_cx.get(context_id)
        if not isinstance(msg, C_FIND) or context is None or context.abstract_syntax not in FIND_MODELS:
            serve_default(msg, context_id)
            return
        assoc.dimse.cancel_req = {}
        try:
            serve_find(FindExchange(assoc, msg, context_id), holder, federation)
        finally:
            assoc.dimse.cancel_req = {}

    assoc._serve_request = serve_request


def find_bindings(holder: ConfigHolder, catalog=None) -> tuple[list[SupportedContext], list[tuple[Any, ...]]]:
    """The presentation contexts and handlers for C-FIND (app.py wires them)."""
    federation = Federation(catalog)
    contexts = [SupportedContext(model) for model in FIND_MODELS]
    handlers = [
        (evt.EVT_ESTABLISHED, take_over_finds, [holder, federation]),
        # What pynetdicom would call if a C-FIND ever reached its own service class.
        (evt.EVT_C_FIND, handle_find, [holder, federation]),
    ]
    return contexts, handlers
