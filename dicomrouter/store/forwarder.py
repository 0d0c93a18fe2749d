"""Sends queued jobs to their destinations: parallel reused associations, retries, dead letters."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta

from dicomrouter.audit import AuditTrail, DeliveryAudit, NoAudit
from dicomrouter.config import Config, ServerConfig
from dicomrouter.logging import get_logger
from dicomrouter.metrics import Metrics
from dicomrouter.net.store_client import (
    ContextRejected,
    EncodedStoreClient,
    PeerUnavailable,
    SpoolFileMissing,
    StoreFailed,
)
from dicomrouter.net.upper_layer import Link
from dicomrouter.reload import ConfigHolder
from dicomrouter.store.acks import AckRecorder
from dicomrouter.store.capabilities import DestinationCapabilities
from dicomrouter.store.outages import OutageBook
from dicomrouter.store.queue import ClaimedJob, ForwardQueue, backoff_s, utcnow
from dicomrouter.store.spool import Spool
from dicomrouter.store.suspensions import Suspensions

log = get_logger(__name__)

CLAIM_BATCH = 16
DIRECT_MAX = CLAIM_BATCH  # jobs handed straight to a lane and not yet sent; more wait in the queue
# Jobs handed over and waiting while worker 0 sends: from this many on a helper worker sends too (a
# burst from several modalities would otherwise go to the PACS over one association per worker).
HELPER_JOINS_AT = 4
IDLE_RELEASE_S = 5.0  # release an idle association so it does not hold a PACS slot


@dataclass
class Delivery:
    job: ClaimedJob
    server: ServerConfig


@dataclass
class Recovery:
    """A destination that answered again after an outage, while its backlog drains."""

    unreachable_since: datetime
    recovered_at: datetime
    delivered: int = 0

    @property
    def outage_s(self) -> float:
        return round((self.recovered_at - self.unreachable_since).total_seconds(), 1)


class AckWriter:
    """Records deliveries in the background, many per transaction, so lanes keep sending.

    A delivered job stays claimed until its ack is written; if the process dies first, the lease
    expires and the job is sent again, which the destination treats as the same instance.
    """

    def __init__(
        self,
        record_acks: AckRecorder,
        spool: Spool,
        max_batch: int = 500,
        linger_s: float = 0.1,
        deliveries: DeliveryAudit | None = None,
    ):
        self.record_acks = record_acks
        self.spool = spool
        self.deliveries = deliveries or DeliveryAudit(NoAudit())
        self.max_batch = max_batch
        self.linger_s = linger_s  # let deliveries gather: one transaction for many
        self._pending: list[tuple[ServerConfig, list[ClaimedJob]]] = []
        self._pending_jobs = 0
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ack-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, server: ServerConfig, jobs: list[ClaimedJob]) -> None:
        with self._wakeup:
            self._pending.append((server, jobs))
            self._pending_jobs += len(jobs)
            # Wake the writer for the first delivery of a batch and for a full one only: while it lingers
            # it waits out its deadline anyway (a wake-up per delivery cost a thread switch per instance).
            if len(self._pending) == 1 or self._pending_jobs >= self.max_batch:
                self._wakeup.notify_all()

    def stop(self, timeout_s: float) -> None:
        """Write what is waiting, then stop and close the recorder's catalog connection."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        # A batch still being written after the timeout closes its connection as it ends.
        self.record_acks.close()

    def _take(self) -> list[tuple[ServerConfig, list[ClaimedJob]]] | None:
        with self._wakeup:
            while not self._pending and not self._stopping:
                self._wakeup.wait(self.deliveries.next_due_s())
                self.deliveries.flush()
            if not self._pending:
                return None
            deadline = time.monotonic() + self.linger_s
            while not self._stopping and self._pending_jobs < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.wait(remaining)
            taken, self._pending, self._pending_jobs = self._pending, [], 0
            return taken

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            by_server: dict[str, tuple[ServerConfig, list[ClaimedJob]]] = {}
            for server, jobs in taken:
                by_server.setdefault(server.name, (server, []))[1].extend(jobs)
            for server, jobs in by_server.values():
                for start in range(0, len(jobs), self.max_batch):
                    self._write(server, jobs[start : start + self.max_batch])
            self.deliveries.flush()
        self.deliveries.flush(everything=True)

    def _write(self, server: ServerConfig, jobs: list[ClaimedJob]) -> None:
        try:
            removable = self.record_acks(server, jobs)
        except Exception:
            if len(jobs) == 1:
                removable = self._complete_without_catalog(server, jobs[0])
            else:
                # One bad instance must not hold back the batch: record them one by one.
                log.warning("ack_batch_failed", destination=server.name, jobs=len(jobs), retry="one by one")
                for job in jobs:
                    self._write(server, [job])
                return
        self._count_deliveries(server, jobs if removable is not None else [])
        for path in removable or []:
            try:
                self.spool.remove(path)
            except OSError as exc:
                log.error("spool_remove_failed", path=str(path), reason=str(exc))
        log.debug("delivered", destination=server.name, instances=len(jobs))

    def _count_deliveries(self, server: ServerConfig, jobs: list[ClaimedJob]) -> None:
        studies: dict[str | None, int] = {}
        for job in jobs:
            study_uid = job.header.get("StudyInstanceUID")
            studies[study_uid] = studies.get(study_uid, 0) + 1
        for study_uid, count in studies.items():
            self.deliveries.add(server.name, study_uid, count)

    def _complete_without_catalog(self, server: ServerConfig, job: ClaimedJob) -> list[str] | None:
        """The destination has it: finish the job even when the catalog cannot describe it."""
        log.exception("catalog_record_failed", destination=server.name, job_id=job.id, sop_instance_uid=job.sop_instance_uid)
        try:
            return self.record_acks.complete_only([job])
        except Exception:
            # The job stays claimed; the lease expires and it is sent again (idempotent).
            log.exception("ack_record_failed", destination=server.name, job_id=job.id)
            return None


