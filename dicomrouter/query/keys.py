"""C-FIND identifiers from findscu-style `-k` keys: `PatientName=SMITH*`, `0010,0020=`, `Seq[0].Key=V`."""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)?$")
_PART = re.compile(r"^(?P<name>[^\[\]]+)(?:\[(?P<index>\d+)\])?$")

# Return keys asked for when the user gives none for a level (what a workstation list shows).
DEFAULT_RETURN_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex"),
    "STUDY": (
        "PatientName",
        "PatientID",
        "StudyDate",
        "ModalitiesInStudy",
        "StudyDescription",
        "AccessionNumber",
        "NumberOfStudyRelatedInstances",
        "StudyInstanceUID",
    ),
    "SERIES": (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
    ),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
    "WORKLIST": (
        "PatientName",
        "PatientID",
        "AccessionNumber",
        "RequestedProcedureID",
        "StudyInstanceUID",
        "ScheduledProcedureStepSequence[0].Modality",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
    ),
}


class BadKey(ValueError):
    """A `-k` key that names no DICOM attribute or cannot be set."""


def _tag(name: str) -> BaseTag:
    match = _TAG.match(name.strip())
    if match:
        return Tag(int(match.group(1), 16), int(match.group(2), 16))
    tag = tag_for_keyword(name.strip())
    if tag is None:
        raise BadKey(f"{name!r} is neither a DICOM keyword nor gggg,eeee")
    return Tag(tag)


def set_key(identifier: Dataset, spec: str) -> None:
    """Apply one findscu-style key to `identifier` (no value or `KEY=` asks for it back)."""
    path, _, value = spec.partition("=")
    parts = path.split(".")
    dataset = identifier
    for depth, part in enumerate(parts):
        match = _PART.match(part.strip())
        if not match:
            raise BadKey(f"{spec!r}: cannot read {part!r}")
        tag = _tag(match.group("name"))
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise BadKey(f"{spec!r}: {tag} is not in the DICOM dictionary") from None
        last = depth == len(parts) - 1
        if last:
            if vr == "SQ":
                if tag not in dataset:
                    dataset.add_new(tag, vr, Sequence())
                continue
            dataset.add_new(tag, vr, value if value != "" else None)
            continue
        if vr != "SQ":
            raise BadKey(f"{spec!r}: {keyword_for_tag(tag) or tag} is not a sequence")
        index = int(match.group("index") or 0)
        if tag not in dataset:
            dataset.add_new(tag, vr, Sequence())
        items = dataset[tag].value
        while len(items) <= index:
            items.append(Dataset())
        dataset = items[index]


def build_identifier(level: str, keys: Iterable[str], defaults: bool = True) -> Dataset:
    """The identifier for `level` (QueryRetrieveLevel unless WORKLIST) from `-k` keys."""
    identifier = Dataset()
    if level != "WORKLIST":
        identifier.QueryRetrieveLevel = level
    if defaults:
        for spec in DEFAULT_RETURN_KEYS[level]:
            set_key(identifier, spec)
    for spec in keys:
        set_key(identifier, spec)
    if any(ord(ch) > 127 for elem in identifier for ch in str(elem.value or "")):
        identifier.SpecificCharacterSet = "ISO_IR 192"  # non-ASCII matching values go as UTF-8
    return identifier
