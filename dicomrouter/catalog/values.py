"""Turn DICOM attribute values (pydicom types or plain text) into catalog column values."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime
from typing import Any


def text(value: Any) -> str | None:
    """Stripped text, multi-values joined with a backslash; None when absent or empty."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = "\\".join(str(v) for v in value)
    cleaned = str(value).strip(" \x00\t\r\n")
    return cleaned or None


def dicom_date(value: Any) -> date | None:
    """A DA value (YYYYMMDD, or the old YYYY.MM.DD) as a date; None when absent or invalid."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    raw = text(value)
    if raw is None:
        return None
    digits = raw.replace(".", "").replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def integer(value: Any) -> int | None:
    """An IS value as an int; None when absent or not a number."""
    raw = text(value)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        try:
            return int(float(raw))
        except (ValueError, OverflowError):
            return None


def modality_set(value: Any) -> set[str]:
    """The modalities in a Modality or ModalitiesInStudy value."""
    raw = text(value)
    if raw is None:
        return set()
    return {part.strip() for part in raw.split("\\") if part.strip()}


def join_modalities(modalities: Iterable[str]) -> str | None:
    """Modalities as stored in studies.modalities: sorted, backslash-separated."""
    joined = "\\".join(sorted(set(modalities)))
    return joined or None