class DestinationLane:
    """The workers for one destination; a failing destination only pauses its own lane."""

    def __init__(self, forwarder: Forwarder, name: str):
        self.forwarder = forwarder
        self.name = name
        # Worker 0 waits on `wakeup`, the helper workers on `helpers` (one lock): a job handed over
        # wakes the one worker that sends it, not every thread of the lane.
        lock = threading.Lock()
        self.wakeup = threading.Condition(lock)
        self.helpers = threading.Condition(lock)
        self.paused_until = 0.0
        self.consecutive_failures = 0
        self.backlog = False  # the last claim came back full: let every worker send
        self.signalled = False
        # Jobs the receive path inserted already claimed for this node (see Forwarder.take_direct):
        # sent from here without a claim transaction each. (monotonic time claimed, job)
        self.direct: deque[tuple[float, ClaimedJob]] = deque()
        self.claim_wanted = True  # a pending job was queued: the next turn claims from the catalog
        self.last_claim = 0.0
        self.threads: list[threading.Thread] = []
        # Outage and recovery, for the log: since when unreachable (wall clock, shared with the
        # catalog), then, once it answers again, what the backlog drain has delivered.
        self._outage_lock = threading.Lock()
        self.unreachable_since: datetime | None = None
        self.draining: Recovery | None = None

    def notify(self) -> None:
        """A pending job was queued, a backlog begun or the forwarder is stopping: every worker looks."""
        with self.wakeup:
            self.claim_wanted = True
            self.signalled = True
            self.wakeup.notify_all()
            self.helpers.notify_all()

    def accepts_direct(self) -> bool:
        """Whether a job queued now may be claimed for this lane in its own insert: the lane is sending
        (not paused, failing, draining a backlog or suspended) and has little waiting."""
        forwarder = self.forwarder
        return (
            not forwarder.stopping.is_set()
            and self.consecutive_failures == 0
            and not self.backlog
            and self.paused_until <= time.monotonic()
            and len(self.direct) < DIRECT_MAX
            and bool(self.threads)
            and not forwarder.suspensions.is_suspended(self.name, forwarder.settings.poll_interval_s)
        )

    def give(self, jobs: list[ClaimedJob], claimed_at: float) -> None:
        with self.wakeup:
            self.direct.extend((claimed_at, job) for job in jobs)
            self.signalled = True
            self.wakeup.notify_all()
            if len(self.direct) >= HELPER_JOINS_AT:
                self.helpers.notify()

    def _take_direct(self) -> tuple[list[ClaimedJob], float]:
        """Up to CLAIM_BATCH jobs handed over by the receive path, and when the oldest was claimed."""
        with self.wakeup:
            taken = [self.direct.popleft() for _ in range(min(CLAIM_BATCH, len(self.direct)))]
        return [job for _, job in taken], (taken[0][0] if taken else 0.0)

    def _hand_back_direct(self, delay_s: float, reason: str) -> None:
        """Not sending now (paused, suspended, gone from the config): jobs handed over go back to the queue."""
        jobs, _ = self._take_direct()
        while jobs:
            self.forwarder.queue.postpone(jobs, delay_s, reason)
            jobs, _ = self._take_direct()

    def _claim_due(self, poll_interval_s: float) -> bool:
        """Claim from the catalog only when a pending job was queued, a backlog is draining, or a poll
        interval passed: jobs handed over directly need no claim transaction, nor an empty one after them."""
        return self.claim_wanted or self.backlog or time.monotonic() - self.last_claim >= poll_interval_s

    def wait(self, seconds: float, index: int = 0, use_signal: bool = True) -> None:
        """Sleep up to `seconds`, or not at all when work was signalled since the last wait.

        Without the flag, a job committed between worker 0's empty claim and its wait would sit
        until the next poll. Only worker 0 consumes it (`use_signal`): helper workers (`index` > 0)
        idle on their own condition, woken by `notify` only, so they cannot take the signal meant
        for it (nor wake for every job handed over).
        """
        with self.wakeup:
            if index > 0:
                self.helpers.wait(timeout=seconds)
                return
            if not use_signal:
                self.wakeup.wait(timeout=seconds)
                return
            if not self.signalled:
                self.wakeup.wait(timeout=seconds)
            self.signalled = False

    def start(self, workers: int) -> None:
        try:  # an outage that began before a restart still counts from its start
            self.unreachable_since = self.forwarder.outages.unreachable_since(self.name)
        except Exception:
            log.exception("outage_state_unreadable", destination=self.name)
        for index in range(workers):
            thread = threading.Thread(target=self.run, args=(index,), name=f"forward-{self.name}-{index}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def pause(self, reason: str) -> float:
        self.consecutive_failures += 1
        delay = backoff_s(self.consecutive_failures, self.forwarder.settings)
        self.paused_until = time.monotonic() + delay
        log.warning("destination_unavailable", destination=self.name, reason=reason, retry_in_s=round(delay, 1))
        try:
            since = self.forwarder.outages.note_unreachable(self.name, reason, utcnow() + timedelta(seconds=delay))
        except Exception:
            log.exception("outage_not_recorded", destination=self.name)
            since = utcnow()
        with self._outage_lock:
            self.draining = None  # down again before its backlog drained: one longer outage
            if self.unreachable_since is None:
                self.unreachable_since = since
        return delay

    def answered(self) -> None:
        """The destination answered a C-STORE: if it was unreachable, log its recovery."""
        if self.unreachable_since is None:  # the common case, without a lock
            return
        with self._outage_lock:
            since, self.unreachable_since = self.unreachable_since, None
            if since is None:
                return
            recovery = self.draining = Recovery(since, utcnow())
        try:
            # The catalog's start counts: the outage may have begun before a restart, or on another node.
            recovery.unreachable_since = min(since, self.forwarder.outages.note_reachable(self.name) or since)
            pending = self.forwarder.queue.open_count(self.name)
        except Exception:
            log.exception("outage_not_recorded", destination=self.name)
            pending = None
        log.info(
            "destination_recovered", destination=self.name, unreachable_since=recovery.unreachable_since.isoformat(),
            outage_s=recovery.outage_s, pending=pending,
        )

    def delivered(self, count: int) -> None:
        recovery = self.draining
        if recovery is not None:
            with self._outage_lock:
                recovery.delivered += count

    def check_drained(self) -> None:
        """After a recovery, once nothing is left to send: log how much the outage had held back."""
        recovery = self.draining
        if recovery is None or self.forwarder.queue.open_count(self.name):
            return
        with self._outage_lock:
            if self.draining is not recovery:
                return
            self.draining = None
        now = utcnow()
        log.info(
            "destination_backlog_drained", destination=self.name, instances=recovery.delivered,
            outage_s=recovery.outage_s, drain_s=round((now - recovery.recovered_at).total_seconds(), 1),
        )

    def run(self, index: int = 0) -> None:
        """Worker 0 always sends; the others join only while there is a backlog (a claim came back
        full) or HELPER_JOINS_AT jobs handed over wait.

        In a steady stream one association keeps up, and extra workers would only compete for
        the interpreter; after an outage, or under a burst, every worker drains the queue.
        """
        forwarder = self.forwarder
        client: EncodedStoreClient | None = None
        idle_since = time.monotonic()
        while not forwarder.stopping.is_set():
            server = forwarder.holder.current.server(self.name)
            if server is None or server.deleted:
                self._hand_back_direct(0.0, "handed back: destination not configured")
                self.wait(forwarder.settings.poll_interval_s, index)
                continue
            if client is None or client.peer != server:
                if client:
                    client.close()
                client = EncodedStoreClient(server, forwarder.holder.current.router, forwarder.learn_capabilities)
            pause = self.paused_until - time.monotonic()
            if pause > 0:
                self._hand_back_direct(pause, "handed back: destination paused")
                self.wait(min(pause, forwarder.settings.poll_interval_s), index)
                continue
            if forwarder.suspensions.is_suspended(self.name, forwarder.settings.poll_interval_s):
                # In maintenance (`queue suspend`): its jobs wait, no attempt is spent.
                self._hand_back_direct(0.0, "handed back: destination suspended")
                client.close()
                self.wait(forwarder.settings.poll_interval_s, index)
                continue
            if index > 0 and not self.backlog and len(self.direct) < HELPER_JOINS_AT:
                if time.monotonic() - idle_since > IDLE_RELEASE_S:
                    client.close()
                self.wait(forwarder.settings.poll_interval_s, index)
                continue
            jobs, claimed_at = self._take_direct()
            if not jobs and self._claim_due(forwarder.settings.poll_interval_s):
                self.claim_wanted = False  # before the claim: a job queued meanwhile asks again
                self.last_claim = claimed_at = time.monotonic()
                try:
                    jobs = forwarder.queue.claim(self.name, CLAIM_BATCH)
                except Exception:
                    log.exception("claim_failed", destination=self.name)
                    self.wait(forwarder.settings.poll_interval_s, index)
                    continue
                self.backlog = len(jobs) == CLAIM_BATCH
                if self.backlog:
                    self.notify()
            if not jobs:
                if self.draining is not None:
                    try:
                        self.check_drained()
                    except Exception:
                        log.exception("drain_check_failed", destination=self.name)
                if time.monotonic() - idle_since > IDLE_RELEASE_S:
                    client.close()
                self.wait(forwarder.settings.poll_interval_s, index)
                continue
            idle_since = time.monotonic()
            try:
                self.send_batch(client, server, jobs, claimed_at=claimed_at)
            except Exception:
                # The worker must outlive any one batch (a database hiccup in fail/postpone, an
                # unreadable spool folder): what it still holds is claimed and comes back after
                # the lease.
                log.exception("forward_batch_failed", destination=self.name, jobs=len(jobs))
                client.close(abort=True)
                self.wait(forwarder.settings.poll_interval_s, index, use_signal=False)
        if client:
            client.close()

    def send_batch(
        self, client: EncodedStoreClient, server: ServerConfig, jobs: list[ClaimedJob], claimed_at: float | None = None
    ) -> None:
        forwarder = self.forwarder
        delivered: list[ClaimedJob] = []
        # Send only while the claim is surely ours: past half the lease (a slow PACS, large files)
        # or when stopping, the rest goes back to the queue instead of racing another claimant.
        send_until = (claimed_at or time.monotonic()) + forwarder.settings.lease_s / 2
        for position, job in enumerate(jobs):
            if forwarder.stopping.is_set() or time.monotonic() > send_until:
                forwarder.queue.postpone(jobs[position:], 0.0, "handed back: stopping or claim lease half spent")
                break
            path = job.spool_path
            try:
                outcome = client.send_file(path, job.sop_class_uid, job.sop_instance_uid, job.transfer_syntax_uid)
            except SpoolFileMissing:
                forwarder.queue.fail(job, f"spool file {path} is missing", None, permanent=True)
                forwarder.count_failure(self.name, "spool_missing", "spool file missing", reachable=None)
                log.error("dead_letter", job_id=job.id, destination=self.name, reason="spool file missing")
                forwarder.audit_dead_letter(job, f"spool file {path} is missing")
                continue
            except PeerUnavailable as exc:
                reason = f"{exc.status}: {exc.reason}"
                forwarder.count_failure(self.name, "unreachable", reason, reachable=False)
                delay = self.pause(reason)
                # Not an attempt of these instances (none was sent): the outage is the destination's.
                forwarder.queue.postpone(jobs[position:], delay, f"not sent, destination {exc.status}: {exc.reason}")
                break
            except ContextRejected as exc:
                forwarder.count_failure(self.name, "context_rejected", str(exc), reachable=True)
                forwarder.queue.fail(job, str(exc), None, permanent=True)
                log.error("dead_letter", job_id=job.id, destination=self.name, sop_instance_uid=job.sop_instance_uid, reason=str(exc))
                forwarder.audit_dead_letter(job, str(exc))
                continue
            except StoreFailed as exc:
                forwarder.count_failure(self.name, "store_failed", str(exc), reachable=False)
                state = forwarder.queue.fail(job, str(exc), None, permanent=False)
                if state == "dead":
                    forwarder.audit_dead_letter(job, str(exc))
                delay = self.pause(str(exc))
                forwarder.queue.postpone(jobs[position + 1 :], delay, str(exc))
                log.warning("store_retry", job_id=job.id, destination=self.name, state=state, reason=str(exc))
                break
            self.answered()
            if outcome.success:
                delivered.append(job)
                self.consecutive_failures = 0
            else:
                reason = f"status 0x{outcome.status:04X} {outcome.comment}".strip()
                forwarder.count_failure(self.name, "refused", reason, reachable=True)
                state = forwarder.queue.fail(job, reason, outcome.status, permanent=outcome.permanent_failure)
                log_event = log.error if state == "dead" else log.warning
                log_event("store_refused", job_id=job.id, destination=self.name, sop_instance_uid=job.sop_instance_uid, reason=reason, state=state)
                if state == "dead":
                    forwarder.audit_dead_letter(job, reason)
        if delivered:
            self.delivered(len(delivered))
            forwarder.acknowledge(server, delivered)


class Forwarder:
    """Owns one lane per destination; `notify` wakes a lane as soon as a job is committed."""

    def __init__(
        self,
        holder: ConfigHolder,
        queue: ForwardQueue,
        spool: Spool,
        record_acks: AckRecorder,
        audit: AuditTrail | NoAudit | None = None,
        metrics: Metrics | None = None,
        capabilities: DestinationCapabilities | None = None,
    ):
        self.holder = holder
        self.metrics = metrics
        self.capabilities = capabilities
        self.audit = audit or NoAudit()
        self.queue = queue
        self.outages = OutageBook(queue.sessions)
        self.suspensions = Suspensions(queue.sessions)
        self.spool = spool
        self.acks = AckWriter(record_acks, spool, deliveries=DeliveryAudit(self.audit))
        self.stopping = threading.Event()
        self.lanes: dict[str, DestinationLane] = {}
        self._lock = threading.Lock()

    @property
    def settings(self):
        return self.holder.current.router.forwarding

    def start(self) -> None:
        self.acks.start()
        if self.capabilities is not None:
            self.capabilities.start()
        self.ensure_lanes(self.holder.current)
        for name in self.queue.destinations_with_work():
            if name not in self.lanes:
                log.warning("queued_jobs_for_unknown_destination", destination=name)

    def ensure_lanes(self, config: Config) -> None:
        with self._lock:
            for server in config.live_servers():
                if server.name not in self.lanes:
                    lane = DestinationLane(self, server.name)
                    self.lanes[server.name] = lane
                    lane.start(config.router.forwarding.workers_per_destination)

    def learn_capabilities(self, server: ServerConfig, link: Link) -> None:
        """What a destination accepted and refused in an association a lane just opened."""
        if self.capabilities is None:
            return
        lane = self.lanes.get(server.name)
        if lane is not None and lane.consecutive_failures:
            # Back after an outage or a failure: it may have been reconfigured meanwhile.
            self.capabilities.forget_refusals(server.name)
        self.capabilities.learn(server, link)

    def notify(self, destination: str) -> None:
        lane = self.lanes.get(destination)
        if lane is not None:
            lane.notify()

    def take_direct(self, destination: str) -> bool:
        """Whether the receive path may insert a job for `destination` already claimed by this node and
        hand it over with `give`: one catalog transaction per instance instead of two."""
        lane = self.lanes.get(destination)
        return lane is not None and lane.accepts_direct()

    def give(self, destination: str, jobs: list[ClaimedJob], claimed_at: float) -> None:
        """Jobs committed as claimed by this node (`take_direct`), for the lane to send. Without a lane
        (gone meanwhile) they stay claimed until their lease runs out, then any node sends them."""
        lane = self.lanes.get(destination)
        if lane is not None:
            lane.give(jobs, claimed_at)

    def audit_dead_letter(self, job: ClaimedJob, reason: str) -> None:
        """A job given up on: an audit row (the job itself stays, `queue retry` revives it)."""
        self.audit.record(
            "forward", "dead_letter", servers=[job.destination], study_uid=job.header.get("StudyInstanceUID"),
            detail=f"job {job.id}, SOP Instance UID {job.sop_instance_uid}, after {job.attempts + 1} attempts: {reason}"[:2000],
            counts={"instances": 1},
        )

    def acknowledge(self, server: ServerConfig, jobs: list[ClaimedJob]) -> None:
        """Hand the deliveries to the ack writer: catalog, jobs done, spool files freed."""
        if self.metrics is not None:
            self.metrics.forwarded(server.name, len(jobs))
        self.acks.submit(server, jobs)

    def count_failure(self, destination: str, reason: str, error: str, reachable: bool | None) -> None:
        """For /metrics: a failed send and whether the destination answered at all (None: not its fault)."""
        if self.metrics is not None:
            self.metrics.forward_failed(destination, reason, error, reachable)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.stopping.set()
        for lane in self.lanes.values():
            lane.notify()
        deadline = time.monotonic() + timeout_s
        for lane in self.lanes.values():
            for thread in lane.threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.acks.stop(timeout_s=max(1.0, deadline - time.monotonic()))
        released = self.queue.release_claims()
        if self.capabilities is not None:
            self.capabilities.stop()
        log.info("forwarder_stopped", released_claims=released)

    def wait_until_idle(self, timeout_s: float) -> bool:
        """True once no job is pending or claimed (dead letters do not count); for tests and import."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.queue.destinations_with_work():  # open jobs only: never counts the finished ones
                return True
            time.sleep(0.05)
        return False
