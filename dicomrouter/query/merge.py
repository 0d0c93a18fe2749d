"""What makes two C-FIND answers the same entity, and how copies from several PACS become one."""

from __future__ import annotations

from collections.abc import Sequence

from pydicom import Dataset
from pydicom.config import IGNORE
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement

from dicomrouter.net.encoding import RawAnswer, element_text
from dicomrouter.net.find_client import FIND_MODELS, PATIENT_ROOT_FIND, WORKLIST_FIND

# The keys that name one entity at each level (PS3.4 C.6; Patient ID is unique per issuer).
LEVEL_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientID", "IssuerOfPatientID"),
    "STUDY": ("StudyInstanceUID",),
    "SERIES": ("SeriesInstanceUID",),
    "IMAGE": ("SOPInstanceUID",),
}
# How many instances a copy holds, per level: copies of one entity on several PACS may differ.
COUNT_KEYWORDS: dict[str, str] = {
    "PATIENT": "NumberOfPatientRelatedInstances",
    "STUDY": "NumberOfStudyRelatedInstances",
    "SERIES": "NumberOfSeriesRelatedInstances",
}
# A worklist item has no UID of its own: it is one Scheduled Procedure Step (PS3.4 K.6.1), named by
# its step ID within the requested procedure these keys name. Steps of one procedure (PT and CT on
# one PET/CT) share all three, so they alone never make two items copies.
WORKLIST_KEYS = ("AccessionNumber", "RequestedProcedureID", "StudyInstanceUID")
STEP_SEQUENCE = "ScheduledProcedureStepSequence"
STEP_ID = "ScheduledProcedureStepID"
LEVELS_BY_MODEL = {
    "patient": ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    "study": ("STUDY", "SERIES", "IMAGE"),
}
# Text whose bytes depend on the Specific Character Set: only copied between same-charset answers.
_CHARSET_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})


class InvalidIdentifier(ValueError):
    """The C-FIND identifier cannot be decoded or does not fit the information model."""


def check_identifier(identifier: Dataset, query_model: str) -> str:
    """Decode every element (pydicom defers it) and return the query level ('WORKLIST' for MWL)."""
    try:
        _decode_all(identifier)
    except InvalidIdentifier:
        raise
    except Exception as exc:
        raise InvalidIdentifier(f"cannot decode the identifier: {exc}") from None
    model = FIND_MODELS.get(query_model)
    if model is None:
        raise InvalidIdentifier(f"{query_model} is not a supported C-FIND information model")
    if model == "worklist":
        return "WORKLIST"
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not level:
        raise InvalidIdentifier("QueryRetrieveLevel is missing")
    if level not in LEVELS_BY_MODEL[model]:
        allowed = ", ".join(LEVELS_BY_MODEL[model])
        raise InvalidIdentifier(f"QueryRetrieveLevel {level!r} is not one of {allowed}")
    return level


def _decode_all(dataset: Dataset) -> None:
    for elem in dataset:
        if elem.VR == "SQ":
            for item in elem.value:
                _decode_all(item)


def level_keys(level: str) -> tuple[str, ...]:
    return WORKLIST_KEYS if level == "WORKLIST" else LEVEL_KEYS[level]


def prepare_query(identifier: Dataset, level: str) -> tuple[Dataset, frozenset[str]]:
    """The identifier for the peers: the caller's, plus the level's keys as return keys.

    Returns the keywords added, to strip from answers unless the caller asked for them
    (the level's unique key itself stays: an SCP returns it anyway); a key added inside the
    worklist step item is written `ScheduledProcedureStepSequence.ScheduledProcedureStepID`.
    """
    query = Dataset()
    query.update(identifier)
    added = set()
    for keyword in level_keys(level):
        if keyword not in query:
            setattr(query, keyword, "")
            added.add(keyword)
    if level in LEVEL_KEYS:
        added.discard(LEVEL_KEYS[level][0])
    if level == "WORKLIST" and _ask_for_step_id(query):
        added.add(f"{STEP_SEQUENCE}.{STEP_ID}")
    return query, frozenset(added)


def _ask_for_step_id(query: Dataset) -> bool:
    """Add the step ID as a return key in the caller's step item; True if it was added.

    Only inside a step sequence the caller sent: a sequence key of our own would be a matching
    key the caller did not give (items without steps could stop matching on some servers).
    """
    steps = query.get(STEP_SEQUENCE)
    if not steps or STEP_ID in steps[0]:
        return False
    item = Dataset()
    item.update(steps[0])  # the caller's identifier stays as it was
    setattr(item, STEP_ID, "")
    # A new element: `query` shares the caller's elements, assigning the value would change theirs.
    query.add_new(STEP_SEQUENCE, "SQ", [item, *list(steps)[1:]])
    return True


def answer_key(level: str, answer: Dataset) -> tuple[object, ...] | None:
    """The entity an answer is about, or None when it lacks its unique key (never merged)."""
    if level == "WORKLIST":
        return worklist_item_key(answer)
    values = tuple(_raw_text(answer, tag) for tag in _KEY_TAGS[level])
    return values if values[0] else None


def worklist_item_key(item: Dataset) -> tuple[object, ...]:
    """The scheduled step a worklist item is: its step ID within its requested procedure, or,
    without a step ID (or a procedure to put it in), every attribute the server returned."""
    procedure = tuple(_raw_text(item, tag) for tag in _KEY_TAGS["WORKLIST"])
    steps = item.get(STEP_SEQUENCE) or ()
    step_ids = tuple(_text(step.get(STEP_ID)) for step in steps)
    if any(procedure) and step_ids and all(step_ids):
        return ("step", procedure, step_ids)
    return ("item", _content(item))


