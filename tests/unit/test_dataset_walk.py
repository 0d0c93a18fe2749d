"""Our element walk against pydicom's path, on the same bytes: the same refusals and the same header.

The walk may hand any instance to pydicom (None); when it does vouch for one, pydicom must accept it
and read the same header. read_header, which combines the two, must answer exactly as pydicom alone.
"""

from __future__ import annotations

import random
import struct
import warnings
from functools import cache
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT
from pydicom.datadict import DicomDictionary, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomrouter.dicom_file import with_group_length
from dicomrouter.store import receive
from dicomrouter.store.dataset_walk import (
    EXPLICIT_SYNTAXES,
    Unsure,
    _Memory,
    _Walk,
    walk_instance,
    wanted_tags,
)
from dicomrouter.store.plain_values import NotPlain, plain_from_bytes, plain_value
from dicomrouter.store.receive import (
    CATALOG_KEYWORDS,
    read_header,
    read_header_from_file,
    read_header_from_file_pydicom,
    read_header_pydicom,
)

RULE_KEYWORDS = {
    "Modality",
    "BodyPartExamined",
    "InstitutionName",
    "StationName",
    "SpecificCharacterSet",
}
WANTED = wanted_tags({*CATALOG_KEYWORDS, *RULE_KEYWORDS})
UNCOMPRESSED = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
}


def outcome(read, *args):
    """("accepted", header) or ("refused", None), quietly (pydicom warns about much of what we feed it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return "accepted", read(*args)
        except Exception:
            return "refused", None


def assert_same(data: bytes, note: str) -> bool:
    """Walk and pydicom agree on `data`; True when the walk vouched for it."""
    expected = outcome(read_header_pydicom, data, RULE_KEYWORDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # walk_instance takes any failure for "pydicom decides": the walk itself raises only Unsure
            walked = _Walk(_Memory(data), WANTED, defer_bytes=None).run()
        except Unsure:
            walked = None
    if walked is not None:
        assert expected[0] == "accepted", f"{note}: the walk vouched for what pydicom refuses"
    assert outcome(read_header, data, RULE_KEYWORDS) == expected, note
    return walked is not None


def encoded(dataset: Dataset, syntax: str) -> bytes | None:
    """`dataset` as a Part 10 file in `syntax` (None when pydicom cannot write it so)."""
    dataset = Dataset(dataset)  # a shallow copy: file_meta changed on the copy only
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = UID(syntax)
    meta.MediaStorageSOPClassUID = dataset.get("SOPClassUID") or "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = dataset.get("SOPInstanceUID") or "1.2.3.4"
    dataset.file_meta = meta
    fp = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dataset.save_as(fp, enforce_file_format=True)
        except Exception:
            return None
    return fp.getvalue()


@cache
def corpus() -> tuple[tuple[str, bytes], ...]:
    """pydicom's bundled test and character set files: as they are (with a group length added, as import does), and
    re-encoded in both uncompressed little endian syntaxes (encapsulated ones kept in their own)."""
    files = []
    # read from pydicom's own folders: get_testdata_files would try to download more
    paths = [
        *Path(DATA_ROOT, "test_files").rglob("*.dcm"),
        *Path(DATA_ROOT, "charset_files").rglob("*.dcm"),
    ]
    for path in sorted(paths):
        raw = Path(path).read_bytes()
        name = Path(path).name
        try:
            files.append((f"{name} as is", with_group_length(raw)))
        except ValueError:
            pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dataset = dcmread(BytesIO(raw), force=True)
                for element in dataset.iterall():
                    _ = element.value
            except Exception:
                continue
        syntax = str(dataset.file_meta.get("TransferSyntaxUID", ""))
        targets = (
            [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
            if syntax in UNCOMPRESSED or not syntax
            else [syntax]
        )
        for target in targets:
            data = encoded(dataset, target)
            if data is not None:
                files.append((f"{name} in {target}", data))
    return tuple(files)


def test_bundled_files_in_every_walked_syntax():
    vouched = {ImplicitVRLittleEndian: 0, ExplicitVRLittleEndian: 0, "encapsulated": 0}
    for note, data in corpus():
        if assert_same(data, note):
            syntax = read_header(data, RULE_KEYWORDS)["TransferSyntaxUID"]
            vouched["encapsulated" if syntax not in vouched else syntax] += 1
    # the walk answers for the usual instance itself, in each family of syntaxes
    assert vouched[ImplicitVRLittleEndian] >= 20 and vouched[ExplicitVRLittleEndian] >= 20, vouched
    assert vouched["encapsulated"] >= 10, vouched


def plain_keywords(data: bytes) -> set[str]:
    """The keywords of the top-level elements whose dictionary VR plain_values reads (none of them a
    sequence or of ambiguous VR: with those wanted the walk would hand the whole instance to pydicom)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dataset = dcmread(BytesIO(data), force=True)
        except Exception:
            return set()
    keywords = set()
    for tag in dataset.keys():
        entry = DicomDictionary.get(tag)
        if entry is not None and entry[0] in PLAIN_VRS and entry[4]:
            keywords.add(entry[4])
    return keywords


