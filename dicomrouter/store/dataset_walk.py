"""One pass over a received instance's bytes: is it whole, would every value read back, and the
elements we route by.

pydicom's path (dcmread, then converting every value) costs about a millisecond per instance, a
quarter of the router's CPU per C-STORE. This walk reads element headers and the few values that
can fail to convert, in place, and builds no object per element. It vouches for an instance only
when it is sure pydicom reads it the same way and converts every value without error: well-formed
Implicit or Explicit VR Little Endian (the encapsulated syntaxes included). Anything else, malformed
or merely unusual (big endian, deflate, tags out of order, an explicit VR data set that switches to
implicit, trailing bytes, a private VR pydicom cannot convert, ...), gives None, and the caller takes
pydicom's path, which accepts or refuses exactly as before. So the walk never refuses; it only
decides when pydicom need not be asked.

What converting every value refuses beyond structure (pydicom 3, default settings), and so what the
walk checks: a numeric VR whose length is not a multiple of its size; an IS that overflows a float;
a VR pydicom has no converter for (private dictionary entries included); ambiguous VRs of implicit
data sets it cannot resolve (US or SS beside pixel data without Pixel Representation, LUT Data
without a multi-valued LUT Descriptor); a Specific Character Set it cannot look up. Text never
fails: pydicom decodes with replacement characters and only warns.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from struct import Struct
from typing import Any

from pydicom import config as pydicom_config
from pydicom import hooks as pydicom_hooks
from pydicom.charset import convert_encodings, default_encoding, python_encoding
from pydicom.datadict import DicomDictionary, private_dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import AMBIGUOUS_VR, EXPLICIT_VR_LENGTH_32
from pydicom.values import converters

from dicomrouter.dicom_file import MAX_FILE_META_BYTES, META_HEAD_BYTES, dataset_offset
from dicomrouter.store.plain_values import NotPlain, plain_from_bytes, plain_value

try:  # pydicom 3.0's reading rules, private to it: a release without them turns the walk off, not the router
    from pydicom.datadict import _dictionary_vr_fast
    from pydicom.filewriter import _AMBIGUOUS_US_SS_TAGS
except ImportError:  # pragma: no cover - depends on the installed pydicom
    _dictionary_vr_fast = _AMBIGUOUS_US_SS_TAGS = None

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
TRANSFER_SYNTAX_TAG = 0x00020010
CHARSET_TAG = 0x00080005
PIXEL_REPRESENTATION_TAG = 0x00280103
LUT_DESCRIPTOR_TAG = 0x00283002
LUT_DATA_TAG = 0x00283006
# pydicom makes the first value of these unsigned after converting them (its raw_element_value hook)
LUT_DESCRIPTOR_TAGS = frozenset({0x00281101, 0x00281102, 0x00281103, LUT_DESCRIPTOR_TAG})
PIXEL_DATA_TAG = 0x7FE00010
# Sequences nested deeper go to pydicom (which refuses thousands with a RecursionError).
MAX_DEPTH = 64
MAX_IS_BYTES = 256  # an IS this long could overflow a float: pydicom's path decides
FILE_WINDOW_BYTES = 64 * 1024

IMPLICIT_SYNTAX = str(ImplicitVRLittleEndian)
# Every syntax pydicom reads as Explicit VR Little Endian outside encapsulated pixel data.
EXPLICIT_SYNTAXES = frozenset(str(uid) for uid in AllTransferSyntaxes) - {
    IMPLICIT_SYNTAX,
    str(ExplicitVRBigEndian),
    str(DeflatedExplicitVRLittleEndian),
}

# Every VR pydicom converts, "US or SS" included.
_CONVERTIBLE = frozenset(str(vr.value) for vr in converters)
_AMBIGUOUS = frozenset(str(vr.value) for vr in AMBIGUOUS_VR)
_LONG_LENGTH_VRS = frozenset(str(vr.value) for vr in EXPLICIT_VR_LENGTH_32)
# explicit VR bytes -> (VR, whether its length takes 4 bytes)
_EXPLICIT_VRS = {
    vr.encode("ascii"): (vr, vr in _LONG_LENGTH_VRS) for vr in _CONVERTIBLE if len(vr) == 2
}
_NUMERIC_SIZES = {"FD": 8, "FL": 4, "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8}
_CHECKED_VRS = frozenset({*_NUMERIC_SIZES, "IS", "SQ", "UN", *_AMBIGUOUS})
_ENCAPSULATED_VRS = frozenset({"OB", "OW", "OB or OW"})
# int() or float() of these gives a number or a ValueError (pydicom then keeps the text): never an error.
_IS_CHARACTERS = re.compile(rb"[0-9+\-. \\\x00]*")
# ASCII without a backslash: a private creator every character set decodes alike.
_CREATOR_CHARACTERS = re.compile(rb"[\x20-\x5b\x5d-\x7e\x00]*")

_TAG_LENGTH = Struct("<HHI")
_EXPLICIT_HEAD = Struct("<HH2sH")
_U32 = Struct("<I")
_ITEM_BYTES = b"\xfe\xff\x00\xe0"


class Unsure(Exception):
    """The walk cannot vouch for this instance: pydicom's path decides."""


