"""The layout of a DICOM file (PS3.10): where its data set starts, read from the bytes, nothing decoded."""

from __future__ import annotations

import struct

PREFIX_BYTES = 132  # preamble and "DICM"
META_HEAD_BYTES = (
    144  # the prefix and the (0002,0000) group length element: all dataset_offset reads
)
MAX_FILE_META_BYTES = 64 * 1024  # a file meta the router writes is a few hundred bytes
_GROUP_LENGTH_TAG = b"\x02\x00\x00\x00UL\x04\x00"  # (0002,0000) UL, value length 4
_LONG_LENGTH_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}


def dataset_offset(head: bytes) -> int:
    """Where the data set starts in a DICOM file, from its first META_HEAD_BYTES alone: after the
    preamble, 'DICM' and as many bytes of file meta as its (0002,0000) group length says.

    No other meta element is parsed; a file without the group length first, or with one over
    MAX_FILE_META_BYTES, is refused (ValueError). Every file the router spools has one.
    """
    if head[128:PREFIX_BYTES] != b"DICM":
        raise ValueError("not a DICOM file (no DICM prefix at byte 128)")
    if head[PREFIX_BYTES:140] != _GROUP_LENGTH_TAG or len(head) < META_HEAD_BYTES:
        raise ValueError("the file meta does not start with its group length (0002,0000)")
    (length,) = struct.unpack_from("<I", head, 140)
    if length > MAX_FILE_META_BYTES:
        raise ValueError(f"the file meta claims {length} bytes, more than {MAX_FILE_META_BYTES}")
    return META_HEAD_BYTES + length


def with_group_length(content: bytes) -> bytes:
    """`content` with a (0002,0000) group length first in its file meta, added when missing
    (files written by old software): for import, before the file enters the spool.

    The group 0002 elements are walked up to MAX_FILE_META_BYTES; ValueError when they are not there.
    """
    if content[128:PREFIX_BYTES] != b"DICM":
        raise ValueError("not a DICOM file (no DICM prefix at byte 128)")
    if content[PREFIX_BYTES:140] == _GROUP_LENGTH_TAG:
        return content
    offset = PREFIX_BYTES
    limit = min(len(content), PREFIX_BYTES + MAX_FILE_META_BYTES)
    while offset + 8 <= limit and content[offset : offset + 2] == b"\x02\x00":
        vr = content[offset + 4 : offset + 6]
        if vr in _LONG_LENGTH_VRS:
            (length,) = struct.unpack_from("<I", content, offset + 8)
            offset += 12 + length
        else:
            (length,) = struct.unpack_from("<H", content, offset + 6)
            offset += 8 + length
    if offset == PREFIX_BYTES or offset > limit:
        raise ValueError("no readable file meta (group 0002) after the DICM prefix")
    meta = content[PREFIX_BYTES:offset]
    return (
        content[:PREFIX_BYTES]
        + _GROUP_LENGTH_TAG
        + struct.pack("<I", len(meta))
        + meta
        + content[offset:]
    )
