"""What C-MOVE and C-GET requests share: identifier checks and where to retrieve from."""

from __future__ import annotations

from pydicom import Dataset

from dicomrouter.catalog.queries import Catalog
from dicomrouter.config import Config, ServerConfig
from dicomrouter.retrieve.locate import locate_study
from dicomrouter.routing.access import Caller, may_read

PENDING = 0xFF00
IDENTIFIER_MISMATCH = 0xA900
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")


class MoveRefused(Exception):
    def __init__(self, status: int, comment: str):
        self.status = status
        self.comment = comment
        super().__init__(comment)


def check_retrieve_identifier(identifier: Dataset, study_root: bool) -> tuple[str, str | None]:
    """(level, study UID or None at PATIENT level) of a C-MOVE or C-GET, or MoveRefused 0xA900."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS or (level == "PATIENT" and study_root):
        raise MoveRefused(IDENTIFIER_MISMATCH, f"invalid QueryRetrieveLevel {level!r}")
    study_uid = str(identifier.get("StudyInstanceUID", "") or "").strip() or None
    if level != "PATIENT" and study_uid is None:
        raise MoveRefused(IDENTIFIER_MISMATCH, "StudyInstanceUID is required")
    if study_uid and "\\" in study_uid:
        raise MoveRefused(IDENTIFIER_MISMATCH, "move one study at a time")
    return level, study_uid


def retrieve_sources(
    config: Config, catalog: Catalog | None, caller: Caller, study_uid: str | None
) -> tuple[list[ServerConfig], dict[str, str]]:
    """(servers to retrieve from, servers that could not be asked) for a C-MOVE or C-GET."""
    readable = lambda server: may_read(caller, server)  # noqa: E731
    if study_uid is None:  # PATIENT level: every server the caller may read
        return [s for s in config.usable_servers() if readable(s)], {}
    location = locate_study(config, catalog, study_uid, readable)
    return location.sources, location.unreachable
