"""The status data set a DIMSE handler answers with."""

from __future__ import annotations

from pydicom import Dataset


def status_dataset(status: int, comment: str = "") -> Dataset:
    """(0000,0900) Status, with (0000,0902) Error Comment (LO: at most 64 characters) when given."""
    result = Dataset()
    result.Status = status
    if comment:
        result.ErrorComment = comment[:64]
    return result
