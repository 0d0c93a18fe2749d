"""Relay route: C-GET from the source on a dedicated association, C-STORE each instance on to the
destination as it arrives.

Two threads: one takes the instances from the source, one stores them at the destination, with
a short queue between them, so receiving the next instance overlaps sending the last. Instances
travel as the bytes the source sent (same transfer syntax), never decoded.

The dedicated association is how instances are told apart from other stores: they never reach
the router's C-STORE SCP, so they are not routed as new stores, whatever the source puts (or
omits) in Move Originator AE / Message ID.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import UID

from dicomrouter.config import CallingAETitles, RouterSettings, ServerConfig
from dicomrouter.logging import get_logger
from dicomrouter.net.get_client import PATIENT_ROOT_GET, STUDY_ROOT_GET, ReceivedInstance
from dicomrouter.net.move_client import PATIENT_ROOT_MOVE, MoveProgress, PeerMoveError
from dicomrouter.net.store_client import ContextRejected, EncodedStoreClient
from dicomrouter.retrieve.held_syntax import get_as_held
from dicomrouter.routing.move_routes import MoveDestination

log = get_logger(__name__)

GET_MODEL_FOR_MOVE = {PATIENT_ROOT_MOVE: PATIENT_ROOT_GET}
_DONE = object()
# Instances received but not yet stored on: bounds memory (~16 MiB of 512 KiB instances; larger
# ones wait in spill files).
RELAY_BUFFER = 32


@dataclass
class RelayCounts:
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_sop_uids: list[str] = field(default_factory=list)
    # Why sub-operations failed, each reason once
    reasons: list[str] = field(default_factory=list)

    def fail(self, sop_uid: str, reason: str) -> None:
        self.failed += 1
        self.failed_sop_uids.append(sop_uid)
        if reason and reason not in self.reasons:
            self.reasons.append(reason)


MAX_REASONS = 5  # in the final comment (64 characters reach the caller); the log has every one


def describe_reasons(reasons: list[str]) -> str:
    """One line: refused syntaxes grouped per destination ("X refuses JPEG2000, RLELossless"),
    then the other reasons."""
    refused: dict[str, list[str]] = {}
    others = []
    for reason in reasons:
        destination, sep, syntax = reason.partition(REFUSES)
        if sep:
            refused.setdefault(destination, []).append(syntax)
        else:
            others.append(reason)
    lines = [f"{dest}{REFUSES}{', '.join(names)}" for dest, names in refused.items()]
    lines += others[:MAX_REASONS]
    more = len(others) - MAX_REASONS
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")


REFUSES = " refuses "


def syntax_name(uid: str) -> str:
    """A transfer syntax's keyword (JPEG2000Lossless...), or its UID when pydicom does not know it."""
    return UID(uid).keyword or uid


def destination_peer(destination: MoveDestination) -> ServerConfig:
    """A ServerConfig-like peer for StoreClient: the destination server, or a client as a peer."""
    if destination.server is not None:
        return destination.server
    return ServerConfig(
        name=destination.name,
        ae_title=destination.ae_title,
        host=destination.host,
        port=destination.port,
        environment="test",
        active=True,
        primary=False,
        deleted=False,
        comments="",
        web_url=None,
        calling_ae=CallingAETitles(),
        move_routing={},
    )