# A wanted top-level element as the walk found it: (its VR as read, None in an implicit VR data set;
# where its value starts in the instance; the value; the VR pydicom converts it with). A tuple, not
# a RawDataElement: most values are read without pydicom, and building one costs as much as reading it.
Found = tuple[str | None, int, bytes, str]


@dataclass(frozen=True)
class Walked:
    """A data set the walk vouches for: its transfer syntax and the wanted top-level elements."""

    transfer_syntax: str
    implicit: bool  # Implicit VR Little Endian
    found: dict[int, Found]  # wanted tag -> the element
    encoding: str | list[str]  # of the data set's text values, from its Specific Character Set

    def raw(self, tag: int) -> RawDataElement | None:
        """A wanted element as pydicom's reader leaves it (None when absent)."""
        found = self.found.get(tag)
        if found is None:
            return None
        vr, offset, value, _ = found
        return RawDataElement(BaseTag(tag), vr, len(value), value, offset, self.implicit, True)

    def get(self, keyword: str) -> Any:
        """The value of a wanted element as pydicom's Dataset.get(keyword) gives it (None when absent).

        The element is converted as Dataset.__getitem__ converts it; the walk collected no sequence
        and no element of ambiguous VR, the two cases where that needs more than the element itself.
        """
        tag = tag_for_keyword(keyword)
        raw = self.raw(tag) if tag is not None else None
        if raw is None:
            return None
        encoding = default_encoding if tag == CHARSET_TAG else self.encoding
        # convert_raw_data_element's two steps, without the DataElement it would wrap the value in
        converted: dict[str, Any] = {}
        pydicom_hooks.hooks.raw_element_vr(raw, converted, encoding=encoding, ds=None)
        pydicom_hooks.hooks.raw_element_value(raw, converted, encoding=encoding, ds=None)
        return converted["value"]

    @cached_property
    def ascii_charset(self) -> bool:
        """pydicom reads this data set's ASCII text (no escape sequence) as ASCII (ASCII_ENCODINGS)."""
        encoding = self.encoding
        return (encoding if isinstance(encoding, str) else encoding[0]) in ASCII_ENCODINGS

    def plain(self, keyword: str) -> str | list[str] | None:
        """plain_value(self.get(keyword)), read from the bytes where plain_values knows how."""
        tag = tag_for_keyword(keyword)
        found = self.found.get(tag) if tag is not None else None
        if found is None:
            return None
        if tag not in LUT_DESCRIPTOR_TAGS:
            _, _, value, converted_vr = found
            try:
                return plain_from_bytes(
                    converted_vr, value, tag == CHARSET_TAG or self.ascii_charset
                )
            except NotPlain:
                pass
        return plain_value(self.get(keyword))


