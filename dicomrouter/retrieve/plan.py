"""Which server gives which series of a C-MOVE, C-GET or `dicomrouter move`: the retrieve plan.

The catalog is a hint, not the truth: a study may sit on several PACS (whole copies, partial
copies, or one series here and another there) and the catalog only knows what passed through
the router or answered a query. So before retrieving, every live server the caller may read is
asked at SERIES level (with NumberOfSeriesRelatedInstances) which series of the request it holds.
Each series is then taken once, from one server holding the most complete copy (an active one,
the primary first, then one already asked for other series, then the fastest to answer), and
only servers that hold something are asked. Each source also names the servers holding its
series as completely, to ask instead when it refuses or cannot be reached before sending
anything. A server the catalog names but that could not be asked is tried only when no
reachable server holds anything of the study.

Plain functions over config, catalog and caller: the DICOM fronts and the CLI call them alike.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydicom import Dataset

from dicomrouter.catalog.queries import Catalog
from dicomrouter.config import Config, ServerConfig
from dicomrouter.logging import get_logger
from dicomrouter.net.find_client import STUDY_ROOT_FIND, PeerFind, PeerFindError
from dicomrouter.net.move_client import STUDY_ROOT_MOVE
from dicomrouter.routing.access import Caller, may_read

log = get_logger(__name__)

# Keys that name a patient in a PATIENT-level request, copied into the study query.
PATIENT_KEYS = ("PatientID", "IssuerOfPatientID")


@dataclass(frozen=True)
class RetrieveRequest:
    """One C-MOVE or C-GET to send to one source."""

    query_model: str  # the caller's model, or Study Root for an identifier the plan wrote
    identifier: Dataset
    instances: int | None = None  # what the source said it holds for it; None: unknown


@dataclass
class SourcePlan:
    """One server to retrieve from, and what to take from it."""

    server: ServerConfig
    requests: list[RetrieveRequest]
    series: dict[str, list[str]] = field(default_factory=dict)  # study UID -> series UIDs
    # Servers holding the same series as completely, with their requests, to ask instead when
    # this one refuses or cannot be reached before it sent anything.
    fallbacks: list[tuple[ServerConfig, list[RetrieveRequest]]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.server.name

    @property
    def instances(self) -> int | None:
        counts = [request.instances for request in self.requests]
        return None if any(count is None for count in counts) else sum(counts)  # type: ignore[misc]


@dataclass
class RetrievePlan:
    """The sources of one retrieve, in the order to ask them, and what was learned on the way."""

    level: str
    study_uid: str | None
    sources: list[SourcePlan] = field(default_factory=list)
    unreachable: dict[str, str] = field(
        default_factory=dict
    )  # server name -> why it could not be asked
    copies_differ: dict[str, dict[str, int | None]] = field(
        default_factory=dict
    )  # series -> server -> count
    found_by: str = (
        "find"  # find | catalog (nobody reachable held it; the catalog named the sources)
    )
    inactive_only: bool = False  # every source is inactive (historical data)

    @property
    def servers(self) -> list[ServerConfig]:
        return [source.server for source in self.sources]

    @property
    def instances(self) -> int | None:
        """Instances the sources said they would send, or None when one did not say."""
        counts = [source.instances for source in self.sources]
        return None if any(count is None for count in counts) else sum(counts)  # type: ignore[misc]


@dataclass
class _Survey:
    """What one server said it holds: (study, series) -> instance count."""

    server: ServerConfig
    series: dict[tuple[str, str], int | None] = field(default_factory=dict)
    failure: str | None = None
    elapsed_s: float = 0.0


def retrieve_level(identifier: Dataset) -> tuple[str, str | None]:
    """(QueryRetrieveLevel, the study UID or None) of a checked C-MOVE / C-GET identifier."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    study_uid = str(identifier.get("StudyInstanceUID", "") or "").strip() or None
    return level, study_uid


