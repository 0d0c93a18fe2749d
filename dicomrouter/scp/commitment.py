"""Storage Commitment Push Model SCP (PS3.4 J): a client's N-ACTION is kept in the catalog and
answered at once; its N-EVENT-REPORT goes out later (store/committer.py). A server's
N-EVENT-REPORT answers one of the router's own requests to a `storage_commitment: true` server."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from pydicom import Dataset

from dicomrouter.dul.association import Association, DataSink, DimseRefusal, HeldDataset, Request
from dicomrouter.dul.dimse import ACTION_TYPE_ID, EVENT_TYPE_ID, N_ACTION_RQ, N_EVENT_REPORT_RQ, us
from dicomrouter.logging import get_logger
from dicomrouter.net.commitment_client import (
    PROCESSING_FAILURE,
    REQUEST_COMMITMENT,
    STORAGE_COMMITMENT,
    decode,
    referenced,
)
from dicomrouter.reload import ConfigHolder
from dicomrouter.routing.access import may_write
from dicomrouter.scp.registry import valid_uid
from dicomrouter.store.commitments import CommitmentStore

log = get_logger(__name__)

NOT_AUTHORIZED = 0x0124
NO_SUCH_ACTION = 0x0123
INVALID_ARGUMENT = 0x0115
DUPLICATE_TRANSACTION = 0x0111  # duplicate SOP instance: the Transaction UID was used before
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # ~100,000 referenced instances


@dataclass(frozen=True)
class ReportChannel:
    """Where a request came in: its report may go back on the same association while it is open."""

    association: Association
    context_id: int
    transfer_syntax: str


class ReportChannels:
    """Transaction UID -> the open association its request came on (this node only)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: dict[str, ReportChannel] = {}

    def add(self, transaction_uid: str, channel: ReportChannel) -> None:
        with self._lock:
            self._channels[transaction_uid] = channel

        def forget() -> None:
            with self._lock:
                if self._channels.get(transaction_uid) is channel:
                    del self._channels[transaction_uid]

        channel.association.on_end.append(forget)

    def get(self, transaction_uid: str) -> ReportChannel | None:
        with self._lock:
            channel = self._channels.get(transaction_uid)
        return channel if channel is not None and channel.association.open else None

    def discard(self, transaction_uid: str) -> None:
        with self._lock:
            self._channels.pop(transaction_uid, None)


class CommitmentService:
    operation = "commitment"
    sop_classes = (STORAGE_COMMITMENT,)
    commands = frozenset({N_ACTION_RQ, N_EVENT_REPORT_RQ})
    long_running = False

    def __init__(
        self,
        holder: ConfigHolder,
        store: CommitmentStore,
        channels: ReportChannels,
        wake: Callable[[], None],
    ):
        self.holder = holder
        self.store = store
        self.channels = channels
        self.wake = wake

    def open_dataset(self, request: Request, association: Association) -> DataSink:
        return HeldDataset(MAX_REQUEST_BYTES)

    def handle(self, request: Request, association: Association) -> None:
        if request.command_field == N_ACTION_RQ:
            self._request(request, association)
        else:
            self._server_report(request, association)

    def refused(self, request: Request, refusal: DimseRefusal, association: Association) -> None:
        association.audit.record("commitment", "refused", detail=refusal.reason)

    def _dataset(self, request: Request) -> Dataset:
        if request.dataset is None:
            raise DimseRefusal(INVALID_ARGUMENT, "a data set is required")
        try:
            return decode(request.held(), request.context.transfer_syntax)
        except Exception as exc:
            raise DimseRefusal(
                INVALID_ARGUMENT, "unreadable data set", reason=f"unreadable data set ({exc})"
            ) from None

    def _request(self, request: Request, association: Association) -> None:
        """A client's Request Storage Commitment: kept in the catalog, then Success."""
        config = self.holder.current
        caller = association.caller
        if not any(may_write(caller, server) for server in config.live_servers()):
            raise DimseRefusal(
                NOT_AUTHORIZED,
                "not authorized: storage commitment needs a write role",
                reason=f"{caller.ae_title} has no write role (roles: {', '.join(sorted(caller.roles)) or 'none'})",
            )
        if request.command.number(ACTION_TYPE_ID) != REQUEST_COMMITMENT:
            raise DimseRefusal(
                NO_SUCH_ACTION,
                f"action type {request.command.number(ACTION_TYPE_ID)} not supported",
            )
        dataset = self._dataset(request)
        transaction_uid = str(dataset.get("TransactionUID", "") or "").strip()
        if not valid_uid(transaction_uid):
            raise DimseRefusal(INVALID_ARGUMENT, "missing or invalid Transaction UID")
        instances = referenced(dataset.get("ReferencedSOPSequence"))
        if not instances:
            raise DimseRefusal(INVALID_ARGUMENT, "empty Referenced SOP Sequence")
        settings = config.router.storage_commitment
        added = self.store.add_request(
            transaction_uid,
            association.calling_ae,
            association.called_ae,
            association.connection.address,
            instances,
            settings.max_wait_s,
        )
        if not added:
            raise DimseRefusal(
                DUPLICATE_TRANSACTION,
                "Transaction UID already used",
                reason=f"transaction {transaction_uid} repeated",
            )
        self.channels.add(
            transaction_uid,
            ReportChannel(association, request.context_id, request.context.transfer_syntax),
        )
        association.respond(request, 0x0000, elements=[(ACTION_TYPE_ID, us(REQUEST_COMMITMENT))])
        log.info(
            "commitment_requested",
            calling_ae=association.calling_ae,
            transaction_uid=transaction_uid,
            instances=len(instances),
        )
        association.audit.record(
            "commitment",
            "requested",
            detail=f"transaction {transaction_uid}: {len(instances)} instances",
        )
        self.wake()

    def _server_report(self, request: Request, association: Association) -> None:
        """A server's N-EVENT-REPORT on the router's own commitment request."""
        event_type = request.command.number(EVENT_TYPE_ID)
        dataset = self._dataset(request)
        transaction_uid = str(dataset.get("TransactionUID", "") or "").strip()
        committed = referenced(dataset.get("ReferencedSOPSequence"))
        failed = {
            ref: int(item.get("FailureReason", PROCESSING_FAILURE) or PROCESSING_FAILURE)
            for item in dataset.get("FailedSOPSequence") or ()
            for ref in referenced([item])
        }
        server = self.store.destination_report(transaction_uid, committed, failed)
        association.respond(request, 0x0000, elements=[(EVENT_TYPE_ID, us(event_type or 1))])
        if server is None:
            log.warning(
                "commitment_report_unknown",
                calling_ae=association.calling_ae,
                transaction_uid=transaction_uid,
            )
            association.audit.record(
                "commitment", "ignored", detail=f"report for unknown transaction {transaction_uid}"
            )
            return
        log.info(
            "commitment_report_received",
            server=server,
            transaction_uid=transaction_uid,
            committed=len(committed),
            failed=len(failed),
        )
        association.audit.record(
            "commitment",
            "committed" if not failed else "failed",
            servers=server,
            detail=f"{server}'s report on transaction {transaction_uid}: {len(committed)} committed, {len(failed)} failed",
        )
        self.wake()
