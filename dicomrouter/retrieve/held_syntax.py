"""C-GET so that the source sends every instance in the transfer syntax it holds it in.

A PACS answering a C-GET sends each instance on a presentation context the router proposed for
its SOP class; where no accepted context has the instance's own transfer syntax, it transcodes
(a lossy JPEG decompressed, several times the size) or fails where it has no codec. So each
storage class is proposed once per transfer syntax, one syntax per context (the uncompressed
ones each in their own context too: a context listing several lets the PACS pick one of them,
and an implicit VR instance would then be re-encoded as explicit).

That costs 13 contexts per class and an association carries at most 128 (one for the C-GET),
so the classes are found first: SOP Classes in Study (one C-FIND answer per study). Up to 9
classes (the usual study) go in one association with the caller's own identifier. More are
split into several associations, each asking at IMAGE level for the instances of its classes
(an IMAGE-level C-FIND says which). A source that says nothing of its classes gets the common
ones with every syntax, and the remaining storage classes uncompressed, in one association.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import StoragePresentationContexts

from dicomrouter.config import RouterSettings, ServerConfig
from dicomrouter.logging import get_logger
from dicomrouter.net.find_client import STUDY_ROOT_FIND, PeerFind, PeerFindError
from dicomrouter.net.get_client import (
    MAX_STORAGE_CONTEXTS,
    STUDY_ROOT_GET,
    ReceivedInstance,
    get_instances,
)
from dicomrouter.net.move_client import MoveProgress, PeerMoveError

log = get_logger(__name__)

UNCOMPRESSED_SYNTAXES = tuple(
    str(uid)
    for uid in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
    )
)
COMPRESSED_SYNTAXES = tuple(
    str(uid)
    for uid in (
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
        RLELossless,
    )
)
HELD_SYNTAXES = UNCOMPRESSED_SYNTAXES + COMPRESSED_SYNTAXES
CLASSES_PER_ASSOCIATION = MAX_STORAGE_CONTEXTS // len(HELD_SYNTAXES)  # 9
# Proposed with every syntax when a source does not say which classes it holds.
COMMON_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX
    "1.2.840.10008.5.1.4.1.1.1.2",  # MG
    "1.2.840.10008.5.1.4.1.1.6.1",  # US
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.20",  # NM
)
WARNING = 0xB000

StorageContexts = list[tuple[str, list[str]]]


def held_syntax_contexts(sop_classes: Sequence[str]) -> StorageContexts:
    """One context per (class, transfer syntax): the source can send each instance as it holds it."""
    return [(sop, [syntax]) for sop in sop_classes for syntax in HELD_SYNTAXES]


def fallback_contexts() -> StorageContexts:
    """The common classes with every syntax, then other storage classes uncompressed, up to 127."""
    contexts = held_syntax_contexts(COMMON_SOP_CLASSES)
    for context in StoragePresentationContexts:
        sop = str(context.abstract_syntax)
        if sop in COMMON_SOP_CLASSES:
            continue
        if len(contexts) >= MAX_STORAGE_CONTEXTS:
            break
        contexts.append((sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    return contexts


@dataclass(frozen=True)
class GetPass:
    """One association's C-GET: what to ask for and the contexts to offer."""

    query_model: str
    identifier: Dataset
    storage: StorageContexts


def _find_values(
    server: ServerConfig, router: RouterSettings, query: Dataset
) -> list[Dataset] | None:
    find = PeerFind(server, router, STUDY_ROOT_FIND, query, router.find_timeout_s)
    try:
        return list(find.answers())
    except PeerFindError as exc:
        log.warning("held_syntax_find_failed", server=server.name, reason=exc.reason)
        return None
    finally:
        find.close()


def _values(answer: Dataset, keyword: str) -> list[str]:
    value = answer.get(keyword)
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value if v]


def _copy_keys(identifier: Dataset, query: Dataset, keywords: Sequence[str]) -> None:
    for keyword in keywords:
        value = identifier.get(keyword)
        setattr(query, keyword, value if value is not None else "")


