"""C-STORE SCU to one PACS over a reused association, sending spool files as encoded bytes.

`StoreClient` (pynetdicom) sends spool files for the forwarder; `EncodedStoreClient` (the lean
upper layer) sends data sets already encoded in memory for the relay, without decoding them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association

from dicomrouter.config import RouterSettings, ServerConfig, calling_ae_for
from dicomrouter.net.peer import PeerUnavailable, make_ae, open_association, peer_tls_context
from dicomrouter.net.upper_layer import (
    Link,
    UpperLayerError,
    command_set,
    open_link,
    us,
)

# Send files from disk in chunks without decoding them (pynetdicom's own switch).
pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True

MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8)


class ContextRejected(Exception):
    """The peer does not accept this SOP class in this transfer syntax: a permanent refusal."""


class StoreFailed(Exception):
    """No C-STORE response (timeout, abort): worth retrying."""


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    comment: str = ""

    @property
    def success(self) -> bool:
        return self.status in (0x0000, 0xB000, 0xB007, 0xB006)

    @property
    def permanent_failure(self) -> bool:
        """Refusals that will not change by retrying (PS3.4 B.2.3; 0xA7xx is transient)."""
        return not self.success and (self.status >> 8) in (0xA9, 0xC0, 0xC1, 0xC2, 0xC3, 0x01)


class StoreClient:
    """One reusable association to `server`; renegotiates when a new (SOP class, syntax) appears."""

    def __init__(self, server: ServerConfig, router: RouterSettings, move_originator: str | None = None):
        self.server = server
        self.router = router
        self.calling_ae = calling_ae_for(server, "store", router)
        self._wanted: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._assoc: Association | None = None
        self._message_id = 0

    def _accepted(self, sop_class: str, transfer_syntax: str) -> bool:
        if self._assoc is None or not self._assoc.is_established:
            return False
        return any(
            cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == transfer_syntax
            for cx in self._assoc.accepted_contexts
        )

    def _associate(self) -> None:
        self.close()
        contexts = [(sop, [ts]) for sop, ts in self._wanted]
        ae = make_ae(self.calling_ae, self.router, contexts)
        self._assoc = open_association(ae, self.server)

    def _ensure_context(self, sop_class: str, transfer_syntax: str) -> None:
        if self._accepted(sop_class, transfer_syntax):
            return
        pair = (sop_class, transfer_syntax)
        newly_wanted = pair not in self._wanted
        self._wanted[pair] = None
        self._wanted.move_to_end(pair)
        while len(self._wanted) > MAX_CONTEXTS:
            self._wanted.popitem(last=False)
        if self._assoc is not None and self._assoc.is_established and not newly_wanted:
            raise ContextRejected(f"{self.server.name} does not accept SOP class {sop_class} in {transfer_syntax}")
        self._associate()
        if not self._accepted(sop_class, transfer_syntax):
            raise ContextRejected(f"{self.server.name} does not accept SOP class {sop_class} in {transfer_syntax}")

    def send_file(
        self,
        path: Path,
        sop_class: str,
        transfer_syntax: str,
        move_originator_ae: str | None = None,
        move_originator_id: int | None = None,
    ) -> StoreOutcome:
        """C-STORE the spool file; raise PeerUnavailable, ContextRejected or StoreFailed."""
        self._ensure_context(sop_class, transfer_syntax)
        assert self._assoc is not None
        self._message_id = self._message_id % 65535 + 1
        try:
            status = self._assoc.send_c_store(
                path,
                msg_id=self._message_id,
                originator_aet=move_originator_ae,
                originator_id=move_originator_id,
            )
        except (OSError, RuntimeError, ValueError) as exc:
            self.close(abort=True)
            raise StoreFailed(f"C-STORE to {self.server.name} failed: {exc}") from exc
        if not status or "Status" not in status:
            self.close(abort=True)
            raise StoreFailed(f"no C-STORE response from {self.server.name} (timeout or abort)")
        comment = str(status.get("ErrorComment", "") or "")
        return StoreOutcome(int(status.Status), comment)

    def close(self, abort: bool = False) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is None:
            return
        if assoc.is_established:
            if abort:
                assoc.abort()
            else:
                assoc.release()


class EncodedStoreClient:
    """One reusable lean association to `peer` for encoded data sets; renegotiates like StoreClient."""

    def __init__(self, peer: ServerConfig, router: RouterSettings):
        self.peer = peer
        self.router = router
        self.calling_ae = calling_ae_for(peer, "store", router)
        self._wanted: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._link: Link | None = None
        self._message_id = 0

    def _context(self, sop_class: str, transfer_syntax: str) -> int:
        """The accepted context for the pair, associating anew when it is new; ContextRejected."""
        link = self._link
        if link is not None and not link.closed:
            context_id = link.context_for(sop_class, transfer_syntax)
            if context_id is not None:
                return context_id
        pair = (sop_class, transfer_syntax)
        newly_wanted = pair not in self._wanted
        self._wanted[pair] = None
        self._wanted.move_to_end(pair)
        while len(self._wanted) > MAX_CONTEXTS:
            self._wanted.popitem(last=False)
        rejected = ContextRejected(f"{self.peer.name} does not accept SOP class {sop_class} in {transfer_syntax}")
        if link is not None and not link.closed and not newly_wanted:
            raise rejected
        self.close()
        tls_context = peer_tls_context(self.peer)  # PeerUnavailable when its files fail to load
        try:
            self._link = open_link(
                self.peer.host,
                self.peer.port,
                self.calling_ae,
                self.peer.ae_title,
                [(sop, [syntax]) for sop, syntax in self._wanted],
                self.router.max_pdu_size,
                self.router.connect_timeout_s,
                self.router.acse_timeout_s,
                tls_context=tls_context,
            )
        except UpperLayerError as exc:
            raise PeerUnavailable("rejected" if exc.kind == "rejected" else "unreachable", exc.reason) from None
        context_id = self._link.context_for(sop_class, transfer_syntax)
        if context_id is None:
            raise rejected
        return context_id

    def send_encoded(self, sop_class: str, sop_instance: str, transfer_syntax: str, dataset: bytes) -> StoreOutcome:
        """C-STORE one encoded data set; raise PeerUnavailable, ContextRejected or StoreFailed."""
        context_id = self._context(sop_class, transfer_syntax)
        link = self._link
        assert link is not None
        self._message_id = self._message_id % 65535 + 1
        command = command_set(
            [
                (0x0002, sop_class.encode("ascii")),
                (0x0100, us(0x0001)),
                (0x0110, us(self._message_id)),
                (0x0700, us(0x0000)),  # medium priority
                (0x0800, us(0x0000)),  # a data set follows
                (0x1000, sop_instance.encode("ascii")),
            ]
        )
        try:
            link.send_message(context_id, command, dataset)
            while True:
                for message in link.receive_messages(self.router.dimse_timeout_s):
                    if message.command_field == 0x8001 and message.us(0x0120) == self._message_id:
                        return StoreOutcome(message.status, message.text(0x0902))
        except (OSError, UpperLayerError) as exc:
            self.close(abort=True)
            raise StoreFailed(f"no C-STORE response from {self.peer.name} ({exc})") from exc

    def close(self, abort: bool = False) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        if abort:
            link.abort()
        else:
            link.release()


__all__ = ["EncodedStoreClient", "StoreClient", "StoreOutcome", "ContextRejected", "StoreFailed", "PeerUnavailable"]