PLAIN_VRS = {
    *"AE AS CS DA DT TM UI SH LO UC ST LT UT UR PN IS DS".split(),
    *"US SS UL SL FL FD SV UV".split(),
}


def test_bundled_files_every_plain_value():
    """Every top-level value of a VR plain_values reads, in pydicom's files: read_header with all of them
    wanted answers as pydicom alone, and Walked.plain gives plain_value(Walked.get), mostly without pydicom."""
    fast = total = 0
    for note, data in corpus():
        keywords = plain_keywords(data)
        if not keywords:
            continue
        expected = outcome(read_header_pydicom, data, keywords)
        assert outcome(read_header, data, keywords) == expected, note
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            walked = walk_instance(data, wanted_tags({*CATALOG_KEYWORDS, *keywords}))
            if walked is None:
                continue
            for keyword in keywords:
                assert walked.plain(keyword) == plain_value(walked.get(keyword)), (
                    f"{note}: {keyword}"
                )
                tag = tag_for_keyword(keyword)
                found = walked.found.get(tag)
                if found is None:
                    continue
                total += 1
                try:
                    plain_from_bytes(found[3], found[2], walked.ascii_charset or tag == 0x00080005)
                    fast += 1
                except NotPlain:
                    pass
    print(f"{fast} of {total} values read without pydicom")
    assert total > 2000 and fast > total // 2, (fast, total)


def small_files() -> list[tuple[str, bytes]]:
    """A few small instances: sequences (defined and undefined length), private tags, encapsulated
    pixel data, a character set; implicit and explicit."""
    chosen = []
    for note, data in corpus():
        if len(data) < 12_000 and walk_instance(data, WANTED) is not None:
            chosen.append((note, data))
    random.Random(7).shuffle(chosen)
    syntaxes = {}
    for note, data in chosen:  # at most two of each syntax
        syntax = note.rsplit(" in ", 1)[-1] if " in " in note else "as is"
        syntaxes.setdefault(syntax, []).append((note, data))
    return [item for items in syntaxes.values() for item in items[:2]][:8]


def test_every_truncation_point():
    files = small_files()
    assert len(files) >= 4
    for note, data in files:
        for end in range(len(data) - 1, 127, -1):
            assert_same(data[:end], f"{note} cut at {end}")


def element_offsets(data: bytes) -> list[int]:
    """Offsets where an element, item or delimiter header may start (every even offset past the meta)."""
    start = 144 + struct.unpack_from("<I", data, 140)[0]
    return list(range(start, len(data) - 12, 2))


MUTATIONS = ("length16", "length32", "vr", "delimiter", "flip", "tag")


