"""C-MOVE to the router itself, for a server that does not do C-GET.

A server's `retrieve:` says how the router takes instances from it: `get` (C-GET), `move` (C-MOVE
with the router's AE title as Move Destination; the server calls back and the sub-operations
reach the waiting retrieval through retrieve/pending.py) or `auto`: C-GET, and C-MOVE once the
server refuses C-GET (its presentation context at negotiation, or the request with "not
supported"). That refusal is kept with what the router learns of each server's negotiation
(store/capabilities.py), so later retrievals move straight away; it is forgotten with the other
refusals (after `refused_ttl_s`, or when the server's address changes) and C-GET is tried again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dicomrouter.config import Config, ServerConfig, calling_ae_for
from dicomrouter.logging import get_logger
from dicomrouter.net.get_client import PATIENT_ROOT_GET, STUDY_ROOT_GET, ReceivedInstance
from dicomrouter.net.move_client import (
    CANCELLED,
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_MOVE,
    MoveProgress,
    PeerMove,
    PeerMoveError,
)
from dicomrouter.net.upper_layer import EXPLICIT_VR_LE, IMPLICIT_VR_LE
from dicomrouter.retrieve.pending import PendingRetrievals
from dicomrouter.retrieve.plan import RetrieveRequest

log = get_logger(__name__)

# C-GET answered with these: the server does not offer it (SOP class not supported, unrecognized
# operation).
GET_UNSUPPORTED = frozenset({0x0122, 0x0211})
GET_MODELS = (STUDY_ROOT_GET, PATIENT_ROOT_GET)
MOVE_MODEL = {STUDY_ROOT_GET: STUDY_ROOT_MOVE, PATIENT_ROOT_GET: PATIENT_ROOT_MOVE}
GET_SYNTAXES = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)  # as proposed for the C-GET model
WARNING = 0xB000


class GetUnsupported(Exception):
    """The server refused C-GET itself (not one retrieval of it)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _failure(
    server: ServerConfig, destination: str, final: MoveProgress, received: int
) -> str | None:
    """What went wrong with one finished move to the router, or None."""
    if final.status == CANCELLED:
        return None
    missed = final.failed + final.remaining
    failed = final.status not in (0x0000, WARNING) and (final.status >> 12) != 0xB
    if failed or missed:
        text = f"{server.name} answered 0x{final.status:04X} to the C-MOVE to {destination}"
        if final.comment:
            text += f" ({final.comment})"
        if missed:
            text += f", {missed} instance(s) not delivered"
        if missed and not received:  # the usual cause: the PACS cannot reach the router
            text += f" (does it know {destination}'s address?)"
        return text
    if received < final.completed + final.warning:
        return (
            f"{server.name} reported {final.completed + final.warning} instance(s) moved to "
            f"{destination}, {received} reached the router"
        )
    return None


@dataclass
class MoveToSelf:
    """How to take instances from a server that only moves; one per retrieval."""

    config: Config
    pending: PendingRetrievals
    capabilities: Any = None  # store.capabilities.DestinationCapabilities: remembers GET refusals

    def uses_move(self, server: ServerConfig) -> bool:
        """C-MOVE rather than C-GET: configured so, or `auto` and the server refused C-GET."""
        if server.retrieve != "auto":
            return server.retrieve == "move"
        if self.capabilities is None:
            return False
        verdict = self.capabilities.verdict(server.name, STUDY_ROOT_GET, GET_SYNTAXES)
        return verdict.state == "refused"

    def falls_back(self, server: ServerConfig) -> bool:
        return server.retrieve == "auto"

    def get_refused(self, server: ServerConfig, reason: str) -> None:
        """Remember that `server` refuses C-GET (until refusals are forgotten)."""
        log.warning("retrieve_get_refused", server=server.name, reason=reason, fallback="move")
        if self.capabilities is not None:
            refused = [(model, syntax) for model in GET_MODELS for syntax in GET_SYNTAXES]
            self.capabilities.record(server, (), refused)

    def fetch(
        self,
        server: ServerConfig,
        requests: Sequence[RetrieveRequest],
        on_instance: Callable[[ReceivedInstance], int],
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> tuple[list[str], int]:
        """C-MOVE each request to the router, each instance handed to `on_instance` as it arrives;
        (what went wrong, one line per failed request; sub-operations the server missed)."""
        router = self.config.router
        destination = server.move_routing.get(router.ae_title) or router.ae_title
        originator = calling_ae_for(server, "move", router)
        errors: list[str] = []
        missed = 0
        for request in requests:
            if is_cancelled():
                break
            model = MOVE_MODEL.get(request.query_model, request.query_model)
            final: MoveProgress | None = None
            with self.pending.expect(
                server.name, originator, request.identifier, on_instance
            ) as waiting:
                move = PeerMove(server, router, model, request.identifier, waiting.message_id)
                cancel_sent = False
                try:
                    for final in move.progress(destination):
                        if final.pending and not cancel_sent and is_cancelled():
                            move.cancel()  # the client went away: the server may stop early
                            cancel_sent = True
                except PeerMoveError as exc:
                    log.warning(
                        "move_to_self_failed", source=server.name, kind=exc.kind, reason=exc.reason
                    )
                    errors.append(f"{server.name} {exc.kind}: {exc.reason}")
                    continue
            assert final is not None
            failure = _failure(server, destination, final, waiting.received)
            log.info(
                "move_to_self_done",
                source=server.name,
                move_destination=destination,
                status=f"0x{final.status:04X}",
                completed=final.completed,
                failed=final.failed,
                received=waiting.received,
                reason=failure,
            )
            if failure:
                errors.append(failure)
            if final.status != CANCELLED:
                missed += final.failed + final.remaining
        return errors, missed
