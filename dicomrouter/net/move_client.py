"""C-MOVE SCU to one PACS: progress as it comes, C-CANCEL from any thread.

On the lean upper layer (net/upper_layer.py): a move reports one response per instance, and
pynetdicom's two threads and command decoding per response slowed the source's own move.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import Dataset
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomrouter.config import RouterSettings, ServerConfig, calling_ae_for
from dicomrouter.dul.dimse import us
from dicomrouter.net.peer import PeerUnavailable, associate_with
from dicomrouter.net.upper_layer import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    NO_DATASET,
    Link,
    Message,
    MessageLimits,
    UpperLayerError,
    command_set,
)

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


def failed_uids(identifier: Dataset | None) -> list[str]:
    if identifier is None or "FailedSOPInstanceUIDList" not in identifier:
        return []
    value = identifier.FailedSOPInstanceUIDList
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value if v]


def open_retrieve_link(
    server: ServerConfig,
    router: RouterSettings,
    contexts: list[tuple[str, list[str]]],
    scp_roles: list[str] | tuple[str, ...] = (),
    limits: MessageLimits | None = None,
) -> Link:
    """An association for C-MOVE or C-GET to `server` (over TLS when it has a `tls:` block), or
    PeerMoveError saying why not. `limits`: what its messages may carry (default: identifiers)."""
    try:
        return associate_with(
            server,
            router,
            calling_ae_for(server, "move", router),
            contexts,
            limits=limits,
            scp_roles=scp_roles,
        )
    except PeerUnavailable as exc:
        raise PeerMoveError(exc.status, exc.reason) from None


class ModelNotAccepted(PeerMoveError):
    """The peer refused the presentation context of the query/retrieve model (it does not offer
    that service, e.g. a PACS without C-GET)."""


def retrieve_request(
    link: Link,
    command_field: int,
    query_model: str,
    identifier: Dataset,
    *extra,
    message_id: int = MESSAGE_ID,
) -> int:
    """Send a C-MOVE or C-GET request on `link`; returns its context ID."""
    context_id = link.context_for(query_model)
    if context_id is None:
        raise ModelNotAccepted(
            "rejected", f"the peer accepted no presentation context for {query_model}"
        )
    implicit = link.contexts[context_id][1] == IMPLICIT_VR_LE
    encoded = encode(identifier, implicit, True)
    if encoded is None:
        raise PeerMoveError("failed", "cannot encode the retrieve identifier")
    command = command_set(
        [
            (0x0002, query_model.encode("ascii")),
            (0x0100, us(command_field)),
            (0x0110, us(message_id)),
            *extra,
            (0x0700, us(0x0000)),  # medium priority
            (0x0800, us(0x0001)),
        ]
    )
    link.send_message(context_id, command, encoded)
    return context_id


def retrieve_response(message: Message, link: Link) -> MoveProgress:
    """A C-MOVE-RSP or C-GET-RSP as MoveProgress."""
    failed: list[str] = []
    if isinstance(message.dataset, bytes) and message.status not in PENDING:
        implicit = link.contexts.get(message.context_id, ("", IMPLICIT_VR_LE))[1] == IMPLICIT_VR_LE
        try:
            failed = failed_uids(decode(BytesIO(message.dataset), implicit, True))
        except Exception:
            failed = []  # the counts still tell
    return MoveProgress(
        message.status,
        remaining=message.us(0x1020),
        completed=message.us(0x1021),
        failed=message.us(0x1022),
        warning=message.us(0x1023),
        failed_sop_uids=failed,
        comment=message.text(0x0902),
    )


def send_cancel(link: Link, context_id: int, message_id: int = MESSAGE_ID) -> None:
    """C-CANCEL for our request (a peer may ignore it; its final answer still ends the exchange)."""
    cancel = command_set([(0x0100, us(0x0FFF)), (0x0120, us(message_id)), (0x0800, us(NO_DATASET))])
    try:
        link.send_message(context_id, cancel)
    except OSError:
        pass  # the association is going away anyway


class PeerMove:
    """One C-MOVE to one server: iterate `progress()`, `cancel()` from any thread."""

    def __init__(
        self,
        server: ServerConfig,
        router: RouterSettings,
        query_model: str,
        identifier: Dataset,
        message_id: int = MESSAGE_ID,
    ):
        self.message_id = message_id  # the sub-operations' Move Originator Message ID
        self.server = server
        self.router = router
        self.query_model = query_model
        self.identifier = identifier
        self.calling_ae = calling_ae_for(server, "move", router)
        self._lock = threading.Lock()
        self._link: Link | None = None
        self._context_id: int | None = None
        self._cancelled = False

    def progress(self, move_destination_ae: str) -> Iterator[MoveProgress]:
        """Yield every response of the source, the final one last; raise PeerMoveError."""
        link = open_retrieve_link(
            self.server, self.router, [(self.query_model, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])]
        )
        clean = False
        try:
            with self._lock:
                self._link = link
                if self._cancelled:
                    clean = True
                    cancelled = MoveProgress(
                        CANCELLED, comment="cancelled before the request was sent"
                    )
                else:
                    cancelled = None
                    destination = move_destination_ae.encode("ascii")[:16].ljust(16, b" ")
                    self._context_id = retrieve_request(
                        link,
                        0x0021,
                        self.query_model,
                        self.identifier,
                        (0x0600, destination),
                        message_id=self.message_id,
                    )
            if cancelled is not None:
                yield cancelled
                return
            while True:
                try:
                    messages = link.receive_messages(self.router.dimse_timeout_s)
                except TimeoutError:
                    raise PeerMoveError(
                        "aborted", f"{self.server.name} sent no answer (timeout or abort)"
                    ) from None
                except UpperLayerError as exc:
                    raise PeerMoveError(
                        "aborted", f"{self.server.name} sent no answer ({exc.reason})"
                    ) from None
                for message in messages:
                    if message.command_field != 0x8021:
                        continue
                    progress = retrieve_response(message, link)
                    if not progress.pending:
                        clean = True
                    yield progress
                    if not progress.pending:
                        return
        except OSError as exc:
            raise PeerMoveError("aborted", f"{self.server.name}: connection lost ({exc})") from None
        finally:
            with self._lock:
                self._link = None
            if clean:
                link.release()
            else:
                link.abort()

    def cancel(self) -> None:
        """Pass a C-CANCEL on to the source (the source's final answer ends `progress()`)."""
        with self._lock:
            self._cancelled = True
            link, context_id = self._link, self._context_id
        if link is None or context_id is None or link.closed:
            return
        send_cancel(link, context_id, self.message_id)
