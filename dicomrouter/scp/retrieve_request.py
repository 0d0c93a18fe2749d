"""What C-MOVE and C-GET requests share: identifier checks and where to retrieve from."""

from __future__ import annotations

from pydicom import Dataset

from dicomrouter.catalog.queries import Catalog
from dicomrouter.config import Config
from dicomrouter.retrieve.plan import SourcePlan, plan_retrieve
from dicomrouter.routing.access import Caller

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
    config: Config, catalog: Catalog | None, caller: Caller, identifier: Dataset, query_model: str
) -> tuple[list[SourcePlan], dict[str, str]]:
    """(servers to retrieve from with what to take from each, servers that could not be asked)."""
    plan = plan_retrieve(config, catalog, caller, identifier, query_model)
    return plan.sources, plan.unreachable