# Python encodings (as pydicom.charset.python_encoding names them) that decode ASCII bytes as ASCII
# and encode ASCII text (a PersonName's round trip) back to the same bytes. pydicom decodes a value
# without an escape sequence with the data set's first encoding only (charset.decode_bytes), so one
# of these first makes ASCII text read as ASCII, whatever code extensions follow it ("ISO 2022 IR
# 100\ISO 2022 IR 87" too). Left out, though Python's codecs would do: the stateful ISO 2022 ones
# (iso2022_jp*, which warn encoding a PersonName), shift_jis, euc_kr and GB2312, rare as a first value.
ASCII_ENCODINGS = frozenset(
    {
        default_encoding,  # no Specific Character Set, an empty first value, ISO_IR 6, ISO 2022 IR 6
        "latin_1",  # ISO_IR 100
        "iso8859_2",  # ISO_IR 101
        "iso8859_3",  # ISO_IR 109
        "iso8859_4",  # ISO_IR 110
        "iso_ir_126",  # Greek
        "iso_ir_127",  # Arabic
        "iso_ir_138",  # Hebrew
        "iso_ir_144",  # Cyrillic
        "iso_ir_148",  # Latin-5
        "iso_ir_166",  # Thai
        "UTF8",  # ISO_IR 192
        "GB18030",
        "GBK",
    }
)


def wanted_tags(keywords: Iterable[str]) -> frozenset[int] | None:
    """The tags of `keywords`; None when one is not a DICOM keyword (pydicom's path answers for it)."""
    tags = set()
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None:
            return None
        tags.add(tag)
    return frozenset(tags)


def pydicom_defaults() -> bool:
    """The walk mirrors pydicom's reading under its default settings and hooks only."""
    config = pydicom_config
    hooks = pydicom_hooks.hooks
    return (
        _dictionary_vr_fast is not None
        and config.settings.reading_validation_mode == config.WARN
        and config.replace_un_with_known_vr
        and config.settings.infer_sq_for_un_vr
        and config.assume_implicit_vr_switch
        and not config.convert_wrong_length_to_UN
        and not config.datetime_conversion
        and not config.use_IS_numpy
        and not config.use_DS_numpy
        and config.data_element_callback is None
        and hooks.raw_element_vr is pydicom_hooks.raw_element_vr
        and hooks.raw_element_value is pydicom_hooks.raw_element_value
        and not hooks.raw_element_kwargs
    )


def walk_instance(encoded: bytes, wanted: frozenset[int] | None) -> Walked | None:
    """Walk a Part 10 instance held in memory; None when pydicom's path must decide."""
    if wanted is None or not isinstance(encoded, bytes) or not pydicom_defaults():
        return None
    try:
        return _Walk(_Memory(encoded), wanted, defer_bytes=None).run()
    except Exception:  # Unsure, or a case the walk did not foresee: never a refusal of its own
        return None


def walk_instance_file(
    path: Path, file_size: int, wanted: frozenset[int] | None, defer_bytes: int
) -> Walked | None:
    """Walk a Part 10 file with bounded reads; top-level values over `defer_bytes` are skipped unread
    (as pydicom's defer_size leaves them), but must end within the file. None: pydicom decides."""
    if wanted is None or not pydicom_defaults():
        return None
    with open(path, "rb") as fp:
        source = _File(fp.fileno())
        if source.size != file_size:
            return None
        try:
            return _Walk(source, wanted, defer_bytes).run()
        except Exception:  # as walk_instance
            return None


class _Memory:
    """The whole instance in one bytes object."""

    def __init__(self, data: bytes):
        self.buf = data
        self.size = len(data)

    def at(self, pos: int, count: int, window: int = 0) -> int:
        """Where bytes [pos, pos + count) are in self.buf (the caller checked they exist)."""
        return pos

    def head(self, count: int) -> bytes:
        """At least the first `count` bytes (all of them here: no copy)."""
        return self.buf


class _File:
    """A file read a window at a time: element headers and small values, never large values."""

    def __init__(self, fd: int):
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.buf = b""
        self.base = 0

    def at(self, pos: int, count: int, window: int = FILE_WINDOW_BYTES) -> int:
        """Where bytes [pos, pos + count) are in self.buf, read with `window` bytes after them if not."""
        offset = pos - self.base
        if offset < 0 or offset + count > len(self.buf):
            self.buf = os.pread(self.fd, max(count, window), pos)
            self.base = pos
            offset = 0
            if len(self.buf) < count:
                raise Unsure  # the file shrank under us
        return offset

    def head(self, count: int) -> bytes:
        """The first `count` bytes (fewer in a shorter file)."""
        return os.pread(self.fd, count, 0)


