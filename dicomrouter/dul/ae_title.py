"""The AE title rule, apart from the PDU codec so that loading the config does not import the codec."""

from __future__ import annotations


def ae_title_problem(value: object) -> str | None:
    """Why `value` is not a valid AE title, or None (PS3.5 6.2, AE VR): 1 to 16 characters of printable
    ASCII without backslash, not all spaces. The one rule for every path: DICOM, HTTP user names, config."""
    if not isinstance(value, str):
        return f"{value!r} is not text"
    if not 1 <= len(value) <= 16:
        return f"{value!r} has {len(value)} characters; an AE title has 1 to 16"
    if not value.strip(" "):
        return "an AE title cannot be all spaces"
    if "\\" in value:
        return f"{value!r} contains a backslash"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return f"{value!r} contains control characters"
    if any(ord(ch) > 126 for ch in value):
        return f"{value!r} contains non-ASCII characters"
    return None
