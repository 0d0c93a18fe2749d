"""Header values read straight from the bytes (store.plain_values, Walked.plain) against pydicom's conversion
of the same bytes (Walked.get, then plain_value), on many generated values per VR, in each character set
context and in both little endian syntaxes; then inside whole instances, read_header against pydicom alone.
"""

from __future__ import annotations

import random
import struct
import warnings

import pytest
from pydicom import config as pydicom_config
from pydicom import hooks as pydicom_hooks
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.tag import BaseTag

from dicomrouter.store.dataset_walk import LUT_DESCRIPTOR_TAGS, Walked, walk_instance, wanted_tags
from dicomrouter.store.plain_values import NotPlain, plain_from_bytes, plain_value
from dicomrouter.store.receive import CATALOG_KEYWORDS, read_header, read_header_pydicom
from tests.unit.test_dataset_walk import EXPLICIT, IMPLICIT, explicit, implicit, instance, outcome

# VR -> an element of that VR in the dictionary (the walk only collects public, dictionary elements)
KEYWORDS = {
    "AE": "RetrieveAETitle",
    "AS": "PatientAge",
    "CS": "ImageType",
    "DA": "StudyDate",
    "DT": "AcquisitionDateTime",
    "TM": "StudyTime",
    "UI": "SOPInstanceUID",
    "SH": "AccessionNumber",
    "LO": "PatientID",
    "UC": "LongCodeValue",
    "ST": "InstitutionAddress",
    "LT": "AdditionalPatientHistory",
    "UT": "PrivateDataElementDescription",
    "UR": "RetrieveURL",
    "PN": "PatientName",
    "IS": "SeriesNumber",
    "DS": "SliceThickness",
    "US": "Rows",
    "SS": "TagAngleSecondAxis",
    "UL": "SimpleFrameList",
    "SL": "ReferencePixelX0",
    "FL": "ExaminedBodyThickness",
    "FD": "TimeRange",
    "SV": "SelectorSVValue",
    "UV": "FileOffsetInContainer",
}
NUMERIC_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "SV": 8, "UV": 8}
CHARSET_TAG = 0x00080005

# Specific Character Set values under which ASCII text (no escape) is read without pydicom: no
# value, the default, and those whose first value pydicom decodes ASCII bytes as ASCII with (it
# decodes a value without escape sequences with the first encoding only).
ASCII_CHARSETS = [
    "ISO_IR 6",
    "",
    "ISO_IR 100",
    "ISO_IR 101",
    "ISO_IR 109",
    "ISO_IR 110",
    "ISO_IR 126",
    "ISO_IR 127",
    "ISO_IR 138",
    "ISO_IR 144",
    "ISO_IR 148",
    "ISO_IR 166",
    "ISO_IR 192",
    "GB18030",
    "GBK",
    "ISO 2022 GBK",
    "ISO_IR 100\\ISO 2022 IR 100",  # code extensions after an ASCII-reading first value
    "ISO 2022 IR 100\\ISO 2022 IR 126",
    "ISO 2022 IR 6\\ISO 2022 IR 87",
    "\\ISO 2022 IR 87",
    "ISO 2022 IR 6\\ISO 2022 IR 149",
    "ISO 2022 IR 100\\ISO 2022 IR 87\\ISO 2022 IR 159",
    "ISO_IR 192\\ISO 2022 IR 87",  # stand-alone with extensions: pydicom keeps the first only
    "ISO 2022 IR 100\\ISO_IR 192",  # a stand-alone one as an extension: pydicom drops it
]
# ... and those whose text pydicom still converts (a first value the walk does not list).
OTHER_CHARSETS = [
    "ISO_IR 13",
    "ISO 2022 IR 13\\ISO 2022 IR 87",
    "ISO 2022 IR 87",
    "ISO 2022 IR 149",
    "ISO 2022 IR 58",
]


def encodings_of(charset: str | bytes | None):
    """The encodings pydicom's read_dataset derives from a Specific Character Set."""
    if charset is None:
        return default_encoding
    value = charset.encode() if isinstance(charset, str) else charset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_encodings(convert_raw_data_element(charset_raw(value)).value)


def charset_raw(value: bytes) -> RawDataElement:
    return RawDataElement(BaseTag(0x00080005), "CS", len(value), value, 0, False, True)