def mutate(data: bytes, kind: str, rnd: random.Random) -> bytes:
    out = bytearray(data)
    offset = rnd.choice(element_offsets(data))
    if kind == "length16":
        struct.pack_into(
            "<H", out, offset + 6, rnd.choice([0, 1, 2, 3, 4, 0xFFFF, 0xFFFE, rnd.randrange(65536)])
        )
    elif kind == "length32":
        value = rnd.choice(
            [0, 1, 2, 4, 8, 0xFFFFFFFF, 0xFFFFFFFE, rnd.randrange(2**32), rnd.randrange(4096)]
        )
        struct.pack_into("<I", out, offset + 4 + rnd.choice([0, 4]), value)
    elif kind == "vr":
        out[offset + 4 : offset + 6] = rnd.choice(
            [b"SQ", b"UN", b"OB", b"US", b"FD", b"IS", b"XX", b"\0\0", b"UT", b"AT"]
        )
    elif kind == "delimiter":
        out[offset : offset + 8] = rnd.choice(
            [b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0"]
        ) + bytes(4)
    elif kind == "tag":
        out[offset : offset + 4] = rnd.choice(
            [b"\x08\x00\x05\x00", b"\x09\x00\x10\x00", b"\x28\x00\x06\x01", b"\x02\x00\x10\x00"]
        )
    else:
        for _ in range(rnd.randint(1, 4)):
            out[rnd.choice(element_offsets(data)) + rnd.randrange(8)] = rnd.randrange(256)
    return bytes(out)


@pytest.mark.parametrize("kind", MUTATIONS)
def test_mutated_lengths_vrs_and_delimiters(kind):
    rnd = random.Random(f"walk {kind}")
    files = small_files()
    vouched = 0
    for attempt in range(300):
        note, data = files[attempt % len(files)]
        vouched += assert_same(mutate(data, kind, rnd), f"{note}, {kind} mutation {attempt}")
    print(f"{kind}: the walk vouched for {vouched} of 300")


def private_instance(implicit: bool) -> bytes:
    """Private elements whose VR comes from pydicom's private dictionary (GEMS_ACQU_01), a sequence
    with undefined length, and values that convert or not."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jörg"
    ds.add_new(0x00191010 - 0x1000 + 0x0000, "LO", "GEMS_ACQU_01")  # (0019,0010) creator
    ds.add_new(0x0019100F, "DS", "1.5")  # DS in the dictionary
    ds.add_new(0x00191018, "LO", "x")
    item = Dataset()
    item.CodeValue = "X"
    ds.ReferencedImageSequence = [item]
    return encoded(ds, ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian) or b""


@pytest.mark.parametrize("implicit", [True, False])
def test_private_elements_by_their_creator(implicit):
    data = private_instance(implicit)
    assert assert_same(data, "private")
    rnd = random.Random(implicit)
    for attempt in range(400):
        assert_same(mutate(data, rnd.choice(MUTATIONS), rnd), f"private, mutation {attempt}")


def test_the_walked_syntaxes_are_explicit_little_endian_to_pydicom():
    from pydicom.uid import UID as PydicomUID

    for syntax in EXPLICIT_SYNTAXES:
        uid = PydicomUID(syntax)
        assert uid.is_little_endian and not uid.is_implicit_VR and not uid.is_deflated, syntax


def test_streamed_files_the_same(tmp_path, monkeypatch):
    """read_header_from_file against pydicom with defer_size: small values deferred (64 bytes) so
    that skipped values are exercised, and truncated files."""
    monkeypatch.setattr(receive, "DEFERRED_VALUE_BYTES", 64)
    path = tmp_path / "instance.dcm"
    files = small_files()
    rnd = random.Random(3)
    for note, data in files:
        for variant in [data, *(data[: rnd.randrange(200, len(data))] for _ in range(20))]:
            path.write_bytes(variant)
            size = len(variant)
            expected = outcome(read_header_from_file_pydicom, path, size, RULE_KEYWORDS)
            assert outcome(read_header_from_file, path, size, RULE_KEYWORDS) == expected, note


# --------------------------------------------------------------------------- cases built by hand

CT = "1.2.840.10008.5.1.4.1.1.2"


def explicit(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    length = len(value) if length is None else length
    if vr in (
        b"OB",
        b"OW",
        b"SQ",
        b"UN",
        b"UT",
        b"UC",
        b"UR",
        b"OF",
        b"OD",
        b"OL",
        b"OV",
        b"SV",
        b"UV",
    ):
        return struct.pack("<HH2sxxI", tag >> 16, tag & 0xFFFF, vr, length) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, length) + value


def implicit(tag: int, value: bytes, length: int | None = None) -> bytes:
    return (
        struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value) if length is None else length)
        + value
    )


def item(content: bytes, defined: bool = True) -> bytes:
    if defined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content
    return (
        struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + content
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    )


SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def instance(
    syntax: str, extra: dict[int, bytes] | None = None, body_syntax: str | None = None
) -> bytes:
    """A Part 10 instance in `syntax` (its data set encoded as `body_syntax`, the same by default): the UIDs,
    modality and patient name, and `extra` elements (tag -> encoded element), all in tag order."""
    from dicomrouter.scp.store import file_meta

    values = {
        0x00080016: (b"UI", CT.encode() + b"\0"),
        0x00080018: (b"UI", b"1.2.3.4\0"),
        0x00080060: (b"CS", b"CT"),
        0x00100010: (b"PN", b"Doe^Jane"),
        0x0020000D: (b"UI", b"1.2.3\0"),
        0x0020000E: (b"UI", b"1.2.3.5\0"),
    }
    body_implicit = (body_syntax or syntax) == IMPLICIT
    elements = {
        tag: implicit(tag, value) if body_implicit else explicit(tag, vr, value)
        for tag, (vr, value) in values.items()
    }
    elements.update(extra or {})
    return file_meta(CT, "1.2.3.4", syntax, "1.2.3", "TEST", "WS") + b"".join(
        elements[tag] for tag in sorted(elements)
    )


def walked(data: bytes) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return walk_instance(data, WANTED) is not None


EXPLICIT = str(ExplicitVRLittleEndian)
IMPLICIT = str(ImplicitVRLittleEndian)
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

# name -> (instance, whether the walk answers for it itself)
HAND_MADE = {
    "plain explicit": (instance(EXPLICIT), True),
    "plain implicit": (instance(IMPLICIT), True),
    "US of 3 bytes (pydicom: BytesLengthException)": (
        instance(EXPLICIT, {0x00280010: explicit(0x00280010, b"US", b"\1\0\0")}),
        False,
    ),
    "implicit US of 3 bytes": (
        instance(IMPLICIT, {0x00280010: implicit(0x00280010, b"\1\0\0")}),
        False,
    ),
    "IS that overflows (pydicom: OverflowError)": (
        instance(EXPLICIT, {0x00200013: explicit(0x00200013, b"IS", b"1e999 ")}),
        False,
    ),
    "IS of digits": (instance(EXPLICIT, {0x00200013: explicit(0x00200013, b"IS", b"12")}), True),
    "unknown VR": (instance(EXPLICIT, {0x00200013: explicit(0x00200013, b"QQ", b"12")}), False),
    "UN sequence of undefined length, implicit items (PS3.5 6.2.2)": (
        instance(
            EXPLICIT,
            {
                0x00081140: explicit(0x00081140, b"UN", b"", 0xFFFFFFFF)
                + item(
                    implicit(0x00081150, CT.encode() + b"\0") + implicit(0x00081155, b"1.2.9\0"),
                    defined=False,
                )
                + item(implicit(0x00081150, CT.encode() + b"\0"))
                + SEQUENCE_END
            },
        ),
        True,
    ),
    "UN of a known tag, converted by its dictionary VR (US, 3 bytes)": (
        instance(EXPLICIT, {0x00280010: explicit(0x00280010, b"UN", b"\1\0\0")}),
        False,
    ),
    "UN of a known tag, converted by its dictionary VR (US, 2 bytes)": (
        instance(EXPLICIT, {0x00280010: explicit(0x00280010, b"UN", b"\1\0")}),
        True,
    ),
    "explicit syntax, implicit data set": (instance(EXPLICIT, body_syntax=IMPLICIT), False),
    "implicit syntax, explicit data set": (instance(IMPLICIT, body_syntax=EXPLICIT), False),
    "encapsulated pixel data": (
        instance(
            JPEG_BASELINE,
            {
                0x7FE00010: explicit(0x7FE00010, b"OB", b"", 0xFFFFFFFF)
                + item(b"")
                + item(b"\xff\xd8\xff\xd9")
                + SEQUENCE_END
            },
        ),
        True,
    ),
    "encapsulated pixel data without its delimiter": (
        instance(
            JPEG_BASELINE,
            {
                0x7FE00010: explicit(0x7FE00010, b"OB", b"", 0xFFFFFFFF)
                + item(b"")
                + item(b"\xff\xd8\xff\xd9")
            },
        ),
        False,
    ),
    "a delimiter inside a fragment": (
        instance(
            JPEG_BASELINE,
            {
                0x7FE00010: explicit(0x7FE00010, b"OB", b"", 0xFFFFFFFF)
                + item(b"\xfe\xff\xdd\xe0\0\0\0\0")
                + SEQUENCE_END
            },
        ),
        True,
    ),
    "private creator and a US by the private dictionary, odd length": (
        instance(
            IMPLICIT,
            {
                0x00190010: implicit(0x00190010, b"GEMS_ACQU_01"),
                0x0019100E: implicit(0x0019100E, b"\1\0\0"),
            },
        ),
        False,
    ),
    "private creator and its elements": (
        instance(
            IMPLICIT,
            {
                0x00190010: implicit(0x00190010, b"GEMS_ACQU_01"),
                0x0019100E: implicit(0x0019100E, b"\1\0"),
                0x0019100F: implicit(0x0019100F, b"1.5 "),
                0x00191018: implicit(0x00191018, b"x "),
            },
        ),
        True,
    ),
    "private element without its creator": (
        instance(IMPLICIT, {0x0019100E: implicit(0x0019100E, b"\1\0\0")}),
        True,
    ),
    "tags out of order": (
        instance(EXPLICIT, {0x00100020: explicit(0x00100010, b"LO", b"Again ")}),
        False,
    ),
    "trailing bytes": (instance(EXPLICIT) + b"\0\0\0", False),
    "deflated": (instance("1.2.840.10008.1.2.1.99"), False),
    "big endian": (instance("1.2.840.10008.1.2.2"), False),
    "unknown character set": (
        instance(EXPLICIT, {0x00080005: explicit(0x00080005, b"CS", b"ISO_IR 999")}),
        False,
    ),
    "latin-1 character set": (
        instance(
            EXPLICIT,
            {
                0x00080005: explicit(0x00080005, b"CS", b"ISO_IR 100"),
                0x00100010: explicit(0x00100010, b"PN", "Dö^Jané".encode("latin-1")),
            },
        ),
        True,
    ),
}


def nested(depth: int) -> bytes:
    inner = explicit(0x00080100, b"SH", b"X ")
    for _ in range(depth):
        inner = explicit(0x0040A730, b"SQ", item(inner))
    return inner


HAND_MADE["sequences nested 20 deep"] = (instance(EXPLICIT, {0x0040A730: nested(20)}), True)
HAND_MADE["sequences nested 100 deep"] = (instance(EXPLICIT, {0x0040A730: nested(100)}), False)


@pytest.mark.parametrize("name", HAND_MADE)
def test_hand_made_cases(name):
    data, walks = HAND_MADE[name]
    assert_same(data, name)
    assert walked(data) is walks
    for end in range(len(data) - 1, 300, -1):
        assert_same(data[:end], f"{name} cut at {end}")
