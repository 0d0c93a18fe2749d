"""C-GET SCU to one PACS: the instances come back on our own association (no Move Destination).

On the lean upper layer: each instance is handed on as the bytes the source sent, never decoded,
so the relay can pass it on as it is.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)

from dicomrouter.config import RouterSettings, ServerConfig
from dicomrouter.dul.dimse import us
from dicomrouter.dul.pdata import FileSlice
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
    MessageLimits,
    UpperLayerError,
    command_set,
)

log = get_logger(__name__)

PATIENT_ROOT_GET = str(PatientRootQueryRetrieveInformationModelGet)
STUDY_ROOT_GET = str(StudyRootQueryRetrieveInformationModelGet)
MAX_STORAGE_CONTEXTS = 127  # 128 presentation contexts, one for the C-GET itself
CANNOT_UNDERSTAND = 0xC211  # what pynetdicom answers when a C-STORE handler raises


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance of a C-GET, as encoded by the source (data set only, no file meta): in memory,
    or a large one in a file of the spill folder, which whoever takes the instance now owns."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes | FileSlice

    def write_to(self, handle: BinaryIO) -> None:
        """Copy the data set's bytes into an open file."""
        if isinstance(self.dataset, FileSlice):
            with open(self.dataset.path, "rb") as source:
                shutil.copyfileobj(source, handle, COPY_CHUNK)
        else:
            handle.write(self.dataset)

    def discard(self) -> None:
        """Remove the data set's spill file, if it has one."""
        if isinstance(self.dataset, FileSlice):
            self.dataset.path.unlink(missing_ok=True)


COPY_CHUNK = 1024 * 1024


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
    storage: Mapping[str, Sequence[str]] | Sequence[tuple[str, Sequence[str]]],
    on_instance: Callable[[ReceivedInstance], int],
    spill_folder: Path | None = None,
) -> MoveProgress:
    """C-GET from `server`, offering `storage` (SOP class -> transfer syntaxes, or (class, syntaxes)
    pairs, several contexts per class allowed) for the sub-operations.

    `on_instance` receives each instance and returns the C-STORE status to answer. A data set is
    capped at `router.max_dataset_size` (the association is aborted beyond it); with a
    `spill_folder`, one over `router.max_in_memory_dataset` is written there as it arrives.
    Raises PeerMoveError when the server cannot be reached or the exchange breaks.
    """
    pairs = storage.items() if isinstance(storage, Mapping) else storage
    storage_classes = [(sop, list(syntaxes)) for sop, syntaxes in pairs][:MAX_STORAGE_CONTEXTS]
    limits = MessageLimits(router.max_dataset_size, router.max_in_memory_dataset, spill_folder)
    link = open_retrieve_link(
        server,
        router,
        [(query_model, [EXPLICIT_VR_LE, IMPLICIT_VR_LE]), *storage_classes],
        scp_roles=list(dict.fromkeys(sop for sop, _ in storage_classes)),
        limits=limits,
    )
    clean = False
    try:
        retrieve_request(link, 0x0010, query_model, identifier)
        while True:
            try:
                messages = link.receive_messages(router.dimse_timeout_s)
            except TimeoutError:
                raise PeerMoveError(
                    "aborted", f"{server.name} sent no answer (timeout or abort)"
                ) from None
            except UpperLayerError as exc:
                raise PeerMoveError(
                    "aborted", f"{server.name} sent no answer ({exc.reason})"
                ) from None
            for message in messages:
                if message.command_field == 0x0001:  # C-STORE-RQ: a sub-operation
                    link.send_message(
                        message.context_id,
                        _store_response(message, _take(message, link, on_instance)),
                    )
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
        instance.discard()
        return CANNOT_UNDERSTAND
