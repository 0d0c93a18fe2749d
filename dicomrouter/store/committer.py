"""The worker that answers storage commitment requests: it claims due requests from the catalog,
asks `storage_commitment: true` servers for their own commitment, and once every instance is
decided sends the N-EVENT-REPORT: on the request's association while it is open, otherwise on a
new one to the client's host and port, retried with backoff while the client is not listening."""

from __future__ import annotations

import threading
from collections.abc import Callable

from pydicom.uid import generate_uid

from dicomrouter.audit import AuditTrail, NoAudit
from dicomrouter.config import Config
from dicomrouter.logging import get_logger
from dicomrouter.net.commitment_client import (
    ALL_COMMITTED,
    SOME_FAILED,
    Referenced,
    encode,
    event_report_command,
    report_dataset,
    request_commitment,
    send_report_on_new_association,
)
from dicomrouter.net.peer import PeerUnavailable
from dicomrouter.scp.commitment import ReportChannel, ReportChannels
from dicomrouter.store.commitments import ClaimedRequest, CommitmentStore, Failure

log = get_logger(__name__)

LEASE_S = 120.0  # a request claimed by a node that died is looked at again after this


class Committer:
    """One thread per node; requests are shared between nodes through the catalog."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: CommitmentStore,
        channels: ReportChannels,
        audit: AuditTrail | NoAudit,
    ):
        self.config = config
        self.store = store
        self.channels = channels
        self.audit = audit
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Committer:
        self._thread = threading.Thread(target=self._run, name="committer", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("committer_failed")
            self._wake.wait(self.config().router.storage_commitment.poll_interval_s)
            self._wake.clear()

    def run_once(self) -> int:
        """Look at every due request once; returns how many were reported."""
        reported = 0
        for request in self.store.claim(LEASE_S):
            if self._stop.is_set():
                self.store.check_later(request.id, 0)
                continue
            try:
                reported += self._handle(request)
            except Exception as exc:
                log.exception("commitment_check_failed", transaction_uid=request.transaction_uid)
                self.store.check_later(
                    request.id, self.config().router.storage_commitment.poll_interval_s, str(exc)
                )
        return reported

    # ------------------------------------------------------------------ one request

    def _handle(self, request: ClaimedRequest) -> int:
        config = self.config()
        settings = config.router.storage_commitment
        if request.failures is None:  # not decided yet
            verdict = self.store.evaluate(request.instances, config, request.deadline_at)
            for server_name, instances in verdict.to_request.items():
                self._ask_server(config, server_name, instances)
            if not verdict.decided:
                self.store.check_later(request.id, settings.poll_interval_s)
                return 0
            failures = verdict.failed
            event_type = SOME_FAILED if failures else ALL_COMMITTED
            self.store.decide(request.id, event_type, failures)
            for ref, failure in failures.items():
                log.warning(
                    "commitment_failed",
                    transaction_uid=request.transaction_uid,
                    calling_ae=request.calling_ae,
                    sop_instance_uid=ref.sop_instance_uid,
                    failure_reason=f"0x{failure.reason:04X}",
                    reason=failure.why,
                )
        else:
            failures = {
                ref: Failure(*request.failures[ref.sop_instance_uid])
                for ref in request.instances
                if ref.sop_instance_uid in request.failures
            }
        return self._report(config, request, failures)

    def _ask_server(self, config: Config, server_name: str, instances: list[Referenced]) -> None:
        server = config.server(server_name)
        if server is None or not server.usable:
            return
        transaction_uid = generate_uid()
        self.store.add_destination_requests(
            server_name, transaction_uid, instances
        )  # before its report can come
        try:
            request_commitment(server, config.router, transaction_uid, instances)
        except PeerUnavailable as exc:
            self.store.forget_destination_requests(transaction_uid)
            log.warning("commitment_ask_failed", server=server_name, reason=exc.reason)
            return
        log.info(
            "commitment_asked",
            server=server_name,
            transaction_uid=transaction_uid,
            instances=len(instances),
        )
        self.audit.record(
            "commitment",
            "asked",
            servers=server_name,
            detail=f"transaction {transaction_uid}: {len(instances)} instances",
        )

    def _report(
        self, config: Config, request: ClaimedRequest, failures: dict[Referenced, Failure]
    ) -> int:
        committed = [ref for ref in request.instances if ref not in failures]
        event_type = SOME_FAILED if failures else ALL_COMMITTED
        report = report_dataset(
            request.transaction_uid, committed, {ref: f.reason for ref, f in failures.items()}
        )
        identity = {
            "calling_ae": request.calling_ae,
            "called_ae": request.called_ae,
            "address": request.address,
        }
        detail = f"transaction {request.transaction_uid}: {len(committed)} committed, {len(failures)} failed"
        if failures:
            detail += "; " + "; ".join(
                f"{ref.sop_instance_uid}: {f.why}" for ref, f in list(failures.items())[:20]
            )
        channel = self.channels.get(request.transaction_uid)
        if channel is not None and self._report_on(channel, event_type, report, config):
            how = "same association"
        else:
            client = config.client(request.calling_ae)
            if client is None or not client.host or not client.port:
                error = f"client {request.calling_ae} has no host and port to send the report to"
                self._retry_report(config, request, error)
                return 0
            try:
                status = send_report_on_new_association(
                    client.host, client.port, request.calling_ae, config.router, event_type, report
                )
            except PeerUnavailable as exc:
                self._retry_report(config, request, exc.reason)
                return 0
            if status != 0x0000:
                self._retry_report(config, request, f"N-EVENT-REPORT answered 0x{status:04X}")
                return 0
            how = "new association"
        self.store.reported(request.id, how)
        self.channels.discard(request.transaction_uid)
        outcome = "committed" if not failures else "failed"
        log.info(
            "commitment_reported",
            transaction_uid=request.transaction_uid,
            calling_ae=request.calling_ae,
            event_type=event_type,
            committed=len(committed),
            failed=len(failures),
            how=how,
        )
        self.audit.record(
            "commitment", outcome, detail=f"{detail} (reported on the {how})", **identity
        )
        return 1

    def _retry_report(self, config: Config, request: ClaimedRequest, error: str) -> None:
        settings = config.router.storage_commitment
        delay = min(
            settings.report_retry_max_s,
            settings.report_retry_initial_s * 2 ** min(request.report_attempts, 16),
        )
        log.warning(
            "commitment_report_failed",
            transaction_uid=request.transaction_uid,
            calling_ae=request.calling_ae,
            reason=error,
            retry_in_s=round(delay, 1),
        )
        self.store.check_later(request.id, delay, error, attempted=True)

    def _report_on(self, channel: ReportChannel, event_type: int, report, config: Config) -> bool:
        """The report on the request's own association; False when it went away meanwhile."""
        association = channel.association
        try:
            data = encode(report, channel.transfer_syntax)
            message_id, responses = association.send_request(
                channel.context_id, event_report_command(event_type), data
            )
        except OSError:
            return False
        try:
            response = responses.get(timeout=config.router.dimse_timeout_s)
        except Exception:
            response = None
        finally:
            association.forget_request(message_id)
        if response is None:
            return False
        status = response.number(0x0900)
        if status != 0x0000:
            log.warning(
                "commitment_report_refused", status=f"0x{status or 0:04X}", how="same association"
            )
            return False
        return True