def plan_retrieve(
    config: Config,
    catalog: Catalog | None,
    caller: Caller,
    identifier: Dataset,
    query_model: str = STUDY_ROOT_MOVE,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> RetrievePlan:
    """Which server gives which series of `identifier`, for a caller who may read them.

    `only` narrows the servers asked and `exclude` leaves some out (by name). The identifier
    must have passed check_retrieve_identifier (one study, a known level).
    """
    level, study_uid = retrieve_level(identifier)
    candidates = [
        s for s in config.live_servers() if may_read(caller, s) and s.name not in set(exclude)
    ]
    if only is not None:
        names = set(only)
        candidates = [s for s in candidates if s.name in names]
    plan = RetrievePlan(level, study_uid)
    surveys = _survey_all(config, candidates, identifier, level, study_uid)
    for survey in surveys:
        if survey.failure is not None:
            plan.unreachable[survey.server.name] = survey.failure
    found = [survey for survey in surveys if survey.failure is None and survey.series]
    _learn(catalog, found, study_uid)
    if found:
        _assign(plan, config, found, identifier, query_model)
    elif study_uid is not None and catalog is not None:
        _fall_back_to_catalog(plan, config, catalog, candidates, identifier, query_model)
    plan.inactive_only = bool(plan.sources) and not any(s.server.active for s in plan.sources)
    if plan.inactive_only:
        log.warning(
            "move_from_inactive_server",
            study_uid=study_uid,
            servers=[s.name for s in plan.sources],
            reason="no active server holds it; historical data stays reachable",
        )
    log.info(
        "retrieve_planned",
        query_level=level,
        study_uid=study_uid,
        found_by=plan.found_by,
        sources={s.name: s.instances for s in plan.sources},
        unreachable=plan.unreachable or None,
        copies_differ=plan.copies_differ or None,
    )
    return plan


# --------------------------------------------------------------------------- asking the servers


def _survey_all(
    config: Config,
    servers: list[ServerConfig],
    identifier: Dataset,
    level: str,
    study_uid: str | None,
) -> list[_Survey]:
    if not servers:
        return []

    def survey(server: ServerConfig) -> _Survey:
        result = _Survey(server)
        started = time.monotonic()
        try:
            studies = (
                [study_uid] if study_uid else _query_patient_studies(config, server, identifier)
            )
            for study in studies:
                for series_uid, count in _query_series(config, server, identifier, level, study):
                    result.series[(study, series_uid)] = count
        except PeerFindError as exc:
            result.failure = f"{exc.kind}: {exc.reason}"
        result.elapsed_s = time.monotonic() - started
        return result

    with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="retrieve-plan") as pool:
        return list(pool.map(survey, servers))


def _answers(config: Config, server: ServerConfig, query: Dataset) -> list[Dataset]:
    find = PeerFind(server, config.router, STUDY_ROOT_FIND, query, config.router.find_timeout_s)
    try:
        return list(find.answers())
    finally:
        find.close()


def _query_patient_studies(config: Config, server: ServerConfig, identifier: Dataset) -> list[str]:
    """The studies of the patient a PATIENT-level request names, on `server`."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    for keyword in PATIENT_KEYS:
        if keyword in identifier:
            setattr(query, keyword, identifier.get(keyword))
    query.StudyInstanceUID = ""
    studies = (
        str(answer.get("StudyInstanceUID", "") or "").strip()
        for answer in _answers(config, server, query)
    )
    return list(dict.fromkeys(uid for uid in studies if uid))


def _query_series(
    config: Config, server: ServerConfig, identifier: Dataset, level: str, study_uid: str
) -> list[tuple[str, int | None]]:
    """(series UID, NumberOfSeriesRelatedInstances) of `study_uid` on `server`, narrowed to the
    series a SERIES or IMAGE request names."""
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = (
        identifier.get("SeriesInstanceUID", "") if level in ("SERIES", "IMAGE") else ""
    )
    query.NumberOfSeriesRelatedInstances = ""
    result = []
    for answer in _answers(config, server, query):
        series_uid = str(answer.get("SeriesInstanceUID", "") or "").strip()
        if series_uid:
            result.append((series_uid, _count(answer.get("NumberOfSeriesRelatedInstances"))))
    return result


def _count(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _learn(catalog: Catalog | None, found: list[_Survey], study_uid: str | None) -> None:
    """Teach the catalog where the studies are (it only knew what passed through the router)."""
    if catalog is None:
        return
    for survey in found:
        for study in dict.fromkeys(study for study, _series in survey.series):
            if study_uid is not None and study != study_uid:
                continue
            try:
                catalog.record_study_seen(survey.server.name, study, "found")
            except Exception:  # learning is a nicety; the retrieve goes on
                log.exception("catalog_learn_failed", server=survey.server.name, study_uid=study)


# --------------------------------------------------------------------------- choosing the sources


def _assign(
    plan: RetrievePlan, config: Config, found: list[_Survey], identifier: Dataset, query_model: str
) -> None:
    """Each series to one server, then the requests each chosen server gets."""
    order = {server.name: index for index, server in enumerate(config.servers)}
    holders: dict[tuple[str, str], list[_Survey]] = {}
    for survey in found:
        for key in survey.series:
            holders.setdefault(key, []).append(survey)
    chosen: dict[str, tuple[_Survey, list[tuple[str, str]]]] = {}
    for key in sorted(holders, key=lambda k: (k[0], k[1])):
        copies = holders[key]
        counts = {survey.server.name: survey.series[key] for survey in copies}
        if len(set(counts.values())) > 1:
            plan.copies_differ[key[1]] = counts

        def rank(survey: _Survey, key=key) -> tuple:
            return (
                -(survey.series[key] or 0),  # the most complete copy
                not survey.server.active,
                not survey.server.primary,
                survey.server.name
                not in chosen,  # one association more costs more than a slower one
                round(survey.elapsed_s, 2),
                order.get(survey.server.name, len(order)),
            )

        best = min(copies, key=rank)
        chosen.setdefault(best.server.name, (best, []))[1].append(key)
    ranked = sorted(
        chosen.values(),
        key=lambda item: (not item[0].server.primary, order.get(item[0].server.name, 0)),
    )
    for survey, keys in ranked:
        source = _source_plan(survey, keys, identifier, query_model, plan.level)
        source.fallbacks = _fallbacks(survey, keys, found, identifier, query_model, plan.level)
        plan.sources.append(source)


MAX_FALLBACKS = 2


def _fallbacks(
    chosen: _Survey,
    keys: list[tuple[str, str]],
    found: list[_Survey],
    identifier: Dataset,
    query_model: str,
    level: str,
) -> list[tuple[ServerConfig, list[RetrieveRequest]]]:
    """Other servers whose copies of `keys` are as complete as the chosen one's (active first)."""
    others = [
        survey
        for survey in found
        if survey is not chosen
        and all(
            key in survey.series and (survey.series[key] or 0) >= (chosen.series[key] or 0)
            for key in keys
        )
    ]
    others.sort(
        key=lambda survey: (not survey.server.active, not survey.server.primary, survey.elapsed_s)
    )
    result = []
    for survey in others[:MAX_FALLBACKS]:
        if level == "IMAGE":  # one series: the images asked for, from whoever holds it
            requests = [RetrieveRequest(query_model, identifier, None)]
        else:
            requests = _requests_by_uid(survey, keys)
        result.append((survey.server, requests))
    return result


