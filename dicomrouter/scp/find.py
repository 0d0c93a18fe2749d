"""C-FIND SCP: Patient Root, Study Root and Modality Worklist, answered by the federation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydicom import Dataset
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom.events import Event

from dicomrouter.audit import association_audit
from dicomrouter.logging import get_logger
from dicomrouter.net.find_client import CANCELLED, FIND_MODELS, WORKLIST_FIND
from dicomrouter.query.federation import Federation
from dicomrouter.query.merge import InvalidIdentifier, check_identifier
from dicomrouter.reload import ConfigHolder
from dicomrouter.routing.find_targets import find_targets
from dicomrouter.scp.server import SupportedContext

log = get_logger(__name__)

# pynetdicom formats every identifier and PDU for its debug log even when nobody reads it
# (logging.py keeps its logger at WARNING): a large share of the CPU per C-FIND answer.
pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
pynetdicom_config.LOG_HANDLER_LEVEL = "none"

PENDING = 0xFF00
OUT_OF_RESOURCES = 0xA700  # every server failed, or more matches than router.max_find_results
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
NOT_PERMITTED = 0xC001  # the caller may read no server (a C000-range "unable to process")

FindResponse = tuple[int | Dataset, Dataset | None]


def status_dataset(status: int, comment: str = "") -> Dataset:
    result = Dataset()
    result.Status = status
    if comment:
        result.ErrorComment = comment[:64]  # LO
    return result


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
    try:
        yield from _answer_find(event, holder, federation, audit_row)
    finally:
        audit.record(operation, **audit_row)


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
        log.exception("find_failed", calling_ae=caller.ae_title, level=level)
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


def find_bindings(holder: ConfigHolder, catalog=None) -> tuple[list[SupportedContext], list[tuple[Any, ...]]]:
    """The presentation contexts and the EVT_C_FIND handler for the DICOM front (app.py wires them)."""
    federation = Federation(catalog)
    contexts = [SupportedContext(model) for model in FIND_MODELS]
    handlers = [(evt.EVT_C_FIND, handle_find, [holder, federation])]
    return contexts, handlers