def _content(dataset: Dataset) -> tuple[tuple[int, object], ...]:
    """Every non-empty attribute as comparable values (decoded text, so any character set)."""
    values = []
    for elem in dataset:
        if elem.tag == SPECIFIC_CHARACTER_SET or elem.tag.element == 0 or elem.is_empty:
            continue
        if elem.VR == "SQ":
            value: object = tuple(_content(item) for item in elem.value)
        elif isinstance(elem.value, bytes):
            value = elem.value.rstrip(b" \x00")
        elif elem.VM > 1:
            value = tuple(_text(part) for part in elem.value)
        else:
            value = _text(elem.value)
        values.append((int(elem.tag), value))
    return tuple(values)


def distinct_within_server(level: str) -> bool:
    """True when two answers of one server are never copies of each other, whatever their keys.

    A worklist server lists each scheduled step once: two items it returns alike are two steps
    (described by the keys the caller asked for), not one step twice. Q/R answers name their
    entity by UID, so one server's second answer with the same UID is a copy.
    """
    return level == "WORKLIST"


_raw_text = element_text


_KEY_TAGS = {
    level: tuple(tag_for_keyword(keyword) for keyword in level_keys(level))
    for level in (*LEVEL_KEYS, "WORKLIST")
}
RETRIEVE_AE_TITLE = 0x00080054
SPECIFIC_CHARACTER_SET = 0x00080005


_COUNT_TAGS = {level: tag_for_keyword(keyword) for level, keyword in COUNT_KEYWORDS.items()}


def instance_count(level: str, answer: Dataset | RawAnswer) -> int | None:
    """The answer's count of instances at its level (NumberOfStudyRelatedInstances, ...), if given."""
    tag = _COUNT_TAGS.get(level)
    if tag is None:
        return None
    try:
        return int(answer.text(tag) if isinstance(answer, RawAnswer) else _raw_text(answer, tag))
    except ValueError:  # absent or not a number
        return None


def raw_answer_key(level: str, answer: RawAnswer) -> tuple[object, ...] | None:
    """`answer_key` of an answer still in its bytes (read from them at the levels with UIDs)."""
    if level == "WORKLIST" or not answer.plain:
        return answer_key(level, answer.dataset())
    values = tuple(answer.text(tag) for tag in _KEY_TAGS[level])
    return values if values[0] else None


def keyword_tags(keywords: frozenset[str]) -> tuple[int, ...] | None:
    """The tags of top-level keywords; None when one is not (a `Sequence.Keyword` path)."""
    tags = tuple(tag_for_keyword(keyword) for keyword in keywords)
    return None if any(tag is None for tag in tags) else tags  # type: ignore[return-value]


def most_complete_first(counts: Sequence[int | None]) -> list[int]:
    """Indexes of copies in merge order: the copy holding the most instances first, then as given."""
    return sorted(range(len(counts)), key=lambda index: -(counts[index] or 0))


def _text(value: object) -> str:
    return "" if value is None else str(value).strip(" \x00")


def _is_empty(elem: DataElement | RawDataElement) -> bool:
    if isinstance(elem, RawDataElement):
        return not elem.length or not elem.value or not bytes(elem.value).strip(b" \x00")
    return elem.is_empty


def merge_copies(
    copies: Sequence[Dataset], strip: frozenset[str] = frozenset(), retrieve_ae: str | None = None
) -> Dataset:
    """One answer from copies in preference order: the first wins, gaps are filled from the rest.

    A single copy is changed in place (it is the caller's own answer); several give a new one.

    Counts (NumberOfStudyRelatedInstances, ...) are the preferred copy's, never sums: copies
    of one study are the same study, not more of it. The federation puts the most complete
    copy first (most_complete_first), so the answer describes it.
    """
    preferred = copies[0]
    if len(copies) == 1:
        merged = preferred  # the common case, and hot: the answer is ours to change
    else:
        merged = Dataset()
        merged.update(preferred)
    charset = _raw_text(preferred, SPECIFIC_CHARACTER_SET) or "ISO_IR 6"
    for other in copies[1:]:
        same_charset = (_raw_text(other, SPECIFIC_CHARACTER_SET) or "ISO_IR 6") == charset
        for tag in other.keys():
            if tag in merged and not _is_empty(merged.get_item(tag)):
                continue
            if _is_empty(other.get_item(tag)):
                continue
            elem = other[tag]
            if elem.VR in _CHARSET_VRS and not same_charset:
                continue
            merged.add(elem)
    for keyword in strip:
        _strip_key(merged, keyword)
    if retrieve_ae:
        merged[RETRIEVE_AE_TITLE] = DataElement(
            RETRIEVE_AE_TITLE, "AE", retrieve_ae, validation_mode=IGNORE
        )
    return merged


def _strip_key(answer: Dataset, path: str) -> None:
    """Remove `Keyword`, or `Sequence.Keyword` from each of the sequence's items."""
    sequence, _, keyword = path.rpartition(".")
    datasets = (answer.get(sequence) or ()) if sequence else (answer,)
    for dataset in datasets:
        if keyword in dataset:
            delattr(dataset, keyword)


def is_patient_root(query_model: str) -> bool:
    return query_model == PATIENT_ROOT_FIND


def is_worklist(query_model: str) -> bool:
    return query_model == WORKLIST_FIND