def study_sop_classes(
    server: ServerConfig, router: RouterSettings, identifier: Dataset
) -> set[str] | None:
    """The SOP classes of the studies `identifier` names (SOP Classes in Study), None if unknown."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    _copy_keys(identifier, query, ("PatientID", "StudyInstanceUID"))
    query.SOPClassesInStudy = ""
    answers = _find_values(server, router, query)
    if not answers:
        return None
    classes = {sop for answer in answers for sop in _values(answer, "SOPClassesInStudy")}
    return classes or None


def instances_by_class(
    server: ServerConfig, router: RouterSettings, identifier: Dataset
) -> dict[str, dict[tuple[str, str], list[str]]] | None:
    """SOP class -> (study, series) -> SOP Instance UIDs, from an IMAGE-level C-FIND."""
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    _copy_keys(
        identifier, query, ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    query.SOPClassUID = ""
    answers = _find_values(server, router, query)
    if answers is None:
        return None
    found: dict[str, dict[tuple[str, str], list[str]]] = {}
    for answer in answers:
        sop_class = str(answer.get("SOPClassUID", "") or "")
        study = str(answer.get("StudyInstanceUID", "") or "")
        series = str(answer.get("SeriesInstanceUID", "") or "")
        sop = str(answer.get("SOPInstanceUID", "") or "")
        if not (sop_class and study and series and sop):
            return None  # the source does not say enough to ask for the instances by class
        found.setdefault(sop_class, {}).setdefault((study, series), []).append(sop)
    return found


def get_passes(
    server: ServerConfig, router: RouterSettings, query_model: str, identifier: Dataset
) -> list[GetPass]:
    """The C-GETs (one association each) that bring every instance `identifier` names as held."""
    classes = study_sop_classes(server, router, identifier)
    if classes is not None and len(classes) <= CLASSES_PER_ASSOCIATION:
        return [GetPass(query_model, identifier, held_syntax_contexts(sorted(classes)))]
    by_class = instances_by_class(server, router, identifier)
    if not by_class:
        log.info("held_syntax_classes_unknown", server=server.name)
        return [GetPass(query_model, identifier, fallback_contexts())]
    ordered = sorted(by_class)
    if len(ordered) <= CLASSES_PER_ASSOCIATION:
        return [GetPass(query_model, identifier, held_syntax_contexts(ordered))]
    passes = []
    for start in range(0, len(ordered), CLASSES_PER_ASSOCIATION):
        group = ordered[start : start + CLASSES_PER_ASSOCIATION]
        series: dict[tuple[str, str], list[str]] = {}
        for sop_class in group:
            for key, sops in by_class[sop_class].items():
                series.setdefault(key, []).extend(sops)
        for (study_uid, series_uid), sops in sorted(series.items()):
            narrowed = Dataset()
            narrowed.QueryRetrieveLevel = "IMAGE"
            narrowed.StudyInstanceUID = study_uid
            narrowed.SeriesInstanceUID = series_uid
            narrowed.SOPInstanceUID = sops
            passes.append(GetPass(STUDY_ROOT_GET, narrowed, held_syntax_contexts(group)))
    log.info(
        "held_syntax_split", server=server.name, classes=len(ordered), associations=len(passes)
    )
    return passes


def get_as_held(
    server: ServerConfig,
    router: RouterSettings,
    query_model: str,
    identifier: Dataset,
    on_instance: Callable[[ReceivedInstance], int],
    spill_folder: Path | None = None,
    passes: list[GetPass] | None = None,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> MoveProgress:
    """C-GET every instance `identifier` names in the syntax the source holds it in (see the
    module); one MoveProgress summing the passes. PeerMoveError when none could be done."""
    passes = passes if passes is not None else get_passes(server, router, query_model, identifier)
    total = MoveProgress(0x0000)
    errors: list[PeerMoveError] = []
    comments: list[str] = []
    for get_pass in passes:
        if is_cancelled():
            break  # the caller's last answer already says so
        try:
            progress = get_instances(
                server,
                router,
                get_pass.query_model,
                get_pass.identifier,
                get_pass.storage,
                on_instance,
                spill_folder=spill_folder,
            )
        except PeerMoveError as exc:
            if len(passes) == 1:
                raise
            errors.append(exc)
            comments.append(f"{exc.kind}: {exc.reason}")
            continue
        total.completed += progress.completed
        total.failed += progress.failed
        total.warning += progress.warning
        total.failed_sop_uids += progress.failed_sop_uids
        if progress.comment:
            comments.append(progress.comment)
        if progress.status != 0x0000 and total.status == 0x0000:
            total.status = progress.status
    if errors and len(errors) == len(passes):
        raise errors[0]
    if errors:
        total.status = WARNING
    total.comment = "; ".join(comments)
    return total
