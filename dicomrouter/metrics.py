"""What the router counts while it works, for `/metrics` and the status page.

One `Metrics` object per router process, made by app.py and handed to whoever counts: the audit
trail (associations, C-STOREs, C-FIND/C-MOVE/C-GET outcomes and durations: the DICOM front
counts by auditing, see `AuditTrail.record`), the forwarder (deliveries, failures, whether each
destination answers) and the health watch (C-ECHOs). Counting is an in-memory increment: nothing
here touches the database or the disk. Values that live elsewhere (queue depths, spool space,
open associations) are read when Prometheus scrapes (dicomrouter/http/metrics.py).

Labels are server names, operations and fixed outcome words: never patient data or UIDs.

What the DICOM front must call to be counted (it calls them anyway for the audit trail):
- `AuditTrail.record("association", "accepted" | "rejected", ...)`, directly or through
  `AssociationAudit.record` / `RejectionAggregator.record` (repeats: `AuditTrail.observe`);
- `AssociationAudit.count_store(study_uid, outcome, servers, reason)` once per C-STORE answered;
- `AssociationAudit.record(op, outcome, duration_s=seconds, ...)` once per C-ECHO (no duration), C-FIND,
  worklist, C-MOVE and C-GET, `duration_s` from the request to the final response;
- `DicomFront.active_associations()` and `DicomFront.running` are read at scrape time.
The forwarder calls `Forwarder.acknowledge` (-> `forwarded`) and `Forwarder.count_failure`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.registry import Collector

TIMED_OPERATIONS = ("find", "worklist", "move", "get")
COUNTED_OPERATIONS = ("echo", *TIMED_OPERATIONS)
# Why a send to a destination failed (the reason label of dicomrouter_forward_failures_total).
FAILURE_REASONS = ("unreachable", "refused", "store_failed", "context_rejected", "spool_missing")
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DestinationState:
    """Whether a destination answered the last time we sent to it or echoed it."""

    up: bool
    since: datetime  # when it last changed between up and down
    checked_at: datetime
    how: str  # send | echo
    last_error: str | None = None
    response_ms: float | None = None


class DestinationStates:
    """The latest answer of each destination; the forwarder and the health watch write it."""

    def __init__(self, clock: Callable[[], datetime] = utcnow):
        self._states: dict[str, DestinationState] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def answered(self, destination: str, how: str, response_ms: float | None = None) -> None:
        self._set(destination, True, how, None, response_ms)

    def unreachable(self, destination: str, how: str, error: str) -> None:
        self._set(destination, False, how, error[:500], None)

    def _set(
        self, destination: str, up: bool, how: str, error: str | None, response_ms: float | None
    ) -> None:
        now = self._clock()
        with self._lock:
            old = self._states.get(destination)
            since = old.since if old is not None and old.up == up else now
            last_error = (
                error
                if error is not None
                else (old.last_error if old is not None and not up else None)
            )
            self._states[destination] = DestinationState(
                up, since, now, how, last_error, response_ms
            )

    def get(self, destination: str) -> DestinationState | None:
        return self._states.get(destination)

    def all(self) -> dict[str, DestinationState]:
        with self._lock:
            return dict(self._states)

    def last_contact(self, destination: str) -> datetime | None:
        state = self._states.get(destination)
        return state.checked_at if state is not None else None


class Throughput:
    """Instances received and forwarded per minute over the last hour (for the status page)."""

    def __init__(self, minutes: int = 60, clock: Callable[[], float] = time.time):
        self.minutes = minutes
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [minute, received, forwarded]
        self._lock = threading.Lock()

    def _bucket(self) -> list[int]:
        minute = int(self._clock() // 60)
        if not self._buckets or self._buckets[-1][0] != minute:
            self._buckets.append([minute, 0, 0])
            while self._buckets and self._buckets[0][0] <= minute - self.minutes:
                self._buckets.popleft()
        return self._buckets[-1]

    def add(self, received: int = 0, forwarded: int = 0) -> None:
        with self._lock:
            bucket = self._bucket()
            bucket[1] += received
            bucket[2] += forwarded

    def last_hour(self) -> list[dict[str, int]]:
        """One entry per minute, oldest first, minutes without traffic included."""
        with self._lock:
            now = int(self._clock() // 60)
            counts = {b[0]: (b[1], b[2]) for b in self._buckets}
        return [
            {
                "minute": minute * 60,
                "received": counts.get(minute, (0, 0))[0],
                "forwarded": counts.get(minute, (0, 0))[1],
            }
            for minute in range(now - self.minutes + 1, now + 1)
        ]


class Metrics:
    """The router's counters and histograms, in a registry of its own (no global state)."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        # The library's switch is process-wide; `*_created` series only double the output here.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.destinations = DestinationStates()
        self.throughput = Throughput()
        r = self.registry
        if multiprocess_dir is not None:
            # One of several workers (the supervisor set PROMETHEUS_MULTIPROC_DIR before this process
            # imported prometheus_client): counts go to files there, and what is served is every
            # worker's files added up, never this process's own registry as well.
            from prometheus_client.multiprocess import MultiProcessCollector

            r = CollectorRegistry()
            MultiProcessCollector(self.registry, path=multiprocess_dir)
        self.associations = Counter(
            "dicomrouter_associations",
            "Associations by admission outcome (accepted, rejected)",
            ["outcome"],
            registry=r,
        )
        self.stores_received = Counter(
            "dicomrouter_stores_received",
            "C-STOREs received, by outcome (success, refused, failed)",
            ["outcome"],
            registry=r,
        )
        self.requests = Counter(
            "dicomrouter_requests",
            "C-ECHO, C-FIND, worklist, C-MOVE and C-GET requests by outcome",
            ["operation", "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "dicomrouter_request_duration_seconds",
            "Time from a C-FIND, C-MOVE or C-GET request to its final response",
            ["operation"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.forwarded_instances = Counter(
            "dicomrouter_forwarded_instances",
            "Instances a destination acknowledged",
            ["destination"],
            registry=r,
        )
        self.forward_failures = Counter(
            "dicomrouter_forward_failures",
            "Failed sends to a destination, by reason",
            ["destination", "reason"],
            registry=r,
        )
        for outcome in ("accepted", "rejected"):
            self.associations.labels(outcome)
        for outcome in ("success", "refused", "failed"):
            self.stores_received.labels(outcome)
        for operation in TIMED_OPERATIONS:
            self.request_seconds.labels(operation)

    # -- the DICOM front, through the audit trail

    def observe(self, operation: str, outcome: str, duration_s: float | None = None) -> None:
        """One audited operation (AuditTrail.record calls this for every row)."""
        if operation == "association":
            if outcome in ("accepted", "rejected"):
                self.associations.labels(outcome).inc()
        elif operation in COUNTED_OPERATIONS:
            self.requests.labels(operation, outcome).inc()
            if duration_s is not None and operation in TIMED_OPERATIONS:
                self.request_seconds.labels(operation).observe(duration_s)

    def store_received(self, outcome: str) -> None:
        """One C-STORE answered (AssociationAudit.count_store calls this)."""
        self.stores_received.labels(outcome).inc()
        if outcome == "success":
            self.throughput.add(received=1)

    # -- the forwarder

    def forwarded(self, destination: str, instances: int) -> None:
        self.forwarded_instances.labels(destination).inc(instances)
        self.throughput.add(forwarded=instances)
        self.destinations.answered(destination, "send")

    def forward_failed(
        self, destination: str, reason: str, error: str, reachable: bool | None
    ) -> None:
        """A send failed; `reachable`: the destination answered (a refusal) or not at all; None: unrelated to it."""
        self.forward_failures.labels(destination, reason).inc()
        if reachable:
            self.destinations.answered(destination, "send")
        elif reachable is False:
            self.destinations.unreachable(destination, "send", error)

    def add_collector(self, collector: Collector) -> None:
        """Values read at scrape time (queue depths, spool space, open associations)."""
        self.registry.register(collector)
