"""C-FIND SCP: Patient Root, Study Root and Modality Worklist, answered by the federation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydicom import Dataset
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom.events import Event

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


def handle_find(event: Event, holder: ConfigHolder, federation: Federation) -> Iterator[FindResponse]:
    """Validate, fan out, stream merged answers; the final status says how the servers did."""
    config = holder.current
    caller = event.assoc.router_caller
    called_ae = getattr(event.assoc, "router_called_ae", config.router.ae_title)
    query_model = str(event.request.AffectedSOPClassUID)
    try:
        identifier = event.identifier
        level = check_identifier(identifier, query_model)
    except InvalidIdentifier as exc:
        log.warning("find_refused", calling_ae=caller.ae_title, reason=str(exc))
        yield status_dataset(IDENTIFIER_MISMATCH, str(exc)), None
        return
    except Exception as exc:  # pydicom could not even start decoding
        log.warning("find_refused", calling_ae=caller.ae_title, reason=f"undecodable identifier: {exc}")
        yield status_dataset(IDENTIFIER_MISMATCH, "cannot decode the identifier"), None
        return
    worklist = query_model == WORKLIST_FIND
    targets = find_targets(config, caller, called_ae, worklist=worklist)
    if not targets.servers:
        log.warning("find_refused", calling_ae=caller.ae_title, reason=targets.refused)
        yield status_dataset(NOT_PERMITTED, targets.refused or "no server to query"), None
        return
    # Worklist answers name no retrieve AE; Q/R answers name the AE the caller called (the router).
    retrieve_ae = None if worklist else called_ae
    try:
        run = federation.start(
            targets.servers, config.router, query_model, identifier, level, retrieve_ae, calling_ae=caller.ae_title
        )
        for answer in run.answers(is_cancelled=lambda: event.is_cancelled):
            yield PENDING, answer.identifier
    except Exception:
        log.exception("find_failed", calling_ae=caller.ae_title, level=level)
        yield status_dataset(UNABLE_TO_PROCESS, "internal error in the router"), None
        return
    summary = run.summary
    assert summary is not None
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
