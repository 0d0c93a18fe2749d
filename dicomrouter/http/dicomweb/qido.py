"""QIDO-RS query parameters (PS3.18 8.3.4) -> a Study Root C-FIND identifier for the federation."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.sequence import Sequence

# QIDO resource -> C-FIND level
LEVELS = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}

# The attributes every answer carries (PS3.18 Tables 10.6.3-3 to -5), beyond the unique keys.
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "STUDY": (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "StudyInstanceUID",
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
    ),
    "IMAGE": (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    ),
}
# Study attributes a series or instance search may return too (relational queries, PS3.18 8.3.4.1).
STUDY_FIELDS_BELOW = (
    "PatientName",
    "PatientID",
    "StudyDate",
    "AccessionNumber",
    "StudyDescription",
)
# Series attributes a study search names, asked as their study counterpart: a Study Root C-FIND
# at the STUDY level has no Modality (a PACS answers it empty), its ModalitiesInStudy lists them.
STUDY_LEVEL_NAMES = {0x00080060: "ModalitiesInStudy"}
UID_VRS = ("UI",)
_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
CONTROL_PARAMETERS = ("limit", "offset", "fuzzymatching", "includefield")


class QidoError(ValueError):
    """A query parameter the router cannot turn into a C-FIND (HTTP 400)."""


@dataclass(frozen=True)
class QidoQuery:
    level: str  # STUDY | SERIES | IMAGE
    identifier: Dataset
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    include_all: bool = False
    matching: tuple[str, ...] = field(
        default_factory=tuple
    )  # keywords given a value, for the audit


def parse_tag(name: str) -> int:
    """A QIDO attribute ID: a keyword or eight hex digits."""
    name = name.strip()
    if _HEX_TAG.match(name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    if tag is None:
        raise QidoError(f"{name!r} is neither a DICOM keyword nor a tag (ggggeeee)")
    return tag


def _vr(tag: int, name: str) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        raise QidoError(f"{name!r}: the tag is not in the DICOM dictionary") from None
    return vr.split(" or ")[0]


def _set(identifier: Dataset, path: str, value: str | None) -> str:
    """Set `path` (`Keyword`, `ggggeeee` or `Seq.Keyword`) in `identifier`; its leaf keyword."""
    parts = path.split(".")
    dataset = identifier
    for depth, part in enumerate(parts):
        tag = parse_tag(part)
        vr = _vr(tag, part)
        if depth == len(parts) - 1:
            if vr == "SQ":
                if tag not in dataset:
                    dataset.add_new(tag, vr, Sequence())
            else:
                dataset.add_new(tag, vr, _matching_value(vr, value))
            return keyword_for_tag(tag) or f"{tag:08X}"
        if vr != "SQ":
            raise QidoError(f"{path!r}: {part} is not a sequence")
        if tag not in dataset or not dataset[tag].value:
            dataset.add_new(tag, vr, Sequence([Dataset()]))
        dataset = dataset[tag].value[0]
    return path


def _matching_value(vr: str, value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if vr in UID_VRS:
        # UID list matching: QIDO separates UIDs with commas or backslashes, C-FIND with backslashes.
        return "\\".join(v.strip() for v in re.split(r"[,\\]", value) if v.strip())
    return value


def _int_parameter(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise QidoError(f"{name} must be a whole number, not {value!r}") from None
    if number < 0:
        raise QidoError(f"{name} must not be negative")
    return number


def parse_qido(
    resource: str,
    parameters: Iterable[tuple[str, str]],
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> QidoQuery:
    """The C-FIND for `GET [/studies/{study}[/series/{series}]]/{resource}?parameters`."""
    level = LEVELS.get(resource)
    if level is None:
        raise QidoError(f"{resource!r} is not a QIDO-RS resource")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword in DEFAULT_FIELDS[level]:
        _set(identifier, keyword, None)
    limit, offset, fuzzy, include_all = None, 0, False, False
    matching: list[str] = []
    for name, value in parameters:
        if name == "limit":
            limit = _int_parameter(name, value)
        elif name == "offset":
            offset = _int_parameter(name, value)
        elif name == "fuzzymatching":
            fuzzy = value.strip().lower() == "true"
        elif name == "includefield":
            for item in value.split(","):
                item = _at_level(level, item.strip())
                if item == "all":
                    include_all = True
                elif item and _path_tag(item) not in identifier:
                    _set(identifier, item, None)
        elif name.startswith("_"):
            continue  # vendor parameters some viewers add (e.g. "_" cache busters)
        else:
            matching.append(_set(identifier, _at_level(level, name), value))
    if include_all:
        for keyword in (*STUDY_FIELDS_BELOW, *DEFAULT_FIELDS["STUDY"]) if level != "STUDY" else ():
            if tag_for_keyword(keyword) not in identifier:
                _set(identifier, keyword, None)
    if study_uid is not None:
        identifier.StudyInstanceUID = study_uid
    if series_uid is not None:
        identifier.SeriesInstanceUID = series_uid
    if any(ord(ch) > 127 for elem in identifier for ch in str(elem.value or "")):
        identifier.SpecificCharacterSet = "ISO_IR 192"  # non-ASCII matching values go as UTF-8
    return QidoQuery(level, identifier, limit, offset, fuzzy, include_all, tuple(matching))


def _at_level(level: str, name: str) -> str:
    """`name`, or the study attribute that stands for it in a study search (Modality)."""
    if level == "STUDY" and name and name != "all" and "." not in name:
        return STUDY_LEVEL_NAMES.get(parse_tag(name), name)
    return name


def _path_tag(path: str) -> int:
    return parse_tag(path.strip().split(".")[0])
