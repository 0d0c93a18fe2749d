"""Encoding C-FIND answers for the wire without pydicom's per-element conversion.

An answer is mostly the elements a PACS sent, still raw (pydicom converts lazily). pydicom's
writer converts every one to a value and encodes it back: about half a millisecond per answer,
most of the router's CPU on a federated query. Raw elements already in the caller's encoding are
copied as they are (between implicit and explicit VR when the VR is unambiguous and the element
is no sequence); anything else goes through pydicom.
"""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pynetdicom.dsutils import decode, encode

UNDEFINED_LENGTH = 0xFFFFFFFF
LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
# Elements the router adds itself must not need a character set to be written.
CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT", "SQ"})


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
        else:
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, implicit
            write_data_element(fp, elem)
            parts.append(fp.getvalue())
    return b"".join(parts)


IMPLICIT_VR_LE, EXPLICIT_VR_BE, DEFLATED_VR_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"


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