def _charset_terms(value: bytes) -> list[str]:
    """A Specific Character Set's terms as pydicom's read_dataset hands them to convert_encodings: the
    value converted as CS (ISO 8859-1 text, padding off the end, split at backslashes), one term or
    several alike to it."""
    return value.decode("latin-1").rstrip(" \0").split("\\")


def _uppercase_pair(buf: bytes, offset: int) -> bool:
    """Bytes pydicom takes for an explicit VR (two capital letters)."""
    return 0x40 < buf[offset] < 0x5B and 0x40 < buf[offset + 1] < 0x5B


class _Walk:
    """One walk over one instance: the file meta, then every data set, item and fragment."""

    def __init__(self, source: _Memory | _File, wanted: frozenset[int], defer_bytes: int | None):
        self.source = source
        self.size = source.size
        self.wanted = wanted
        self.defer_bytes = defer_bytes
        self.found: dict[int, Found] = {}  # wanted top-level tag -> the element
        self.private_vrs: dict[tuple[str, int], str] = {}

    def bytes_at(self, pos: int, count: int) -> bytes:
        offset = self.source.at(pos, count)
        return bytes(self.source.buf[offset : offset + count])

    def run(self) -> Walked:
        head = self.source.head(META_HEAD_BYTES + MAX_FILE_META_BYTES + 2)
        try:
            start = dataset_offset(head)
        except ValueError:
            raise Unsure from None
        if start > len(head):
            raise Unsure  # the file ends inside its meta
        syntax = self.transfer_syntax(head, start)
        if syntax == IMPLICIT_SYNTAX:
            implicit = True
        elif syntax in EXPLICIT_SYNTAXES:
            implicit = False
        else:
            raise Unsure
        if start < self.size:
            first = head[start : start + 6]
            if len(first) < 2 or first[:2] in (b"\x02\x00", b"\x00\x02", b"\x00\x00"):
                raise Unsure  # file meta in the data set, or a command set: pydicom reads those apart
            if implicit and len(first) == 6 and _uppercase_pair(first, 4):
                raise Unsure  # pydicom would read this "implicit" data set as explicit
        self.dataset(start, self.size, True, implicit, 0, top=True)
        return self.walked(syntax, implicit)

    def transfer_syntax(self, head: bytes, end: int) -> str:
        """The file meta's elements, walked as pydicom reads them, must end where its group length says."""
        pos = META_HEAD_BYTES
        previous = 0x00020000
        syntax = None
        while pos < end:
            if pos + 8 > end:
                raise Unsure
            group, element, vr_bytes, length = _EXPLICIT_HEAD.unpack_from(head, pos)
            tag = group << 16 | element
            entry = _EXPLICIT_VRS.get(vr_bytes)
            if group != 2 or tag <= previous or entry is None:
                raise Unsure
            previous = tag
            value = pos + 8
            if entry[1]:
                if pos + 12 > end:
                    raise Unsure
                (length,) = _U32.unpack_from(head, pos + 8)
                value += 4
            if value + length > end:
                raise Unsure
            if tag == TRANSFER_SYNTAX_TAG:
                if entry[0] != "UI":
                    raise Unsure
                syntax = head[value : value + length].decode("latin-1").rstrip("\0 ")
            pos = value + length
        if pos != end or syntax is None:
            raise Unsure
        return syntax

    def dataset(
        self, pos: int, limit: int, defined: bool, implicit: bool, depth: int, top: bool = False
    ) -> int:
        """Walk one data set (the top level or an item) from `pos`; where it ends.

        defined: it ends exactly at `limit`; otherwise at its item delimiter, before `limit`.
        """
        source = self.source
        wanted = self.wanted if top else ()
        previous = -1
        creators: dict[int, tuple[str | None, int, int]] | None = None
        us_or_ss = has_pixel_representation = has_pixel_data = False
        lut_descriptor_length = -1
        while not (defined and pos == limit):
            if pos + 8 > limit:
                raise Unsure  # cut short, or an undefined-length item without its delimiter
            offset = source.at(pos, 12 if pos + 12 <= limit else 8)
            buf = source.buf
            group, element, length = _TAG_LENGTH.unpack_from(buf, offset)
            tag = group << 16 | element
            if tag == ITEM_END and not defined:
                if length:
                    raise Unsure
                pos += 8
                break
            if tag <= previous or group == 0xFFFE:
                raise Unsure
            previous = tag
            if implicit:
                vr = None
                value = pos + 8
            else:
                entry = _EXPLICIT_VRS.get(buf[offset + 4 : offset + 6])
                if entry is None:
                    raise Unsure
                vr = entry[0]
                if entry[1]:
                    if pos + 12 > limit:
                        raise Unsure
                    (length,) = _U32.unpack_from(buf, offset + 8)
                    value = pos + 12
                else:
                    length >>= 16
                    value = pos + 8
            if tag == PIXEL_DATA_TAG:
                has_pixel_data = True
            if length == UNDEFINED_LENGTH:
                if tag in wanted:
                    raise Unsure
                pos = self.undefined_length(tag, vr, value, limit, implicit, depth)
                continue
            pos = value + length
            if pos > limit:
                raise Unsure
            if (
                top
                and self.defer_bytes is not None
                and length > self.defer_bytes
                and tag != CHARSET_TAG
            ):
                if tag in wanted:
                    raise Unsure
                continue  # pydicom leaves it in the file and never converts it
            # The VR pydicom converts the value with.
            if vr is None:
                entry = DicomDictionary.get(tag)
                if entry is not None:
                    converted = entry[0]
                elif group & 1:
                    converted = self.private_vr(tag, group, element, creators)
                else:
                    try:
                        converted = _dictionary_vr_fast(tag)  # repeating groups
                    except KeyError:
                        converted = "UL" if element == 0 else "UN"
            elif vr == "UN":
                if group & 1:
                    converted = self.private_vr(tag, group, element, creators)
                else:
                    converted = "UN"
                    if length < 0xFFFF:
                        try:
                            converted = _dictionary_vr_fast(tag)
                        except KeyError:
                            pass
                    if converted in _AMBIGUOUS:
                        raise Unsure  # resolved from other elements of an explicit data set
            else:
                converted = vr
            if converted in _CHECKED_VRS:
                size = _NUMERIC_SIZES.get(converted)
                if size is not None:
                    if length % size:
                        raise Unsure
                elif converted == "SQ":
                    if tag in wanted:
                        raise Unsure
                    if length:
                        self.sequence(value, pos, True, implicit, depth + 1)
                elif converted == "IS":
                    if length > MAX_IS_BYTES or not _IS_CHARACTERS.fullmatch(
                        self.bytes_at(value, length)
                    ):
                        raise Unsure
                elif converted in _AMBIGUOUS:
                    if tag in wanted:
                        raise Unsure
                    if tag in _AMBIGUOUS_US_SS_TAGS:
                        us_or_ss = True
                        if length % 2:
                            raise Unsure
                    elif tag == LUT_DATA_TAG and (
                        lut_descriptor_length < 4 or lut_descriptor_length % 2 or length % 2
                    ):
                        raise Unsure  # pydicom picks US or OW by the LUT Descriptor's first value
            elif converted not in _CONVERTIBLE:
                raise Unsure
            if group & 1:
                if 0x10 <= element <= 0xFF:
                    if creators is None:
                        creators = {}
                    creators[tag] = (vr, value, length)
            elif tag == CHARSET_TAG:
                self.check_charset(converted, value, length)
            elif tag == PIXEL_REPRESENTATION_TAG:
                has_pixel_representation = True
            elif tag == LUT_DESCRIPTOR_TAG:
                lut_descriptor_length = length
            if tag in wanted or (top and tag == CHARSET_TAG):
                self.found[tag] = (vr, value, self.bytes_at(value, length), converted)
        if us_or_ss and has_pixel_data and not has_pixel_representation:
            raise Unsure  # pydicom fails to choose US or SS there (AttributeError)
        return pos

    def undefined_length(
        self, tag: int, vr: str | None, pos: int, limit: int, implicit: bool, depth: int
    ) -> int:
        """An element of undefined length: a sequence, or encapsulated pixel data (as pydicom decides)."""
        if vr is None:
            try:
                known = _dictionary_vr_fast(tag)
            except KeyError:
                if pos + 4 > limit:
                    raise Unsure from None
                offset = self.source.at(pos, 4)
                known = "SQ" if self.source.buf[offset : offset + 4] == _ITEM_BYTES else "UN"
            if known == "SQ":
                return self.sequence(pos, limit, False, implicit, depth + 1)
            if known not in _ENCAPSULATED_VRS:
                raise Unsure
        elif vr in ("SQ", "UN"):
            return self.sequence(pos, limit, False, implicit, depth + 1)
        elif vr not in _ENCAPSULATED_VRS:
            raise Unsure
        return self.fragments(pos, limit)

    def sequence(self, pos: int, limit: int, defined: bool, implicit: bool, depth: int) -> int:
        """The items of a sequence; where it ends (exactly `limit` when `defined`)."""
        if depth > MAX_DEPTH:
            raise Unsure
        source = self.source
        while not (defined and pos == limit):
            if pos + 8 > limit:
                raise Unsure
            offset = source.at(pos, 14 if pos + 14 <= limit else 8)
            group, element, length = _TAG_LENGTH.unpack_from(source.buf, offset)
            tag = group << 16 | element
            if tag == SEQUENCE_END and not defined:
                if length:
                    raise Unsure
                return pos + 8
            if tag != ITEM:
                raise Unsure
            content = pos + 8
            # pydicom reads an item of an explicit VR sequence as implicit when its first element
            # has no VR (PS3.5 6.2.2: a UN sequence's items are implicit VR)
            item_implicit = implicit
            if (
                not implicit
                and content + 6 <= limit
                and (length == UNDEFINED_LENGTH or length >= 8)
            ):
                item_implicit = not _uppercase_pair(source.buf, offset + 12)
            if length == UNDEFINED_LENGTH:
                pos = self.dataset(content, limit, False, item_implicit, depth)
            else:
                pos = content + length
                if pos > limit:
                    raise Unsure
                self.dataset(content, pos, True, item_implicit, depth)
        return pos

    def fragments(self, pos: int, limit: int) -> int:
        """Encapsulated pixel data: items up to the sequence delimiter, as pydicom walks them."""
        source = self.source
        while True:
            if pos + 8 > limit:
                raise Unsure
            offset = source.at(pos, 8, 4096)  # frames lie between: no large window
            group, element, length = _TAG_LENGTH.unpack_from(source.buf, offset)
            tag = group << 16 | element
            if tag == ITEM:
                pos += 8 + length
            elif tag == SEQUENCE_END and length == 0:
                return pos + 8
            else:
                raise Unsure  # pydicom would scan the bytes for a delimiter instead

    def private_vr(
        self,
        tag: int,
        group: int,
        element: int,
        creators: dict[int, tuple[str | None, int, int]] | None,
    ) -> str:
        """The VR pydicom gives a private element without one: by its creator in the private dictionary."""
        if 0x10 <= element <= 0xFF:
            return "LO"
        if not element & 0xFF00:
            return "UN"
        creator = creators.get(group << 16 | element >> 8) if creators else None
        if creator is None:
            return "UN"
        vr, pos, length = creator
        if vr not in (None, "LO", "UN"):
            raise Unsure
        raw = self.bytes_at(pos, length)
        if not _CREATOR_CHARACTERS.fullmatch(raw):
            raise Unsure
        name = raw.decode("ascii").rstrip("\0 ")
        key = (name, tag)
        found = self.private_vrs.get(key)
        if found is None:
            try:
                found = private_dictionary_VR(tag, name)
            except KeyError:
                found = "UN"
            self.private_vrs[key] = found
        return found

    def check_charset(self, vr: str, pos: int, length: int) -> None:
        """A Specific Character Set pydicom knows every term of (anything else: its path decides)."""
        if vr != "CS":
            raise Unsure
        for index, term in enumerate(_charset_terms(self.bytes_at(pos, length))):
            if term not in python_encoding and not (index == 0 and term == ""):
                raise Unsure

    def walked(self, syntax: str, implicit: bool) -> Walked:
        """The wanted elements found at the top level, and the encodings of their text."""
        encoding: str | list[str] = default_encoding
        charset = self.found.get(CHARSET_TAG)
        if charset is not None:
            encoding = convert_encodings(_charset_terms(charset[2]))
        return Walked(syntax, implicit, self.found, encoding)
