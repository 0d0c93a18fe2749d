"""The one refusal type of the DICOMweb services; the routes turn it into the HTTP answer."""

from __future__ import annotations


class DicomWebError(Exception):
    def __init__(self, status: int, message: str, warnings: list[str] | None = None):
        self.status = status
        self.message = message
        self.warnings = list(warnings or [])
        super().__init__(message)
