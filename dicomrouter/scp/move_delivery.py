"""C-STORE from a configured server: the sub-operations of a C-MOVE the router sent to itself.

A PACS that only moves calls the router back under its own AE title (retrieve/move_to_self.py).
Each instance goes, as the bytes the PACS sent, to the retrieval waiting for it
(retrieve/pending.py): never spooled, routed or queued. An instance no pending retrieval from
that server asked for is refused, its data set read and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dicomrouter.dul.association import Association, DimseRefusal, Request
from dicomrouter.dul.dimse import (
    AFFECTED_SOP_INSTANCE,
    C_STORE_RQ,
    MOVE_ORIGINATOR_AE,
    MOVE_ORIGINATOR_ID,
)
from dicomrouter.dul.pdata import FileSlice
from dicomrouter.logging import get_logger
from dicomrouter.net.get_client import ReceivedInstance
from dicomrouter.retrieve.pending import NOT_WANTED, SUCCESS, PendingMove, PendingRetrievals
from dicomrouter.scp.store import (
    DEFLATED_EXPLICIT_VR_LE,
    IncomingInstance,
    audit_outcome,
    checked_store_command,
)
from dicomrouter.store.spool import PartialFile, Spool

log = get_logger(__name__)


@dataclass
class DeliveredInstance(IncomingInstance):
    """The data set as it arrives (no file meta: the retrieval writes its own), and the pending
    moves it may belong to."""

    candidates: list[PendingMove] = field(default_factory=list)
    other_worker: str | None = None  # none of this worker's: the one waiting for it (handoff.py)


class MoveDeliveryService:
    operation = "store"
    commands = frozenset({C_STORE_RQ})
    long_running = (
        False  # the reader waits while the retrieval's client is slow: TCP holds the PACS back
    )

    def __init__(self, pending: PendingRetrievals, spool: Spool):
        self.pending = pending
        self.spool = spool

    def open_dataset(self, request: Request, association: Association) -> DeliveredInstance:
        checked_store_command(request)
        server = association.caller.server
        originator_ae = request.command.text(MOVE_ORIGINATOR_AE)
        originator_id = request.command.number(MOVE_ORIGINATOR_ID)
        candidates = self.pending.candidates(server.name, originator_ae, originator_id)
        other_worker = None if candidates else self.pending.other_worker(server.name, originator_id)
        if not candidates and other_worker is None:
            raise DimseRefusal(
                NOT_WANTED,
                "server AE may only deliver moves the router asked for",
                reason=f"no retrieval from {server.name} is waiting (move originator {originator_ae or '-'})",
            )
        incoming = DeliveredInstance(
            max_size=association.limits.max_dataset_size,
            max_in_memory=association.limits.max_in_memory_dataset,
            spool=self.spool,  # a large one is written to the spool's tmp/ as it arrives
            may_stream=request.context.transfer_syntax != DEFLATED_EXPLICIT_VR_LE,
            candidates=candidates,
            other_worker=other_worker,
            hashed=False,
        )
        return incoming

    def handle(self, request: Request, association: Association) -> None:
        incoming = request.dataset
        assert isinstance(incoming, DeliveredInstance)
        sop_instance_uid = request.command.uid(AFFECTED_SOP_INSTANCE)
        if incoming.failure is not None:
            status, comment = incoming.failure.status, incoming.failure.comment
        else:
            received = incoming.received()
            if isinstance(received, PartialFile):
                received.close()
                received = FileSlice(received.path, 0, received.size)
            instance = ReceivedInstance(
                request.sop_class, sop_instance_uid, request.context.transfer_syntax, received
            )
            if incoming.other_worker is not None:
                status, comment = self.pending.hand_over(
                    incoming.other_worker,
                    association.caller.server.name,
                    request.command.number(MOVE_ORIGINATOR_ID),
                    instance,
                )
            else:
                status, comment = self.pending.deliver(instance, incoming.candidates)
        if status != SUCCESS:
            association.log.warning(
                "move_delivery_refused",
                sop_instance_uid=sop_instance_uid[:80],
                status=f"0x{status:04X}",
                reason=comment,
            )
            association.audit.count_store(None, audit_outcome(status), (), comment)
        association.store_outcomes[audit_outcome(status)] += 1
        association.respond(request, status, comment)

    def refused(self, request: Request, refusal: DimseRefusal, association: Association) -> None:
        association.store_outcomes[audit_outcome(refusal.status)] += 1
        association.audit.count_store(None, audit_outcome(refusal.status), (), refusal.reason)
