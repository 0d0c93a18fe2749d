"""C-FIND SCU to one PACS: answers as they arrive, one overall deadline, cancel from any thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from pydicom import Dataset
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from dicomrouter.config import RouterSettings, ServerConfig, calling_ae_for
from dicomrouter.dul.dimse import us
from dicomrouter.net.encoding import RawAnswer
from dicomrouter.net.link_pool import LinkPool
from dicomrouter.net.peer import PeerUnavailable, peer_tls_context
from dicomrouter.net.upper_layer import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    Link,
    UpperLayerError,
    command_set,
    open_link,
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


class _StaleLink(Exception):
    """A reused association failed before its first answer: the PACS had dropped it."""


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
        pool: LinkPool | None = None,
    ):
        self.server = server
        self.router = router
        self.query_model = query_model
        self.identifier = identifier
        self.timeout_s = timeout_s
        self.calling_ae = calling_ae_for(server, "find", router)
        # Associations are reused (see link_pool.py) except over TLS (a context per association).
        self.pool = pool if server.tls is None else None
        self._pool_key = (
            server.host,
            server.port,
            server.ae_title,
            self.calling_ae,
            query_model,
            router.max_pdu_size,
        )
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._link: Link | None = None
        self._context_id = 0
        self._request_sent = False
        self._cancel_deadline = float("inf")
        self._clean = False  # the exchange ended properly: release rather than abort
        self._complete = False  # ... with Success: the association may serve the next query

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _associate(self, deadline: float, reuse: bool) -> tuple[Link, bool]:
        """(link, reused): an idle association from the pool when `reuse`, else a new one."""
        link = self.pool.take(self._pool_key) if reuse and self.pool is not None else None
        if link is not None:
            with self._lock:
                self._link = link
            return link, True
        try:
            tls_context = peer_tls_context(self.server)
        except PeerUnavailable as exc:
            raise PeerFindError(exc.status, exc.reason) from None
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            link = open_link(
                self.server.host,
                self.server.port,
                self.calling_ae,
                self.server.ae_title,
                [(self.query_model, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])],
                self.router.max_pdu_size,
                min(self.router.connect_timeout_s, remaining),
                remaining,
                tls_context=tls_context,
                send_timeout_s=self.timeout_s,
            )
        except UpperLayerError as exc:
            raise PeerFindError(exc.kind, exc.reason) from None
        with self._lock:
            self._link = link
        return link, False

    def answers(self) -> Iterator[Dataset]:
        """Yield each pending identifier; raise PeerFindError when the peer fails or is too slow.

        See `raw_answers`; this reads each one with pydicom.
        """
        for answer in self.raw_answers():
            yield answer.dataset()

    def raw_answers(self, associated: Callable[[], None] | None = None) -> Iterator[RawAnswer]:
        """Yield each pending identifier as the peer encoded it; raise PeerFindError as `answers`.

        `associated` is called once the association is established, before the request is sent.

        Returns quietly after a cancel (answers that arrive after it are dropped). The
        association stays open until `close()`, so the caller can act on the last answer
        before paying for the release.
        """
        deadline = time.monotonic() + self.timeout_s
        link, reused = self._associate(deadline, reuse=True)
        try:
            yield from self._exchange(link, deadline, associated, reused)
        except _StaleLink:
            # The PACS dropped the idle association meanwhile; nothing was answered on it yet.
            link.abort()
            link, _ = self._associate(deadline, reuse=False)
            yield from self._exchange(link, deadline, None, False)

    def _exchange(
        self, link: Link, deadline: float, associated: Callable[[], None] | None, reused: bool
    ) -> Iterator[RawAnswer]:
        """The request and its answers on `link`; _StaleLink when a `reused` one fails before any."""
        context_id = link.context_for(self.query_model)
        if context_id is None:
            self._clean = True  # an established association: release it
            raise PeerFindError(
                "rejected", f"the peer accepted no presentation context for {self.query_model}"
            )
        implicit = link.contexts[context_id][1] == IMPLICIT_VR_LE
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
        if associated is not None:
            associated()
        with self._lock:
            self._context_id = context_id
            if self.cancelled:
                self._clean = True
                return
            try:
                link.send_message(context_id, request, identifier)
            except OSError:
                if reused:
                    raise _StaleLink() from None
                raise
            self._request_sent = True
        heard = False
        while True:
            if self.cancelled:
                deadline = min(deadline, self._cancel_deadline)
            try:
                messages = link.receive_messages(deadline - time.monotonic())
            except TimeoutError:
                if self.cancelled:
                    return
                raise PeerFindError(
                    "timeout", f"no complete answer within {self.timeout_s:g} s"
                ) from None
            except UpperLayerError as exc:
                if self.cancelled:
                    return
                if reused and not heard:
                    raise _StaleLink() from None
                raise PeerFindError(exc.kind, exc.reason) from None
            for message in messages:
                heard = True
                if message.command_field != 0x8020:
                    continue
                status = message.status
                if status in PENDING:
                    if isinstance(message.dataset, bytes) and not self.cancelled:
                        yield RawAnswer(message.dataset, implicit)
                    continue
                self._clean = True  # the exchange is over, whatever its outcome
                self._complete = status == 0x0000 and not self.cancelled
                if status in (0x0000, CANCELLED):
                    return
                comment = message.text(0x0902)
                raise PeerFindError(
                    "failed", f"C-FIND status 0x{status:04X}" + (f" ({comment})" if comment else "")
                )

    def close(self) -> None:
        """Keep the association for the next query after a complete exchange (when pooled),
        release it after any other proper ending, abort it otherwise."""
        with self._lock:
            link, self._link = self._link, None
        if link is None or link.closed:
            return
        if self._complete and self.pool is not None:
            self.pool.give(self._pool_key, link, self.router.find_keepalive_s)
        elif self._clean:
            link.release(RELEASE_WAIT_S)
        else:
            link.abort()

    def cancel(self) -> None:
        """Stop: send C-CANCEL if the request is out; the peer's final answer ends `answers()`."""
        with self._lock:
            if self.cancelled:
                return
            self._cancel_deadline = time.monotonic() + CANCEL_GRACE_S
            self._cancelled.set()
            link = self._link
            if link is None or not self._request_sent:
                return
            cancel = command_set(
                [(0x0100, us(0x0FFF)), (0x0120, us(MESSAGE_ID)), (0x0800, us(NO_DATASET))]
            )
            try:
                link.send_message(self._context_id, cancel)
            except OSError:
                pass  # the association is going away anyway