# (name, encodings as the walk derives them from the Specific Character Set, whether ASCII text is
# read without pydicom)
CHARSETS = [
    ("none", default_encoding, True),
    *((name, encodings_of(name), True) for name in ASCII_CHARSETS),
    *((name, encodings_of(name), False) for name in OTHER_CHARSETS),
]

# Characters pydicom treats specially somewhere: padding, delimiters, whitespace str.strip() knows,
# escape, non-ASCII bytes (Latin-1 whitespace, UTF-8 and ISO 2022 sequences among them).
SPECIALS = [
    b" ",
    b"  ",
    b"\0",
    b"\\",
    b"=",
    b"^",
    b"\t",
    b"\n",
    b"\r",
    b"\x0b",
    b"\x0c",
    b"\x1c",
    b"\x1f",
    b"\x1b",
    b"\x1b$B",
    b"\x1b(B",
    b"\x7f",
    b"\xa0",
    b"\x85",
    b"\xe9",
    b"\xc3\xa9",
    b"_",
    b",",
]
TOKENS = {
    "AE": [b"STORESCP", b"AE_1", b"ae title", b"X"],
    "AS": [b"034Y", b"012M", b"Y", b"1"],
    "CS": [b"ORIGINAL", b"PRIMARY", b"AXIAL", b"CT", b"ISO_IR 100", b"A_B"],
    "DA": [b"20240131", b"19000101", b"2024", b"-", b"20240101-20240131"],
    "DT": [b"20240131123456.123456", b"+0100", b"-0500", b"2024", b"."],
    "TM": [b"123456", b"123456.789", b"12", b":", b"."],
    "UI": [b"1.2.840.10008.5.1.4.1.1.2", b"1.2.3", b"0", b".", b"2.25.1234567890123456789"],
    "SH": [b"ACC123", b"short", b"a b", b"x"],
    "LO": [b"PATIENT-1", b"long string", b"id"],
    "UC": [b"unlimited", b"chars"],
    "ST": [b"Main street 1", b"line", b"text"],
    "LT": [b"long text", b"para"],
    "UT": [b"unlimited text", b"x"],
    "UR": [b"http://example.org/a?b=c", b"urn:x", b" "],
    "PN": [b"Doe", b"John", b"Doe^John", b"^", b"=", b"Yamada^Tarou", b"Dr", b"III"],
    "IS": [
        b"1",
        b"12",
        b"-3",
        b"+4",
        b"007",
        b"0",
        b"-0",
        b"1.0",
        b"1.5",
        b"1e3",
        b"99999999999999999999",
    ],
    "DS": [
        b"1.5",
        b"-0.25",
        b"+3",
        b"1e3",
        b"1E-3",
        b".5",
        b"5.",
        b"1.e5",
        b"nan",
        b"inf",
        b"e",
        b".",
    ],
}
DIGITS = [b"0", b"1", b"9", b"+", b"-", b".", b"e", b"E"]


def generated(vr: str, rnd: random.Random, count: int) -> list[bytes]:
    """Values as they come: well formed, padded, multi-valued, empty, odd lengths, and odd characters."""
    if vr in NUMERIC_SIZES:
        size = NUMERIC_SIZES[vr]
        values = [b"", bytes(size), b"\xff" * size, b"\x80" + bytes(size - 1)]
        for _ in range(count):
            length = rnd.choice([size, size, 2 * size, 5 * size, rnd.randrange(1, 4 * size)])
            values.append(bytes(rnd.randrange(256) for _ in range(length)))
        return values
    tokens = TOKENS[vr]
    values = [b"", b" ", b"\0", b"\\", b" \\ ", b"\\\\", b"=", b"==", b"\x1b", b"\xe9"]
    for index in range(count):
        kind = index % 4
        if kind == 0:  # well formed: values joined by backslashes, padded to even length
            value = b"\\".join(rnd.choice(tokens) for _ in range(rnd.choice([1, 1, 2, 3])))
            if len(value) % 2:
                value += rnd.choice([b" ", b"\0"])
        elif (
            kind == 1
        ):  # well formed with odd padding: leading spaces, padding inside, several pads
            parts = [
                rnd.choice([b"", b" ", b"  "])
                + rnd.choice(tokens)
                + rnd.choice([b"", b" ", b"\0", b" \0", b"\0 "])
                for _ in range(rnd.choice([1, 2, 3]))
            ]
            value = b"\\".join(parts) + rnd.choice([b"", b" ", b"\0", b"  ", b"\0\0"])
        elif kind == 2:  # anything: tokens and special characters
            pool = tokens + SPECIALS + (DIGITS if vr in ("IS", "DS") else [])
            value = b"".join(rnd.choice(pool) for _ in range(rnd.randrange(1, 8)))
        else:  # single characters from everywhere
            value = bytes(
                rnd.choice(b" \0\\=^+-.eE09aZ\t\x1b\xa0") for _ in range(rnd.randrange(1, 6))
            )
        values.append(value)
    return values


