"""C-MOVE SCU to one PACS: progress as it comes, C-CANCEL from any thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydicom import Dataset
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomrouter.config import RouterSettings, ServerConfig, calling_ae_for
from dicomrouter.net.peer import PeerUnavailable, make_ae, open_association

PATIENT_ROOT_MOVE = str(PatientRootQueryRetrieveInformationModelMove)
STUDY_ROOT_MOVE = str(StudyRootQueryRetrieveInformationModelMove)
MESSAGE_ID = 1
PENDING = (0xFF00, 0xFF01)
CANCELLED = 0xFE00


class PeerMoveError(Exception):
    """The C-MOVE to one server did not complete; `kind`: unreachable | rejected | aborted."""

    def __init__(self, kind: str, reason: str):
        self.kind = kind
        self.reason = reason
        super().__init__(f"{kind}: {reason}")


@dataclass
class MoveProgress:
    """One C-MOVE response from a source: its status and sub-operation counts."""

    status: int
    remaining: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_sop_uids: list[str] = field(default_factory=list)
    comment: str = ""

    @property
    def pending(self) -> bool:
        return self.status in PENDING


def _count(status: Dataset, keyword: str) -> int:
    value = status.get(keyword)
    return int(value) if value is not None and value != "" else 0


def failed_uids(identifier: Dataset | None) -> list[str]:
    if identifier is None or "FailedSOPInstanceUIDList" not in identifier:
        return []
    value = identifier.FailedSOPInstanceUIDList
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value if v]


class PeerMove:
    """One C-MOVE to one server: iterate `progress()`, `cancel()` from any thread."""

    def __init__(
        self, server: ServerConfig, router: RouterSettings, query_model: str, identifier: Dataset
    ):
        self.server = server
        self.router = router
        self.query_model = query_model
        self.identifier = identifier
        self.calling_ae = calling_ae_for(server, "move", router)
        self._lock = threading.Lock()
        self._assoc: Association | None = None
        self._cancelled = False

    def progress(self, move_destination_ae: str) -> Iterator[MoveProgress]:
        """Yield every response of the source, the final one last; raise PeerMoveError."""
        ae = make_ae(self.calling_ae, self.router, [(self.query_model, [])])
        try:
            assoc = open_association(ae, self.server)
        except PeerUnavailable as exc:
            raise PeerMoveError(exc.status, exc.reason) from None
        except OSError as exc:
            raise PeerMoveError("unreachable", str(exc)) from None
        with self._lock:
            self._assoc = assoc
            cancelled = self._cancelled
        clean = False
        try:
            if cancelled:
                clean = True
                yield MoveProgress(CANCELLED, comment="cancelled before the request was sent")
                return
            responses = assoc.send_c_move(
                self.identifier, move_destination_ae, self.query_model, msg_id=MESSAGE_ID
            )
            for status, identifier in responses:
                if "Status" not in status:
                    raise PeerMoveError(
                        "aborted", f"{self.server.name} sent no answer (timeout or abort)"
                    )
                progress = MoveProgress(
                    int(status.Status),
                    remaining=_count(status, "NumberOfRemainingSuboperations"),
                    completed=_count(status, "NumberOfCompletedSuboperations"),
                    failed=_count(status, "NumberOfFailedSuboperations"),
                    warning=_count(status, "NumberOfWarningSuboperations"),
                    failed_sop_uids=failed_uids(identifier),
                    comment=str(status.get("ErrorComment", "") or "").strip(),
                )
                if not progress.pending:
                    clean = True
                yield progress
                if not progress.pending:
                    return
            raise PeerMoveError(
                "aborted", f"{self.server.name} ended the C-MOVE without a final answer"
            )
        finally:
            with self._lock:
                self._assoc = None
            if assoc.is_established:
                assoc.release() if clean else assoc.abort()

    def cancel(self) -> None:
        """Pass a C-CANCEL on to the source (the source's final answer ends `progress()`)."""
        with self._lock:
            self._cancelled = True
            assoc = self._assoc
        if assoc is None or not assoc.is_established:
            return
        try:
            assoc.send_c_cancel(MESSAGE_ID, query_model=self.query_model)
        except (RuntimeError, ValueError, OSError):
            pass  # the association is going away anyway
