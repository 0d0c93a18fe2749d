"""C-GET SCU to one PACS: the instances come back on our own association (no Move Destination).

On the lean upper layer: each instance is handed on as the bytes the source sent, never decoded,
so the relay can pass it on as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)

from dicomrouter.config import RouterSettings, ServerConfig
from dicomrouter.logging import get_logger
from dicomrouter.net.move_client import (
    MoveProgress,
    PeerMoveError,
    open_retrieve_link,
    retrieve_request,
    retrieve_response,
)
from dicomrouter.net.upper_layer import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    NO_DATASET,
    Message,
    UpperLayerError,
    command_set,
    us,
)

log = get_logger(__name__)

PATIENT_ROOT_GET = str(PatientRootQueryRetrieveInformationModelGet)
STUDY_ROOT_GET = str(StudyRootQueryRetrieveInformationModelGet)
MAX_STORAGE_CONTEXTS = 127  # 128 presentation contexts, one for the C-GET itself
CANNOT_UNDERSTAND = 0xC211  # what pynetdicom answers when a C-STORE handler raises


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance of a C-GET, as encoded by the source (data set only, no file meta)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes

    def decoded(self) -> Dataset:
        """The instance as a pydicom Dataset with its file meta."""
        syntax = self.transfer_syntax
        dataset = decode(
            BytesIO(self.dataset),
            syntax == IMPLICIT_VR_LE,
            syntax != ExplicitVRBigEndian,
            syntax == DeflatedExplicitVRLittleEndian,
        )
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.MediaStorageSOPClassUID = self.sop_class_uid
        dataset.file_meta.MediaStorageSOPInstanceUID = self.sop_instance_uid
        dataset.file_meta.TransferSyntaxUID = syntax
        return dataset


def _store_response(request: Message, status: int) -> bytes:
    return command_set(
        [
            (0x0002, request.command.get(0x0002, b"")),
            (0x0100, us(0x8001)),
            (0x0120, request.command.get(0x0110, us(0))),
            (0x0800, us(NO_DATASET)),
            (0x0900, us(status)),
            (0x1000, request.command.get(0x1000, b"")),
        ]
    )


def get_instances(
    server: ServerConfig,
    router: RouterSettings,
    query_model: str,
    identifier: Dataset,
    storage: Mapping[str, Sequence[str]],
    on_instance: Callable[[ReceivedInstance], int],
) -> MoveProgress:
    """C-GET from `server`, offering `storage` (SOP class -> transfer syntaxes) for the sub-operations.

    `on_instance` receives each instance and returns the C-STORE status to answer.
    Raises PeerMoveError when the server cannot be reached or the exchange breaks.
    """
    storage_classes = [(sop, list(syntaxes)) for sop, syntaxes in storage.items()][:MAX_STORAGE_CONTEXTS]
    link = open_retrieve_link(
        server,
        router,
        [(query_model, [EXPLICIT_VR_LE, IMPLICIT_VR_LE]), *storage_classes],
        scp_roles=[sop for sop, _ in storage_classes],
    )
    clean = False
    try:
        retrieve_request(link, 0x0010, query_model, identifier)
        while True:
            try:
                messages = link.receive_messages(router.dimse_timeout_s)
            except TimeoutError:
                raise PeerMoveError("aborted", f"{server.name} sent no answer (timeout or abort)") from None
            except UpperLayerError as exc:
                raise PeerMoveError("aborted", f"{server.name} sent no answer ({exc.reason})") from None
            for message in messages:
                if message.command_field == 0x0001:  # C-STORE-RQ: a sub-operation
                    link.send_message(message.context_id, _store_response(message, _take(message, link, on_instance)))
                elif message.command_field == 0x8010:  # C-GET-RSP
                    progress = retrieve_response(message, link)
                    if not progress.pending:
                        clean = True
                        return progress
    except OSError as exc:
        raise PeerMoveError("aborted", f"{server.name}: connection lost ({exc})") from None
    finally:
        if clean:
            link.release()
        else:
            link.abort()


def _take(message: Message, link, on_instance: Callable[[ReceivedInstance], int]) -> int:
    """Hand one C-STORE sub-operation to `on_instance`; its status, or a failure if it raised."""
    instance = ReceivedInstance(
        message.text(0x0002),
        message.text(0x1000),
        link.contexts.get(message.context_id, ("", IMPLICIT_VR_LE))[1],
        message.dataset or b"",
    )
    try:
        return on_instance(instance)
    except Exception:
        log.exception("get_instance_handler_failed", sop_uid=instance.sop_instance_uid)
        return CANNOT_UNDERSTAND