def walked(tag: int, vr: str, value: bytes, implicit_vr: bool, encoding) -> Walked:
    """A Walked holding one element, as the walk builds it (the VR as pydicom's hook chooses it)."""
    raw = RawDataElement(
        BaseTag(tag), None if implicit_vr else vr, len(value), value, 0, implicit_vr, True
    )
    chosen: dict = {}
    pydicom_hooks.hooks.raw_element_vr(raw, chosen, encoding=encoding, ds=None)
    found = (raw.VR, 0, value, chosen["VR"])
    return Walked(IMPLICIT if implicit_vr else EXPLICIT, implicit_vr, {tag: found}, encoding)


def result(read, *args):
    """("value", what `read` returns) or ("error", the exception's class), quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return "value", read(*args)
        except Exception as exc:
            return "error", type(exc)


def compare(vr: str, keyword: str, values: list[bytes]) -> tuple[int, int]:
    """Walked.plain against plain_value(Walked.get) for each value in each context; (fast, total)."""
    tag = tag_for_keyword(keyword)
    fast = total = 0
    for value in values:
        for implicit_vr in (True, False):
            for name, encoding, ascii_charset in CHARSETS:
                element = walked(tag, vr, value, implicit_vr, encoding)
                expected = result(lambda element=element: plain_value(element.get(keyword)))
                got = result(element.plain, keyword)
                assert got == expected, (
                    f"{vr} {value!r} ({'implicit' if implicit_vr else 'explicit'}, {name})"
                )
                total += 1
                try:
                    direct = plain_from_bytes(vr, value, tag == CHARSET_TAG or ascii_charset)
                except NotPlain:
                    continue
                assert ("value", direct) == expected, f"{vr} {value!r} ({name}): plain_from_bytes"
                fast += 1
    return fast, total


@pytest.mark.parametrize("vr", sorted(KEYWORDS))
def test_generated_values_read_as_pydicom_reads_them(vr):
    rnd = random.Random(f"plain {vr}")
    fast, total = compare(vr, KEYWORDS[vr], generated(vr, rnd, 400))
    print(f"{vr}: {fast} of {total} read without pydicom")
    assert fast > total // 5, (fast, total)  # the fast path is exercised, not only the fallback


def test_well_formed_values_skip_pydicom():
    """The usual value of each plain VR is read without pydicom (in the default character set)."""
    usual = {
        "UI": b"1.2.840.10008.5.1.4.1.1.2\0",
        "PN": b"Doe^John",
        "LO": b"PATIENT-1 ",
        "SH": b"ACC123",
        "CS": b"ORIGINAL\\PRIMARY\\AXIAL ",
        "DA": b"20240131",
        "TM": b"123456.789 ",
        "IS": b"12",
        "DS": b"0.5\\-1.25 ",
        "AE": b"STORESCP",
        "US": b"\x00\x02",
    }
    for vr, value in usual.items():
        assert plain_from_bytes(vr, value, True) is not None, vr


@pytest.mark.filterwarnings("ignore:Failed to encode")  # a PersonName under ISO 2022 IR 87 alone
@pytest.mark.parametrize(("name", "encoding", "ascii_charset"), CHARSETS)
def test_ascii_text_skips_pydicom_in_ascii_charsets(name, encoding, ascii_charset, monkeypatch):
    """The walk reads ASCII text without pydicom exactly in the character sets the test lists."""
    values = {
        "PN": b"Doe^John=Doe^J=",
        "LO": b"PATIENT-1 \\ID2 ",
        "SH": b"ACC123",
        "ST": b"Main street 1\\2",
        "LT": b"long text ",
        "UT": b"unlimited",
        "UC": b"a\\b",
    }
    for vr, value in values.items():
        keyword = KEYWORDS[vr]
        element = walked(tag_for_keyword(keyword), vr, value, False, encoding)
        expected = plain_value(element.get(keyword))
        with monkeypatch.context() as patched:
            patched.setattr(Walked, "get", lambda self, keyword: pytest.fail("pydicom converted"))
            if ascii_charset:
                assert element.plain(keyword) == expected, (vr, name)
            else:
                with pytest.raises(pytest.fail.Exception):
                    element.plain(keyword)


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
def test_walk_takes_the_encodings_pydicom_takes(syntax):
    """The walk reads the Specific Character Set's terms itself, for convert_encodings as pydicom does."""
    values = [name.encode() for name in ASCII_CHARSETS + OTHER_CHARSETS] + [
        b"",
        b"  ",
        b"ISO_IR 100 ",
        b"ISO_IR 192\0",
        b"\\ISO 2022 IR 87 ",
        b" ISO_IR 100",
        b"ISO_IR 100\\",
        b"ISO_IR 100\\ ",
    ]
    for value in values:
        data = instance(syntax, {CHARSET_TAG: element(syntax, CHARSET_TAG, "CS", value)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            walked = walk_instance(data, wanted_tags(CATALOG_KEYWORDS))
        expected = encodings_of(value)
        if walked is None:  # a term pydicom does not know (" ISO_IR 100"): pydicom's path
            assert value.startswith(b" "), value
            continue
        assert walked.encoding == expected, value


def test_specific_character_set_read_in_the_default_encoding():
    """The Specific Character Set itself is read as ISO 8859-1 whatever it names."""
    values = [
        b"ISO_IR 100",
        b"ISO_IR 192",
        b"\\ISO 2022 IR 87 ",
        b"ISO 2022 IR 6\\ISO 2022 IR 87",
        b"",
        b"  ",
    ]
    fast, total = compare("CS", "SpecificCharacterSet", values)
    assert fast == total


def test_lut_descriptors_left_to_pydicom():
    """pydicom amends the first value of a LUT Descriptor after converting it (negative -> unsigned)."""
    from pydicom.tag import _LUT_DESCRIPTOR_TAGS

    assert LUT_DESCRIPTOR_TAGS == frozenset(_LUT_DESCRIPTOR_TAGS)
    keyword = keyword_for_tag(0x00283002)
    value = struct.pack("<hhh", -1, 0, 16)
    element = walked(0x00283002, "SS", value, False, default_encoding)
    assert element.plain(keyword) == plain_value(element.get(keyword)) == ["65535", "0", "16"]


def test_pydicom_settings_the_fast_path_reads_by():
    """DS read as Decimal is pydicom's to render."""
    try:
        pydicom_config.DS_decimal(True)
        with pytest.raises(NotPlain):
            plain_from_bytes("DS", b"1.5", True)
    finally:
        pydicom_config.DS_decimal(False)


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
def test_generated_values_in_whole_instances(syntax):
    """read_header (the walk, then plain values) answers as pydicom alone, value by value."""
    rnd = random.Random(f"instances {syntax}")
    vouched = 0
    for vr, keyword in sorted(KEYWORDS.items()):
        tag = tag_for_keyword(keyword)
        for value in generated(vr, rnd, 40):
            for charset in WHOLE_INSTANCE_CHARSETS:
                extra = {tag: element(syntax, tag, vr, value)}
                if charset is not None:
                    extra[CHARSET_TAG] = element(syntax, CHARSET_TAG, "CS", charset)
                data = instance(syntax, extra)
                keywords = {keyword, "SpecificCharacterSet"}
                expected = outcome(read_header_pydicom, data, keywords)
                got = outcome(read_header, data, keywords)
                assert got == expected, f"{vr} {value!r} in {syntax}, {charset}"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    vouched += (
                        walk_instance(data, wanted_tags({*CATALOG_KEYWORDS, *keywords})) is not None
                    )
    assert vouched > 4000, vouched  # of 25 VRs x 44 values x 6 character sets


WHOLE_INSTANCE_CHARSETS = (
    None,
    b"ISO_IR 100",
    b"ISO_IR 192",
    b"GB18030",
    b"ISO 2022 IR 100\\ISO 2022 IR 87",
    b"ISO_IR 13",
)


def element(syntax: str, tag: int, vr: str, value: bytes) -> bytes:
    if syntax == IMPLICIT:
        return implicit(tag, value)
    return explicit(tag, vr.encode(), value)
