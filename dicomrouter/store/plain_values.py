"""Header values as the router keeps them (str, or a list of str for a multi-valued element), and
the same straight from an element's bytes for the plain VRs.

pydicom builds an object per value (UID, PersonName, IS, DSfloat, MultiValue) that the header only
turns back into str: for the dozen values read per C-STORE that cost more than walking the whole
instance. `plain_from_bytes` gives what `plain_value` of pydicom's converted value gives (pydicom 3,
default settings, which the walk requires anyway), for the usual value; anything it is not sure
of (non-ASCII bytes, escape sequences, text that depends on a character set that may not decode
ASCII as ASCII, an IS or DS that is not a plain number) raises NotPlain and pydicom converts it.
"""

from __future__ import annotations

import re
from struct import Struct
from typing import Any

from pydicom import config as pydicom_config


class NotPlain(Exception):
    """pydicom must convert this value."""


def plain_value(value: Any) -> str | list[str] | None:
    """A value pydicom converted, as the header keeps it; None when absent or empty."""
    if value is None or value == "":  # pydicom's empty values, and a PersonName, IS or DS of ""
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return str(value)


# pydicom decodes these with the data set's character set; every other text VR is read as ISO 8859-1.
CHARSET_VRS = frozenset({"PN", "SH", "LO", "UC", "ST", "LT", "UT"})
ESC = b"\x1b"  # starts an ISO 2022 escape sequence, which pydicom's decoding honours

# Numbers int() and float() parse, with only spaces around them (which both and str.strip() skip
# alike; not so other whitespace): ASCII digits, no underscores, no more digits than a float holds
# exactly (IS() compares the two).
_INTEGER = re.compile(r" *[+-]?[0-9]{1,15} *")
_DECIMAL = re.compile(r" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *")

_NUMBERS = {
    vr: Struct("<" + code)
    for vr, code in {
        "US": "H",
        "SS": "h",
        "UL": "I",
        "SL": "i",
        "UV": "Q",
        "SV": "q",
        "FL": "f",
        "FD": "d",
    }.items()
}


def plain_from_bytes(vr: str, value: bytes, ascii_charset: bool) -> str | list[str] | None:
    """`plain_value` of what pydicom converts `value` (little endian) to with `vr`, without pydicom.

    ascii_charset: pydicom decodes the data set's text without escape sequences as ASCII where its
    bytes are ASCII (the walk's ASCII_ENCODINGS: no Specific Character Set, ISO_IR 100, ISO_IR 192, ...).
    Raises NotPlain when pydicom must decide.
    """
    if not value:
        return None  # pydicom's empty value for the VR ("", PersonName(""), None)
    number = _NUMBERS.get(vr)
    if number is not None:
        if len(value) % number.size:
            raise NotPlain  # pydicom refuses it (the walk does not vouch for such an instance)
        if len(value) == number.size:
            return str(number.unpack(value)[0])
        return [str(item) for (item,) in number.iter_unpack(value)]
    convert = _TEXT.get(vr)
    if convert is None or not value.isascii():
        raise NotPlain
    if vr in CHARSET_VRS and (not ascii_charset or ESC in value):
        raise NotPlain
    values = convert(value.decode("ascii"))
    if isinstance(values, str):
        return values or None
    if len(values) == 1:
        return values[0] or None
    return values


# Each mirrors pydicom's converter for the VR (pydicom.values) and the str() of what it builds; a
# single value may come back as a str or a one-item list.


def _string(text: str) -> list[str]:
    """CS, AS, DA, DT, TM (convert_string): padding off the end of the whole value only."""
    return text.rstrip(" \0").split("\\")


def _text(text: str) -> list[str]:
    """SH, LO, UC (convert_text): trailing spaces and NULs off each value."""
    return [item.rstrip("\0 ") for item in text.split("\\")]


def _single_text(text: str) -> str:
    """ST, LT, UT (convert_single_string): one value, backslashes included."""
    return text.rstrip("\0 ")


def _application_entity(text: str) -> list[str]:
    """AE: leading and trailing whitespace off each value, NULs kept."""
    return [item.strip() for item in text.split("\\")]


def _uid(text: str) -> list[str]:
    """UI: padding off the whole value, whitespace off each UID (UID() strips)."""
    return [item.strip() for item in text.rstrip("\0 ").split("\\")]


def _uri(text: str) -> str:
    """UR: one value, trailing whitespace off."""
    return text.rstrip()


def _person_name(text: str) -> list[str]:
    """PN: padding off the whole value; a PersonName drops its empty trailing component groups."""
    return [item.rstrip("=") for item in text.rstrip("\0 ").split("\\")]


def _integer_string(text: str) -> list[str]:
    """IS: str() of an IS is its text stripped; a blank one stays as it is (IS() returns it)."""
    values = []
    for item in text.rstrip(" \0").split("\\"):
        stripped = item.strip()
        if stripped and not _INTEGER.fullmatch(item):
            raise NotPlain  # "1.0", an overflow, garbage: pydicom's IS, ISfloat or retry decides
        values.append(stripped if stripped else item)
    return values


def _decimal_string(text: str) -> list[str]:
    """DS: the whole value stripped first; str() of a DSfloat is its text stripped, a blank one stays."""
    if pydicom_config.use_DS_decimal:
        raise NotPlain
    values = []
    for item in text.strip().rstrip(" \0").split("\\"):
        stripped = item.strip()
        if stripped and not _DECIMAL.fullmatch(item):
            raise NotPlain  # float() might refuse it: pydicom's retry decides
        values.append(stripped if stripped else item)
    return values


_TEXT = {
    "AE": _application_entity,
    "AS": _string,
    "CS": _string,
    "DA": _string,
    "DT": _string,
    "TM": _string,
    "UI": _uid,
    "SH": _text,
    "LO": _text,
    "UC": _text,
    "ST": _single_text,
    "LT": _single_text,
    "UT": _single_text,
    "UR": _uri,
    "PN": _person_name,
    "IS": _integer_string,
    "DS": _decimal_string,
}
