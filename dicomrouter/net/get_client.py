"""C-GET SCU to one PACS: the instances come back on our own association (no Move Destination)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from pydicom import Dataset
from pynetdicom import build_role, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)

from dicomrouter.config import RouterSettings, ServerConfig, calling_ae_for
from dicomrouter.net.move_client import PENDING, MoveProgress, PeerMoveError, failed_uids
from dicomrouter.net.peer import PeerUnavailable, make_ae, open_association

PATIENT_ROOT_GET = str(PatientRootQueryRetrieveInformationModelGet)
STUDY_ROOT_GET = str(StudyRootQueryRetrieveInformationModelGet)
MESSAGE_ID = 1
MAX_STORAGE_CONTEXTS = 127  # 128 presentation contexts, one for the C-GET itself


def get_instances(
    server: ServerConfig,
    router: RouterSettings,
    query_model: str,
    identifier: Dataset,
    storage: Mapping[str, Sequence[str]],
    on_instance: Callable[[Dataset], int],
) -> MoveProgress:
    """C-GET from `server`, offering `storage` (SOP class -> transfer syntaxes) for the sub-operations.

    `on_instance` receives each instance (file meta included) and returns the C-STORE status.
    Raises PeerMoveError when the server cannot be reached or the exchange breaks.
    """
    storage_classes = list(storage.items())[:MAX_STORAGE_CONTEXTS]
    ae = make_ae(
        calling_ae_for(server, "move", router), router, [(query_model, []), *storage_classes]
    )
    roles = [build_role(sop_class, scp_role=True) for sop_class, _ in storage_classes]

    def store(event: Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        return on_instance(dataset)

    try:
        assoc = open_association(ae, server, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, store)])
    except PeerUnavailable as exc:
        raise PeerMoveError(exc.status, exc.reason) from None
    except OSError as exc:
        raise PeerMoveError("unreachable", str(exc)) from None
    clean = False
    try:
        for status, answer in assoc.send_c_get(identifier, query_model, msg_id=MESSAGE_ID):
            if "Status" not in status:
                raise PeerMoveError("aborted", f"{server.name} sent no answer (timeout or abort)")
            code = int(status.Status)
            if code in PENDING:
                continue
            clean = True
            return MoveProgress(
                code,
                completed=int(status.get("NumberOfCompletedSuboperations") or 0),
                failed=int(status.get("NumberOfFailedSuboperations") or 0),
                warning=int(status.get("NumberOfWarningSuboperations") or 0),
                failed_sop_uids=failed_uids(answer),
                comment=str(status.get("ErrorComment", "") or "").strip(),
            )
        raise PeerMoveError("aborted", f"{server.name} ended the C-GET without a final answer")
    finally:
        if assoc.is_established:
            assoc.release() if clean else assoc.abort()
