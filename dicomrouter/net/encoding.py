"""Decoding and encoding C-FIND answers for the wire without pydicom's per-element work.

An answer is mostly the elements a PACS sent, still raw (pydicom converts lazily). pydicom's
writer converts every one to a value and encodes it back: about half a millisecond per answer,
most of the router's CPU on a federated query. Raw elements already in the caller's encoding are
copied as they are (between implicit and explicit VR when the VR is unambiguous and the element
is no sequence); anything else goes through pydicom. Reading is the same story: pydicom's reader
handles every corner of PS3.5 through a file object, a federated query reads a thousand small
answers; `decode_answer` builds the same raw elements straight from the bytes and leaves the
corners (undefined lengths, a VR it does not know, a truncated element) to pydicom.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from io import BytesIO

from pydicom import Dataset
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag
from pydicom.valuerep import VR
from pydicom.values import convert_string
from pynetdicom.dsutils import decode, encode

UNDEFINED_LENGTH = 0xFFFFFFFF
LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
# Elements the router adds itself must not need a character set to be written.
CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT", "SQ"})
# Elements the router adds itself (Retrieve AE Title, ...) in VRs whose value is plain ASCII text.
ASCII_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
SPECIFIC_CHARACTER_SET = 0x00080005
_IMPLICIT_HEADER = struct.Struct("<HHI")
_EXPLICIT_HEADER = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<I")
# Explicit VRs as they appear on the wire -> (name, has a 4-byte length)
_WIRE_VRS = {vr.value.encode("ascii"): (vr.value, vr.value in LONG_LENGTH_VRS) for vr in VR}


class RawAnswer:
    """One C-FIND answer as a PACS sent it (little endian), read lazily.

    The plain case (top-level elements in tag order, defined lengths, known VRs) is indexed as it
    arrives: its keys are read from the bytes and it goes back on the wire spliced, never
    decoded. Anything else, and whoever wants a data set, gets pydicom's reading of it.
    """

    __slots__ = ("data", "implicit", "_spans", "_dataset")

    def __init__(self, data: bytes, implicit: bool):
        self.data = data
        self.implicit = implicit
        self._spans = _element_spans(data, implicit)
        self._dataset: Dataset | None = None

    @property
    def plain(self) -> bool:
        return self._spans is not None

    def text(self, tag: int) -> str:
        """An element's value as text without its padding ('' when absent), in the plain case."""
        if self._spans is None:
            return element_text(self.dataset(), tag)
        span = self._spans.get(tag)
        if span is None:
            return ""
        return self.data[span[2] : span[3]].decode("latin-1").strip(" \x00")

    def dataset(self) -> Dataset:
        """pydicom's reading of the answer (raw elements, decoded on access); made once."""
        if self._dataset is None:
            self._dataset = decode_answer(self.data, self.implicit)
        return self._dataset

    def encode(self, implicit: bool, strip: Iterable[int], added: Sequence[tuple[int, str, str]]) -> bytes | None:
        """The answer for a caller in little endian, `strip` tags removed and `added` (tag, VR,
        ASCII text) elements set; None when only pydicom can say (then encode `dataset()`)."""
        spans = self._spans
        if spans is None or implicit != self.implicit:
            return None
        data = self.data
        changes = {tag: b"" for tag in strip if tag in spans}
        for tag, vr, text in added:
            if not text.isascii():
                return None
            changes[tag] = _text_element(BaseTag(tag), vr, text, implicit)
        if not changes:
            return data
        parts: list[bytes] = []
        position = 0
        for tag in sorted(changes):
            span = spans.get(tag)
            if span is None:  # a new element: before the first one after it
                start = next((s[1] for t, s in spans.items() if t > tag), len(data))
                end = start
            else:
                start, end = span[1], span[3]
            parts.append(data[position:start])
            parts.append(changes[tag])
            position = end
        parts.append(data[position:])
        return b"".join(parts)


def element_text(dataset: Dataset, tag: int) -> str:
    """A key's value without pydicom's conversion (charset lookup, validation): it is hot."""
    elem = dataset.get_item(tag)
    value = None if elem is None else elem.value
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00")
    return "" if value is None else str(value).strip(" \x00")


# tag -> (VR or None, element start, value start, value end)
Spans = dict[int, tuple[str | None, int, int, int]]


def _element_spans(data: bytes, implicit: bool) -> Spans | None:
    """Where each top-level element lies, or None for anything but the plain case."""
    if len(data) >= 6 and (0x40 < data[4] < 0x5B and 0x40 < data[5] < 0x5B) == implicit:
        return None  # encoded otherwise than negotiated: pydicom guesses which
    spans: Spans = {}
    offset, end, previous = 0, len(data), -1
    while offset + 8 <= end:
        start = offset
        if implicit:
            group, element, length = _IMPLICIT_HEADER.unpack_from(data, offset)
            vr = None
            offset += 8
        else:
            group, element, wire_vr, length = _EXPLICIT_HEADER.unpack_from(data, offset)
            known = _WIRE_VRS.get(wire_vr)
            if known is None:
                return None
            vr, long_length = known
            offset += 8
            if long_length:
                if offset + 4 > end:
                    return None
                (length,) = _LONG_LENGTH.unpack_from(data, offset)
                offset += 4
        tag = group << 16 | element
        if length == UNDEFINED_LENGTH or tag <= previous or offset + length > end:
            return None  # undefined length, out of order (or an item delimiter), truncated
        spans[tag] = (vr, start, offset, offset + length)
        offset += length
        previous = tag
    return spans if offset == end else None


