"""C-FIND SCU to one PACS: answers as they arrive, one overall deadline, cancel from any thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from io import BytesIO

from pydicom import Dataset
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from dicomrouter.config import RouterSettings, ServerConfig, calling_ae_for
from dicomrouter.net.peer import PeerUnavailable, peer_tls_context
from dicomrouter.net.upper_layer import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    IMPLICIT_VR_LE,
    P_DATA_TF,
    Accepted,
    UpperLayer,
    UpperLayerError,
    associate_rq,
    command_set,
    parse_associate_ac,
    parse_command,
    pdvs,
    reject_text,
    us,
)

PATIENT_ROOT_FIND = str(PatientRootQueryRetrieveInformationModelFind)
STUDY_ROOT_FIND = str(StudyRootQueryRetrieveInformationModelFind)
WORKLIST_FIND = str(ModalityWorklistInformationFind)
FIND_MODELS = {PATIENT_ROOT_FIND: "patient", STUDY_ROOT_FIND: "study", WORKLIST_FIND: "worklist"}

PENDING = (0xFF00, 0xFF01)
CANCELLED = 0xFE00
MESSAGE_ID = 1
NO_DATASET = 0x0101
# A peer that ignores our C-CANCEL is given this long to finish before we stop waiting.
CANCEL_GRACE_S = 1.0
RELEASE_WAIT_S = 1.0


class PeerFindError(Exception):
    """The C-FIND to one peer did not complete; `kind` is a word for tables and counters."""

    def __init__(self, kind: str, reason: str):
        self.kind = kind  # unreachable | rejected | timeout | failed | aborted
        self.reason = reason
        super().__init__(f"{kind}: {reason}")


class PeerFind:
    """One C-FIND to one server: iterate `answers()`, then always `close()`; `cancel()` from
    any thread meanwhile."""

    def __init__(
        self,
        server: ServerConfig,
        router: RouterSettings,
        query_model: str,
        identifier: Dataset,
        timeout_s: float,
    ):
        self.server = server
        self.router = router
        self.query_model = query_model
        self.identifier = identifier
        self.timeout_s = timeout_s
        self.calling_ae = calling_ae_for(server, "find", router)
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._link: UpperLayer | None = None
        self._accepted: Accepted | None = None
        self._request_sent = False
        self._cancel_deadline = float("inf")
        self._clean = False  # the exchange ended properly: release rather than abort

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _receive(self, link: UpperLayer, deadline: float) -> tuple[int, bytes] | None:
        """The next PDU; None when cancelled and the grace ran out; PeerFindError otherwise."""
        if self.cancelled:
            deadline = min(deadline, self._cancel_deadline)
        try:
            return link.receive(deadline - time.monotonic())
        except TimeoutError:
            if self.cancelled:
                return None
            raise PeerFindError("timeout", f"no complete answer within {self.timeout_s:g} s") from None
        except UpperLayerError as exc:
            if self.cancelled:
                return None
            raise PeerFindError(exc.kind, exc.reason) from None

    def _associate(self, deadline: float) -> tuple[UpperLayer, Accepted]:
        try:
            tls_context = peer_tls_context(self.server)
        except PeerUnavailable as exc:
            raise PeerFindError(exc.status, exc.reason) from None
        try:
            link = UpperLayer(
                self.server.host,
                self.server.port,
                min(self.router.connect_timeout_s, deadline - time.monotonic()),
                tls_context,
            )
        except UpperLayerError as exc:
            raise PeerFindError(exc.kind, exc.reason) from None
        with self._lock:
            self._link = link
        try:
            link.send(associate_rq(self.calling_ae, self.server.ae_title, self.query_model, self.router.max_pdu_size))
        except OSError as exc:
            error = link.send_failure(exc)
            raise PeerFindError(error.kind, error.reason) from None
        pdu = self._receive(link, deadline)
        if pdu is None:
            raise PeerFindError("aborted", "cancelled while associating")
        pdu_type, body = pdu
        if pdu_type == A_ASSOCIATE_RJ:
            raise PeerFindError("rejected", reject_text(body))
        if pdu_type != A_ASSOCIATE_AC:
            raise PeerFindError("aborted", f"association refused (PDU type {pdu_type})")
        try:
            return link, parse_associate_ac(body)
        except UpperLayerError as exc:
            self._clean = True  # an established association: release it
            raise PeerFindError(exc.kind, exc.reason) from None

    def answers(self) -> Iterator[Dataset]:
        """Yield each pending identifier; raise PeerFindError when the peer fails or is too slow.

        Returns quietly after a cancel (answers that arrive after it are dropped). The
        association stays open until `close()`, so the caller can act on the last answer
        before paying for the release.
        """
        deadline = time.monotonic() + self.timeout_s
        link, accepted = self._associate(deadline)
        implicit = accepted.transfer_syntax == IMPLICIT_VR_LE
        request = command_set(
            [
                (0x0002, self.query_model.encode("ascii")),
                (0x0100, us(0x0020)),
                (0x0110, us(MESSAGE_ID)),
                (0x0700, us(0x0000)),  # medium priority
                (0x0800, us(0x0001)),
            ]
        )
        identifier = encode(self.identifier, implicit, True)
        if identifier is None:
            raise PeerFindError("failed", "cannot encode the query identifier")
        with self._lock:
            self._accepted = accepted
            if self.cancelled:
                self._clean = True
                return
            link.send_pdata(accepted.context_id, request, True, accepted.peer_max_pdu)
            link.send_pdata(accepted.context_id, identifier, False, accepted.peer_max_pdu)
            self._request_sent = True
        command, dataset = bytearray(), bytearray()
        command_done = False
        while True:
            pdu = self._receive(link, deadline)
            if pdu is None:
                return
            pdu_type, body = pdu
            if pdu_type != P_DATA_TF:
                what = "aborted by the peer" if pdu_type == A_ABORT else f"unexpected PDU type {pdu_type}"
                raise PeerFindError("aborted", what)
            for _context, header, fragment in pdvs(body):
                if header & 1:
                    command += fragment
                    command_done = bool(header & 2)
                else:
                    dataset += fragment
                if not command_done:
                    continue
                elements = parse_command(bytes(command))
                has_dataset = elements.get(0x0800, us(NO_DATASET)) != us(NO_DATASET)
                if has_dataset and not (header & 2 and not header & 1):
                    continue  # the identifier is still coming
                status = int.from_bytes(elements.get(0x0900, b"\xff\xff"), "little")
                answer = bytes(dataset) if has_dataset else None
                command, dataset, command_done = bytearray(), bytearray(), False
                if status in PENDING:
                    if answer is not None and not self.cancelled:
                        yield decode(BytesIO(answer), implicit, True)
                    continue
                if status in (0x0000, CANCELLED):
                    self._clean = True
                    return
                comment = elements.get(0x0902, b"").decode("latin-1").strip(" \x00")
                self._clean = True  # a refusal, not a broken association
                raise PeerFindError(
                    "failed", f"C-FIND status 0x{status:04X}" + (f" ({comment})" if comment else "")
                )

    def close(self) -> None:
        """Release the association after a complete exchange, abort it otherwise."""
        with self._lock:
            link, self._link = self._link, None
        if link is None or link.closed:
            return
        if not self._clean:
            link.abort()
            return
        try:
            link.send(bytes([A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
            deadline = time.monotonic() + RELEASE_WAIT_S
            while time.monotonic() < deadline:
                pdu_type, _ = link.receive(deadline - time.monotonic())
                if pdu_type in (A_RELEASE_RP, A_ABORT):
                    break
        except (OSError, UpperLayerError):
            pass
        link.close()

    def cancel(self) -> None:
        """Stop: send C-CANCEL if the request is out; the peer's final answer ends `answers()`."""
        with self._lock:
            if self.cancelled:
                return
            self._cancel_deadline = time.monotonic() + CANCEL_GRACE_S
            self._cancelled.set()
            link, accepted = self._link, self._accepted
            if link is None or accepted is None or not self._request_sent:
                return
            cancel = command_set([(0x0100, us(0x0FFF)), (0x0120, us(MESSAGE_ID)), (0x0800, us(NO_DATASET))])
            try:
                link.send_pdata(accepted.context_id, cancel, True, accepted.peer_max_pdu)
            except OSError:
                pass  # the association is going away anyway
