"""Every C-FIND answer says where a study is: teach the catalog, one batch per server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from pydicom import Dataset

from dicomrouter.logging import get_logger
from dicomrouter.net.encoding import RawAnswer

log = get_logger(__name__)

STUDY_INSTANCE_UID = 0x0020000D
# What a C-FIND answer can tell the catalog about a study (catalog.upserts.ensure_study reads these).
STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "StudyDate",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "Modality",
)


def study_attributes(answer: Dataset) -> dict[str, object] | None:
    """The study facts in one answer (any level below PATIENT), or None without a study UID."""
    uid = str(answer.get("StudyInstanceUID", "") or "").strip()
    if not uid:
        return None
    attrs: dict[str, object] = {}
    for keyword in STUDY_KEYWORDS:
        value = answer.get(keyword)
        if value is not None and str(value).strip():
            attrs[keyword] = value if keyword in ("ModalitiesInStudy", "Modality") else str(value)
    modalities = {str(v) for key in ("ModalitiesInStudy", "Modality") for v in _values(attrs.pop(key, None))}
    if modalities:  # a series answer's modality belongs to its study's set
        attrs["ModalitiesInStudy"] = sorted(modalities)
    return attrs


def _values(value: object) -> list[object]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]


class RecentlyLearned:
    """(server, study) pairs written lately. A workstation repeating a query must not cost
    hundreds of catalog writes each time: the catalog's last_seen is refreshed at most every
    `refresh_s` per pair (the writes share the GIL with the answers being sent)."""

    def __init__(self, refresh_s: float = 300.0, max_entries: int = 200_000):
        self.refresh_s = refresh_s
        self.max_entries = max_entries
        self._written: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def claim(self, server_name: str, study_uid: str) -> bool:
        """True when the pair is due a write (and is now counted as written)."""
        now = time.monotonic()
        key = (server_name, study_uid)
        with self._lock:
            if now - self._written.get(key, -1e18) < self.refresh_s:
                return False
            if len(self._written) >= self.max_entries:
                self._written.clear()
            self._written[key] = now
            return True


# Studies written per transaction: `before_write` runs between them.
LEARN_BATCH = 20


def learn_from_answers(
    catalog,
    answers: Sequence[tuple[str, RawAnswer]],
    recent: RecentlyLearned | None = None,
    before_write: Callable[[], None] | None = None,
) -> None:
    """Record 'server holds study' (learned by find) for every answer; never raises.

    `before_write` is called before each batch (the federation waits there for a quiet moment).
    """
    per_server: dict[str, dict[str, dict[str, object]]] = {}
    for server_name, answer in answers:
        try:
            uid = answer.text(STUDY_INSTANCE_UID)
            # Claim before decoding the rest: a repeated query skips nearly every answer here.
            if not uid or (
                recent is not None
                and uid not in per_server.get(server_name, {})
                and not recent.claim(server_name, uid)
            ):
                continue
            attrs = study_attributes(answer.dataset())
        except Exception:  # an undecodable answer teaches nothing
            continue
        if attrs is None:
            continue
        studies = per_server.setdefault(server_name, {})
        known = studies.setdefault(uid, attrs)
        if known is not attrs:  # several series of one study: first facts, all modalities
            modalities = set(known.get("ModalitiesInStudy", [])) | set(attrs.get("ModalitiesInStudy", []))  # type: ignore[call-overload]
            for keyword, value in attrs.items():
                known.setdefault(keyword, value)
            if modalities:
                known["ModalitiesInStudy"] = sorted(modalities)
    for server_name, studies in per_server.items():
        rows = list(studies.values())
        for start in range(0, len(rows), LEARN_BATCH):
            if before_write is not None:
                before_write()
            try:
                catalog.record_studies_seen(server_name, "found", rows[start : start + LEARN_BATCH])
            except Exception as exc:
                log.warning("find_catalog_failed", server=server_name, studies=len(rows), error=str(exc))
                break