def decode_answer(data: bytes, implicit: bool) -> Dataset:
    """A little endian answer as pydicom would read it (raw elements, decoded on access)."""
    spans = _element_spans(data, implicit)
    if spans is None:
        return decode(BytesIO(data), implicit, True)
    elements = {}
    for tag, (vr, _, value_start, value_end) in spans.items():
        base_tag = BaseTag(tag)
        length = value_end - value_start
        value = data[value_start:value_end] if length else empty_value_for_VR(vr, raw=True)
        elements[base_tag] = RawDataElement(base_tag, vr, length, value, value_start, implicit, True)  # type: ignore[arg-type]
    dataset = Dataset(elements)
    charset = elements.get(BaseTag(SPECIFIC_CHARACTER_SET))
    encoding = convert_encodings(convert_string(charset.value or b"", True)) if charset else default_encoding
    dataset.set_original_encoding(implicit, True, encoding)
    return dataset


def _explicit_vr(elem: RawDataElement) -> str | None:
    """The VR to write an element in explicit VR: its own, or the dictionary's when unambiguous."""
    if elem.VR:
        return elem.VR
    try:
        vr = dictionary_VR(elem.tag)
    except KeyError:
        return None  # private or unknown: only pydicom knows what to do
    return vr if len(vr) == 2 else None  # "US or SS" and the like need the data set


def encode_answer(dataset: Dataset, implicit: bool) -> bytes | None:
    """`dataset` in little endian (implicit or explicit VR), None when it cannot be encoded."""
    parts: list[bytes] = []
    for tag, elem in sorted(dataset.items()):
        if isinstance(elem, RawDataElement):
            vr = None if implicit else _explicit_vr(elem)
            same_encoding = elem.is_implicit_VR == implicit
            if (
                not elem.is_little_endian
                or elem.length == UNDEFINED_LENGTH
                or (not same_encoding and (elem.VR == "SQ" or vr == "SQ"))  # items keep their encoding
                or (not implicit and vr is None)
            ):
                return encode(dataset, implicit, True)
            value = elem.value or b""
            if implicit:
                parts.append(struct.pack("<HHI", tag.group, tag.element, len(value)))
            elif vr in LONG_LENGTH_VRS:
                parts.append(struct.pack("<HH2sxxI", tag.group, tag.element, vr.encode(), len(value)))
            elif len(value) <= 0xFFFF:
                parts.append(struct.pack("<HH2sH", tag.group, tag.element, vr.encode(), len(value)))
            else:
                return encode(dataset, implicit, True)
            parts.append(value)
        elif elem.VR in CHARSET_VRS:
            return encode(dataset, implicit, True)
        elif elem.VR in ASCII_TEXT_VRS and isinstance(elem.value, str) and elem.value.isascii():
            parts.append(_text_element(tag, elem.VR, elem.value, implicit))
        else:
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, implicit
            write_data_element(fp, elem)
            parts.append(fp.getvalue())
    return b"".join(parts)


def _text_element(tag: BaseTag, vr: str, text: str, implicit: bool) -> bytes:
    """One ASCII text element as pydicom writes it (padded to even length: UI with NUL, others with a space)."""
    value = text.encode("ascii")
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    if implicit:
        return struct.pack("<HHI", tag.group, tag.element, len(value)) + value
    return struct.pack("<HH2sH", tag.group, tag.element, vr.encode(), len(value)) + value


IMPLICIT_VR_LE, EXPLICIT_VR_BE, DEFLATED_VR_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def decode_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    """A query or retrieve identifier received in one of the uncompressed syntaxes (or deflated)."""
    return decode(
        BytesIO(data), transfer_syntax == IMPLICIT_VR_LE, transfer_syntax != EXPLICIT_VR_BE,
        transfer_syntax == DEFLATED_VR_LE,
    )


def encode_dataset(dataset: Dataset, transfer_syntax: str) -> bytes | None:
    """`dataset` for the wire in `transfer_syntax` (raw answers copied where they can be), None if it cannot be."""
    implicit = transfer_syntax == IMPLICIT_VR_LE
    if transfer_syntax not in (EXPLICIT_VR_BE, DEFLATED_VR_LE):
        return encode_answer(dataset, implicit) or None
    return encode(dataset, implicit, transfer_syntax != EXPLICIT_VR_BE, transfer_syntax == DEFLATED_VR_LE) or None
