"""The layout of a DICOM file (PS3.10): where its data set starts, read from the bytes, nothing decoded."""

from __future__ import annotations

_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def dataset_offset(content: bytes) -> int:
    """Where the data set starts in a DICOM file: after the preamble, 'DICM' and the group 0002
    elements (always explicit VR little endian, PS3.10 7.1)."""
    if content[128:132] != b"DICM":
        raise ValueError("not a DICOM file (no DICM prefix at byte 128)")
    offset = 132
    if content[132:136] == b"\x02\x00\x00\x00" and content[136:138] == b"UL":
        # (0002,0000) File Meta Information Group Length: the meta ends where it says.
        return 144 + int.from_bytes(content[140:144], "little")
    while offset + 8 <= len(content):
        group = int.from_bytes(content[offset : offset + 2], "little")
        if group != 0x0002:
            return offset
        vr = content[offset + 4 : offset + 6]
        if vr in _LONG_LENGTH_VRS:
            length = int.from_bytes(content[offset + 8 : offset + 12], "little")
            offset += 12 + length
        else:
            length = int.from_bytes(content[offset + 6 : offset + 8], "little")
            offset += 8 + length
    return offset