class Relay:
    """Retrieve from `source`, store to `destination`; iterate `progress()` for running counts."""

    def __init__(
        self,
        source: ServerConfig,
        destination: MoveDestination,
        router: RouterSettings,
        move_model: str,
        identifier: Dataset,
        move_originator: tuple[str, int] | None = None,
    ):
        self.move_originator = move_originator  # the caller's (AE title, C-MOVE Message ID)
        self.source = source
        self.destination = destination
        self.router = router
        self.get_model = GET_MODEL_FOR_MOVE.get(move_model, STUDY_ROOT_GET)
        self.identifier = identifier
        self.counts = RelayCounts()
        self.cancelled = threading.Event()
        self._events: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue(maxsize=RELAY_BUFFER)

    def _accept(self, instance: ReceivedInstance) -> int:
        """On the retrieving thread: queue the instance for the sender and answer the source."""
        if self.cancelled.is_set():
            instance.discard()
            return 0xA700  # refuse further sub-operations so the source stops soon
        self._outbox.put(instance)  # blocks while the sender is RELAY_BUFFER behind
        return 0x0000  # the router has the instance; the destination's outcome is counted later

    def _send_all(self, client: EncodedStoreClient) -> None:
        """On the sending thread: store each queued instance at the destination, in order."""
        while (instance := self._outbox.get()) is not _DONE:
            try:
                self._store(client, instance)
            finally:
                instance.discard()

    def _store(self, client: EncodedStoreClient, instance: ReceivedInstance) -> None:
        """Store one instance in its own transfer syntax; a destination refusing that syntax fails
        the sub-operation (the router does not transcode)."""
        sop_uid = instance.sop_instance_uid
        try:
            outcome = client.send_encoded(
                instance.sop_class_uid,
                sop_uid,
                instance.transfer_syntax,
                instance.dataset,
                move_originator=self.move_originator,
            )
            if outcome.success and outcome.status == 0x0000:
                self.counts.completed += 1
            elif outcome.success:
                self.counts.warning += 1
            else:
                reason = f"{self.destination.name} answered 0x{outcome.status:04X}" + (
                    f" ({outcome.comment})" if outcome.comment else ""
                )
                log.warning(
                    "relay_store_failed",
                    destination=self.destination.name,
                    sop_uid=sop_uid,
                    reason=reason,
                )
                self.counts.fail(sop_uid, reason)
        except ContextRejected as exc:
            log.warning(
                "relay_store_failed",
                destination=self.destination.name,
                sop_uid=sop_uid,
                transfer_syntax=instance.transfer_syntax,
                reason=f"{exc}; the router does not transcode",
            )
            self.counts.fail(
                sop_uid,
                f"{self.destination.name}{REFUSES}{syntax_name(instance.transfer_syntax)}",
            )
        except Exception as exc:  # the destination refused or went away: this sub-operation failed
            log.warning(
                "relay_store_failed",
                destination=self.destination.name,
                sop_uid=sop_uid,
                reason=str(exc),
            )
            self.counts.fail(sop_uid, str(exc))
        self._events.put(None)

    def _run(self) -> None:
        client = EncodedStoreClient(destination_peer(self.destination), self.router)
        sender = threading.Thread(
            target=self._send_all, args=(client,), name="move-relay-send", daemon=True
        )
        sender.start()
        result: object
        try:
            # Each instance comes in the syntax the source holds it in and goes on unchanged.
            result = get_as_held(
                self.source,
                self.router,
                self.get_model,
                self.identifier,
                self._accept,
                spill_folder=Path(self.router.spool) / "tmp",
                is_cancelled=self.cancelled.is_set,
            )
        except PeerMoveError as exc:
            result = exc
        except Exception as exc:
            log.exception(
                "relay_failed", source=self.source.name, destination=self.destination.name
            )
            result = PeerMoveError("failed", str(exc))
        finally:
            self._outbox.put(_DONE)
            sender.join()
            client.close()
        missed = result.failed + result.remaining if isinstance(result, MoveProgress) else 0
        if isinstance(result, MoveProgress) and missed and not self.cancelled.is_set():
            # Sub-operations the source could not send (or gave up on) count as failed for the
            # caller too: its counts are those of what the destination received.
            self.counts.failed += missed
            self.counts.failed_sop_uids += result.failed_sop_uids
            reason = f"{self.source.name} could not send {missed} instance(s)" + (
                f" ({result.comment})" if result.comment else ""
            )
            self.counts.reasons.append(reason)
            log.warning("relay_source_failures", source=self.source.name, reason=reason)
        self._events.put(result)
        self._events.put(_DONE)

    def progress(self) -> Iterator[object]:
        """None after each instance relayed, then the source's final MoveProgress or a PeerMoveError."""
        worker = threading.Thread(target=self._run, name="move-relay", daemon=True)
        worker.start()
        while (event := self._events.get()) is not _DONE:
            yield event
        worker.join()
