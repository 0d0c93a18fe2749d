"""QIDO-RS over the C-FIND federation: one federated query, answers as DICOM JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from dicomrouter.config import Config
from dicomrouter.http.dicomweb.dicomjson import answer_json
from dicomrouter.http.dicomweb.errors import DicomWebError
from dicomrouter.http.dicomweb.qido import QidoQuery
from dicomrouter.logging import get_logger
from dicomrouter.net.find_client import STUDY_ROOT_FIND
from dicomrouter.query.federation import Federation
from dicomrouter.routing.access import Caller
from dicomrouter.routing.find_targets import find_targets

log = get_logger(__name__)

WARN_AGENT = "dicomrouter"
FUZZY_UNSUPPORTED = (
    "The fuzzymatching parameter is not supported. Only literal matching has been performed."
)


def warning_value(text: str) -> str:
    """An HTTP Warning header value (RFC 7234 5.5): code 299, agent, quoted text."""
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'299 {WARN_AGENT} "{quoted}"'


@dataclass
class SearchResult:
    answers: list[dict]
    warnings: list[str] = field(default_factory=list)  # Warning header values
    outcome: str = "complete"
    servers: list[str] = field(default_factory=list)


def retrieve_url(base_url: str, level: str, answer) -> str | None:
    """Where WADO-RS retrieves an answer's entity (the RetrieveURL attribute, 0008,1190)."""
    study = str(answer.get("StudyInstanceUID", "") or "")
    if not study or not base_url:
        return None
    url = f"{base_url}/studies/{study}"
    series = str(answer.get("SeriesInstanceUID", "") or "")
    if level in ("SERIES", "IMAGE") and series:
        url += f"/series/{series}"
        sop = str(answer.get("SOPInstanceUID", "") or "")
        if level == "IMAGE" and sop:
            url += f"/instances/{sop}"
    return url


def qido_search(
    config: Config, federation: Federation, caller: Caller, query: QidoQuery, base_url: str = ""
) -> SearchResult:
    """The federated C-FIND for `query` across the servers `caller` may read.

    DicomWebError 403 when it may read none, 502 when every server failed.
    """
    targets = find_targets(config, caller)
    if not targets.servers:
        raise DicomWebError(403, targets.refused or "no server to query")
    if query.limit == 0:
        return SearchResult([], servers=[s.name for s in targets.servers])
    run = federation.start(
        targets.servers,
        config.router,
        STUDY_ROOT_FIND,
        query.identifier,
        query.level,
        config.router.ae_title,  # Retrieve AE Title: the router, as over DIMSE
        calling_ae=caller.ae_title,
    )
    answers: list[dict] = []
    skipped = 0
    stream = run.answers()
    try:
        for answer in stream:
            if skipped < query.offset:
                skipped += 1
                continue
            url = retrieve_url(base_url, query.level, answer.identifier)
            answers.append(answer_json(answer.identifier, url))
            if query.limit is not None and len(answers) >= query.limit:
                break
    finally:
        stream.close()  # a stop at the limit cancels the servers still answering
    summary = run.summary
    assert summary is not None
    warnings = [warning_value(f"{r.name}: {r.state} ({r.reason})") for r in summary.failed_servers]
    if query.fuzzy:
        warnings.append(warning_value(FUZZY_UNSUPPORTED))
    if summary.outcome == "failed":
        raise DicomWebError(502, f"every server failed: {summary.failure_comment(400)}", warnings)
    if summary.outcome == "limited":
        warnings.append(warning_value(f"more than {run.max_results} matches; narrow the query"))
    return SearchResult(answers, warnings, summary.outcome, [s.name for s in targets.servers])