def _requests_by_uid(survey: _Survey, keys: list[tuple[str, str]]) -> list[RetrieveRequest]:
    """One SERIES-level request per study, naming the series to take from `survey`'s server."""
    by_study: dict[str, list[str]] = {}
    for study, series in keys:
        by_study.setdefault(study, []).append(series)
    requests = []
    for study, series in by_study.items():
        request = Dataset()
        request.QueryRetrieveLevel = "SERIES"
        request.StudyInstanceUID = study
        request.SeriesInstanceUID = series if len(series) > 1 else series[0]
        count = _sum([survey.series[(study, uid)] for uid in series])
        requests.append(RetrieveRequest(STUDY_ROOT_MOVE, request, count))
    return requests


def _source_plan(
    survey: _Survey, keys: list[tuple[str, str]], identifier: Dataset, query_model: str, level: str
) -> SourcePlan:
    """The requests for one source: the caller's identifier when the source holds nothing else
    of what it names, else one identifier per study naming the series to take."""
    by_study: dict[str, list[str]] = {}
    for study, series in keys:
        by_study.setdefault(study, []).append(series)
    count = _sum([survey.series[key] for key in keys])
    if level == "IMAGE" or set(keys) == set(survey.series):
        if level == "IMAGE":  # the images asked for, not the whole series
            values = identifier.get("SOPInstanceUID")
            count = len(values) if isinstance(values, list | tuple) or _multi(values) else 1
        return SourcePlan(
            survey.server, [RetrieveRequest(query_model, identifier, count)], by_study
        )
    requests = []
    for study, series in by_study.items():
        request = Dataset()
        held_whole = {s for (st, s) in survey.series if st == study} == set(series)
        request.QueryRetrieveLevel = (
            "STUDY" if held_whole and level in ("PATIENT", "STUDY") else "SERIES"
        )
        request.StudyInstanceUID = study
        if request.QueryRetrieveLevel == "SERIES":
            request.SeriesInstanceUID = series if len(series) > 1 else series[0]
        requests.append(
            RetrieveRequest(
                STUDY_ROOT_MOVE, request, _sum([survey.series[(study, s)] for s in series])
            )
        )
    return SourcePlan(survey.server, requests, by_study)


def _multi(value: object) -> bool:
    return type(value).__name__ == "MultiValue"


def _sum(counts: list[int | None]) -> int | None:
    return None if any(count is None for count in counts) else sum(counts)  # type: ignore[misc]


def _fall_back_to_catalog(
    plan: RetrievePlan,
    config: Config,
    catalog: Catalog,
    candidates: list[ServerConfig],
    identifier: Dataset,
    query_model: str,
) -> None:
    """Nobody reachable holds it: the servers the catalog names that could not be asked, so the
    caller hears why (a PACS down) instead of "not found"."""
    allowed = {server.name for server in candidates}
    try:
        names = [row.server_name for row in catalog.where_study(plan.study_uid or "")]
    except Exception:
        log.exception("catalog_lookup_failed", study_uid=plan.study_uid)
        return
    for name in dict.fromkeys(names):
        server = config.server(name)
        if server is None or server.deleted or name not in allowed or name not in plan.unreachable:
            continue
        plan.sources.append(SourcePlan(server, [RetrieveRequest(query_model, identifier)]))
    plan.sources.sort(key=lambda source: (not source.server.active, not source.server.primary))
    if plan.sources:
        plan.found_by = "catalog"
