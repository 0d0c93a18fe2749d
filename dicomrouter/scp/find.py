"""C-FIND SCP: Patient Root, Study Root and Modality Worklist, answered by the federation.

The query runs on the association's operation thread; its reader keeps reading, so a C-CANCEL
stops the fan-out at once. Answers are encoded straight from the merged data sets and written
as they come.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from threading import Event
from typing import Any

from pydicom import Dataset

from dicomrouter.audit import AssociationAudit
from dicomrouter.dul.association import Association, Request
from dicomrouter.dul.dimse import C_FIND_RQ
from dicomrouter.logging import get_logger
from dicomrouter.net.encoding import decode_identifier
from dicomrouter.net.find_client import CANCELLED, FIND_MODELS, WORKLIST_FIND
from dicomrouter.query.federation import FederatedAnswer, Federation
from dicomrouter.query.merge import InvalidIdentifier, check_identifier
from dicomrouter.reload import ConfigHolder
from dicomrouter.routing.access import Caller
from dicomrouter.routing.find_targets import find_targets
from dicomrouter.scp.identifier_service import IdentifierService
from dicomrouter.scp.status import status_dataset

log = get_logger(__name__)

SUCCESS, PENDING = 0x0000, 0xFF00
PENDING_STATUSES = (0xFF00, 0xFF01)
OUT_OF_RESOURCES = 0xA700  # every server failed, or more matches than router.max_find_results
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
CANNOT_ENCODE = 0xC312
NOT_PERMITTED = 0xC001  # the caller may read no server (a C000-range "unable to process")

FindResponse = tuple[int | Dataset, FederatedAnswer | None]


@dataclass
class FindEvent:
    """What `handle_find` reads of one C-FIND request."""

    caller: Caller
    called_ae: str
    query_model: str
    encoded_identifier: bytes
    transfer_syntax: str
    audit: AssociationAudit
    cancelled: Event
    before_wait: Callable[[], None] | None = None  # called before waiting for the next answer

    def identifier(self) -> Dataset:
        return decode_identifier(self.encoded_identifier, self.transfer_syntax)


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


def handle_find(event: FindEvent, holder: ConfigHolder, federation: Federation) -> Iterator[FindResponse]:
    """Validate, fan out, stream merged answers; the final status says how the servers did."""
    audit = event.audit
    operation = "worklist" if event.query_model == WORKLIST_FIND else "find"
    audit_row: dict[str, Any] = {"outcome": "cancelled", "detail": "the caller went away"}
    started = time.monotonic()
    try:
        yield from _answer_find(event, holder, federation, audit_row)
    finally:
        audit.record(operation, duration_s=time.monotonic() - started, **audit_row)


def _answer_find(
    event: FindEvent, holder: ConfigHolder, federation: Federation, audit_row: dict[str, Any]
) -> Iterator[FindResponse]:
    config = holder.current
    caller = event.caller
    called_ae = event.called_ae
    query_model = event.query_model
    try:
        identifier = event.identifier()
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
        for answer in run.answers(is_cancelled=event.cancelled.is_set, before_wait=event.before_wait):
            answers += 1
            audit_row["counts"] = {"answers": answers}
            yield PENDING, answer
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
    else:  # complete or partial (the audit trail and the log name the servers that failed)
        yield SUCCESS, None


class FindService(IdentifierService):
    operation = "find"
    commands = frozenset({C_FIND_RQ})
    sop_classes = tuple(FIND_MODELS)

    def __init__(self, holder: ConfigHolder, federation: Federation):
        self.holder = holder
        self.federation = federation

    def audit_operation(self, request: Request) -> str:
        return "worklist" if request.context.abstract_syntax == WORKLIST_FIND else "find"

    def stopped(self) -> None:
        """The front stopped: the associations kept for the next query go now."""
        if self.federation.links is not None:
            self.federation.links.release_all()

    def answer(self, request: Request, association: Association) -> None:
        batch = ResponseBatch(association)
        event = FindEvent(
            association.caller, association.called_ae, request.context.abstract_syntax, request.held(),
            request.context.transfer_syntax, association.audit, request.cancelled, before_wait=batch.flush,
        )
        responses = handle_find(event, self.holder, self.federation)
        pending_commands: dict[int, bytes] = {}  # status -> its command PDUs (one per answer otherwise)
        try:
            for status, answer in responses:
                if not association.open:
                    return
                comment = ""
                if isinstance(status, Dataset):
                    comment = str(status.get("ErrorComment", "") or "")
                    status = int(status.Status)
                if status not in PENDING_STATUSES:
                    # Sent before the generator is closed: its audit row is written after the answer.
                    batch.add(association.response_pdus(request, status, comment))
                    batch.flush()
                    return
                encoded = answer.encode(request.context.transfer_syntax) if answer is not None else None
                if encoded is None:
                    batch.add(association.response_pdus(request, CANNOT_ENCODE, "cannot encode an answer"))
                    batch.flush()
                    return
                command = pending_commands.get(status)
                if command is None:
                    command = pending_commands[status] = association.command_pdus(request, status, with_dataset=True)
                batch.add(command + association.dataset_pdus(request, encoded))
        finally:
            responses.close()
        if association.open:
            batch.add(association.response_pdus(request, 0x0000))
            batch.flush()


class ResponseBatch:
    """Responses waiting to go out together: answers that are ready at once share one send (one
    system call, one wake-up of the caller). Sent whenever the federation would wait, when
    MAX_BYTES are gathered, or when the oldest has waited MAX_WAIT_S; the first answer at once."""

    MAX_BYTES = 32 * 1024
    MAX_WAIT_S = 0.002

    def __init__(self, association: Association):
        self.association = association
        self._parts: list[bytes] = []
        self._size = 0
        self._oldest = 0.0
        self._sent_any = False

    def add(self, pdus: bytes) -> None:
        now = time.monotonic()
        if not self._parts:
            self._oldest = now
        self._parts.append(pdus)
        self._size += len(pdus)
        if self._size >= self.MAX_BYTES or now - self._oldest >= self.MAX_WAIT_S or not self._sent_any:
            self.flush()

    def flush(self) -> None:
        if not self._parts:
            return
        data = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        self._sent_any = True
        if self.association.open:
            self.association.send_pdus(data)
