"""The audit trail: `record()` never blocks; a background thread batches rows into the catalog.

DICOM handlers must not wait for (or fail because of) the database: a row goes into a bounded
in-memory buffer and a writer thread inserts batches. While the database is unavailable the
writer keeps the rows and retries with backoff; they are written when it returns. When the
buffer is full, new rows are counted and dropped, and one row saying how many were lost is
written once the database answers again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dicomrouter.catalog.queries import audit_values
from dicomrouter.logging import get_logger
from dicomrouter.metrics import Metrics

log = get_logger(__name__)

# Writes a batch of rows (as catalog.queries.audit_values makes them) in one transaction.
AuditSink = Callable[[Sequence[Mapping[str, Any]]], None]


class AuditTrail:
    """A bounded buffer of audit rows and the thread that writes them."""

    def __init__(
        self,
        sink: AuditSink,
        node: str | None = None,
        capacity: int = 50_000,
        batch_size: int = 500,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
        metrics: Metrics | None = None,
        linger_s: float = 0.2,
    ):
        self.sink = sink
        self.metrics = metrics  # every recorded operation is counted there too
        self.node = node
        self.capacity = capacity
        self.batch_size = batch_size
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        # Rows come in bursts (an association, then its operations): the writer waits this long after
        # the first one and writes them together, after the work that recorded them, not during it
        # (a commit holds the interpreter for milliseconds, right when a C-FIND sends its queries).
        self.linger_s = linger_s
        self._flush_waiters = 0
        self._buffer: list[dict[str, Any]] = []
        self._dropped = 0
        self._written = 0
        self._failing_since: str | None = None
        self._condition = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def record(
        self, operation: str, outcome: str, duration_s: float | None = None, observed: bool = False, **fields: Any
    ) -> None:
        """Queue one row (fields as Catalog.add_audit takes them); returns at once, never raises.

        `duration_s` (a C-FIND, C-MOVE or C-GET from request to final response) goes to the metrics only.
        `observed`: the operations this row sums were already counted one by one (see `observe`).
        """
        if self.metrics is not None and not observed:
            self.metrics.observe(operation, outcome, duration_s)
        try:
            row = audit_values(operation, outcome, node=fields.pop("node", self.node), **fields)
        except Exception:
            log.exception("audit_record_invalid", operation=operation, outcome=outcome)
            return
        with self._condition:
            if len(self._buffer) >= self.capacity:
                if not self._dropped:
                    log.error("audit_buffer_full", capacity=self.capacity, reason="rows dropped until it drains")
                self._dropped += 1
                return
            self._buffer.append(row)
            self._condition.notify_all()

    def observe(self, operation: str, outcome: str) -> None:
        """Count an operation for the metrics without a row (a repeat that a summary row will sum)."""
        if self.metrics is not None:
            self.metrics.observe(operation, outcome)

    def count_store(self, outcome: str) -> None:
        """One C-STORE answered (its row is a per-association tally, see AssociationAudit)."""
        if self.metrics is not None:
            self.metrics.store_received(outcome)

    @property
    def written(self) -> int:
        """Rows written so far (for health output and tests)."""
        return self._written

    @property
    def backlog(self) -> int:
        """Rows waiting to be written."""
        with self._condition:
            return len(self._buffer)

    def start(self) -> AuditTrail:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()
        return self

    def flush(self, timeout_s: float) -> bool:
        """Wait until every row recorded so far is written; False if that took over `timeout_s`."""
        with self._condition:
            self._flush_waiters += 1  # the writer stops lingering
            self._condition.notify_all()
            try:
                return self._condition.wait_for(lambda: not self._buffer and not self._dropped, timeout_s)
            finally:
                self._flush_waiters -= 1

    def stop(self, timeout_s: float = 5.0) -> None:
        """Write what is buffered (up to `timeout_s`), then stop the writer."""
        if self._thread is None:
            return
        self.flush(timeout_s)
        self._stopping.set()
        with self._condition:
            self._condition.notify_all()
        self._thread.join(timeout=max(timeout_s, 1.0))
        self._thread = None
        lost = self.backlog
        if lost:
            log.error("audit_rows_lost", rows=lost, reason=self._failing_since or "writer stopped")

    def _next_batch(self) -> tuple[list[dict[str, Any]], int] | None:
        with self._condition:
            while not self._buffer and not self._dropped and not self._stopping.is_set():
                self._condition.wait()
            lingering_until = time.monotonic() + self.linger_s
            while (
                not self._stopping.is_set()
                and not self._flush_waiters
                and len(self._buffer) < self.batch_size
                and (remaining := lingering_until - time.monotonic()) > 0
            ):
                self._condition.wait(remaining)
            if self._stopping.is_set():
                return None
            return self._buffer[: self.batch_size], self._dropped

    def _run(self) -> None:
        delay = self.retry_initial_s
        while True:
            taken = self._next_batch()
            if taken is None:
                return
            batch, dropped = taken
            rows = list(batch)
            if dropped:
                rows.append(
                    audit_values(
                        "audit", "dropped", node=self.node, counts={"rows": dropped},
                        detail=f"audit buffer full ({self.capacity} rows): {dropped} rows were not recorded",
                    )
                )
            try:
                self.sink(rows)
            except Exception as exc:
                self._note_failure(exc)
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, self.retry_max_s)
                continue
            delay = self.retry_initial_s
            if self._failing_since is not None:
                log.info("audit_writer_recovered", rows=len(rows))
                self._failing_since = None
            with self._condition:
                del self._buffer[: len(batch)]
                self._dropped -= dropped
                self._written += len(batch)
                self._condition.notify_all()

    def _note_failure(self, exc: Exception) -> None:
        reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if self._failing_since is None:
            log.warning("audit_writer_waiting", reason=reason, backlog=self.backlog)
        self._failing_since = reason


class NoAudit:
    """An audit trail that records nothing (tools and tests that run parts of the router)."""

    def record(self, operation: str, outcome: str, **fields: Any) -> None:
        pass

    def observe(self, operation: str, outcome: str) -> None:
        pass

    def count_store(self, outcome: str) -> None:
        pass


@dataclass
class _StoreTally:
    instances: int = 0
    servers: set[str] = field(default_factory=set)
    reason: str | None = None


class AssociationAudit:
    """The audit rows of one accepted association; stores are summed per study and outcome.

    A modality sends a study as hundreds of C-STOREs: one row per (study, outcome) with the
    count is written when the association ends, not one row per instance.
    """

    def __init__(self, trail: AuditTrail | NoAudit, calling_ae: str, called_ae: str, address: str):
        self.trail = trail
        self.identity = {"calling_ae": calling_ae, "called_ae": called_ae, "address": address}
        self._stores: dict[tuple[str | None, str], _StoreTally] = {}
        self._lock = threading.Lock()

    def record(self, operation: str, outcome: str, **fields: Any) -> None:
        """One row naming this association's caller."""
        self.trail.record(operation, outcome, **self.identity, **fields)

    def count_store(self, study_uid: str | None, outcome: str, servers: Sequence[str], reason: str | None) -> None:
        """Add one C-STORE to the tally of its study and outcome."""
        self.trail.count_store(outcome)
        with self._lock:
            tally = self._stores.setdefault((study_uid, outcome), _StoreTally())
            tally.instances += 1
            tally.servers.update(servers)
            if reason and tally.reason is None:
                tally.reason = reason

    def close(self) -> None:
        """Write the store tallies (called once, when the association ends)."""
        with self._lock:
            stores, self._stores = self._stores, {}
        for (study_uid, outcome), tally in stores.items():
            self.record(
                "store",
                outcome,
                servers=sorted(tally.servers),
                study_uid=study_uid,
                detail=tally.reason,
                counts={"instances": tally.instances},
            )


@dataclass
class _DeliveryTally:
    first_at: datetime
    last_at: datetime
    opened: float  # monotonic
    touched: float  # monotonic
    instances: int = 0


class DeliveryAudit:
    """Deliveries to the destinations, summed per (destination, study) over a burst.

    A 2,000-image study forwarded after an outage is one row `deliver success instances=2000`
    with the times of its first and last acknowledgement, not 2,000 rows. A burst ends when no
    instance of that study reached that destination for `quiet_s`, or after `max_open_s` (a
    long backlog writes a row every few minutes, so the trail never lags far behind).
    """

    def __init__(
        self,
        trail: AuditTrail | NoAudit,
        quiet_s: float = 5.0,
        max_open_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.trail = trail
        self.quiet_s = quiet_s
        self.max_open_s = max_open_s
        self.clock = clock
        self._tallies: dict[tuple[str, str | None], _DeliveryTally] = {}
        self._lock = threading.Lock()

    def add(self, destination: str, study_uid: str | None, instances: int, at: datetime | None = None) -> None:
        """Count `instances` of one study acknowledged by `destination` (at `at`, default now)."""
        at = at or datetime.now(UTC)
        now = self.clock()
        with self._lock:
            tally = self._tallies.get((destination, study_uid))
            if tally is None:
                tally = self._tallies[(destination, study_uid)] = _DeliveryTally(at, at, now, now)
            tally.instances += instances
            tally.last_at = max(tally.last_at, at)
            tally.touched = now

    def next_due_s(self) -> float | None:
        """Seconds until a tally is due to be written (None: nothing is open)."""
        now = self.clock()
        with self._lock:
            if not self._tallies:
                return None
            return max(0.0, min(min(t.touched + self.quiet_s, t.opened + self.max_open_s) - now for t in self._tallies.values()))

    def flush(self, everything: bool = False) -> int:
        """Write the rows of finished bursts (all open ones with `everything`); returns how many."""
        now = self.clock()
        with self._lock:
            due = [
                (key, tally)
                for key, tally in self._tallies.items()
                if everything or now - tally.touched >= self.quiet_s or now - tally.opened >= self.max_open_s
            ]
            for key, _ in due:
                del self._tallies[key]
        for (destination, study_uid), tally in due:
            self.trail.record(
                "deliver", "success", servers=[destination], study_uid=study_uid, at=tally.last_at,
                counts={"instances": tally.instances},
                detail=f"{tally.instances} instance(s) acknowledged by {destination} "
                f"from {tally.first_at.isoformat(timespec='seconds')} to {tally.last_at.isoformat(timespec='seconds')}",
            )
        return len(due)


@dataclass
class _RejectionTally:
    window_start: float  # monotonic
    repeats: int = 0  # rejections since window_start not logged one by one
    calling_aes: set[str] = field(default_factory=set)
    called_aes: set[str] = field(default_factory=set)


class RejectionAggregator:
    """Rejected associations per (address, reason): the first is logged and audited, repeats are summed.

    A modality retrying in a loop, or a scan, rejected 1,500 times in 9 s, makes one warning line
    and one audit row, then one summary (line and row, with the count) per address and reason every
    `interval_s` while it goes on. After a quiet interval the next rejection is logged on its own
    again. Metrics still count every rejection. `start()` runs the thread that writes summaries;
    `stop()` writes what is left (call it before the audit trail stops).
    """

    MAX_AES_NAMED = 10

    def __init__(
        self,
        trail: AuditTrail | NoAudit,
        interval_s: float = 60.0,
        max_tracked: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.trail = trail
        self.interval_s = interval_s
        self.max_tracked = max_tracked  # addresses beyond it are summed under address "*"
        self.clock = clock
        self._tallies: dict[tuple[str, str], _RejectionTally] = {}
        self._lock = threading.Lock()
        self._next_flush = clock() + interval_s  # record() writes due summaries too (no thread needed)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, address: str, reason: str, calling_ae: str, called_ae: str) -> bool:
        """One rejected association; True when it was logged and audited on its own."""
        now = self.clock()
        with self._lock:
            key = (address, reason)
            if key not in self._tallies and len(self._tallies) >= self.max_tracked:
                key = ("*", reason)
            tally = self._tallies.get(key)
            if tally is None:
                self._tallies[key] = _RejectionTally(now)
            else:
                tally.repeats += 1
                for names, name in ((tally.calling_aes, calling_ae), (tally.called_aes, called_ae)):
                    if len(names) < self.MAX_AES_NAMED:
                        names.add(name)
        if now >= self._next_flush:
            self._next_flush = now + min(self.interval_s, 1.0)
            self.flush()
        if tally is not None:
            self.trail.observe("association", "rejected")
            return False
        log.warning("association_rejected", calling_ae=calling_ae, called_ae=called_ae, address=address, reason=reason)
        self.trail.record(
            "association", "rejected", calling_ae=calling_ae, called_ae=called_ae, address=address, detail=reason,
            counts={"associations": 1},
        )
        return True

    def flush(self, everything: bool = False) -> int:
        """Write the summaries of windows that ended (all of them with `everything`); returns how many."""
        now = self.clock()
        summaries: list[tuple[tuple[str, str], _RejectionTally, float]] = []
        with self._lock:
            for key, tally in list(self._tallies.items()):
                if not everything and now - tally.window_start < self.interval_s:
                    continue
                if tally.repeats:
                    summaries.append((key, tally, now - tally.window_start))
                    self._tallies[key] = _RejectionTally(now)  # still going: keep summing
                else:
                    del self._tallies[key]  # quiet for a whole interval: the next one is logged alone
                if everything:
                    self._tallies.pop(key, None)
        for (address, reason), tally, seconds in summaries:
            calling = sorted(tally.calling_aes)
            called = sorted(tally.called_aes)
            log.warning(
                "association_rejections_repeated", address=address, reason=reason, associations=tally.repeats,
                seconds=round(seconds, 1), calling_aes=calling, called_aes=called,
            )
            self.trail.record(
                "association", "rejected", observed=True, address=address,
                calling_ae=calling[0] if len(calling) == 1 else None,
                called_ae=called[0] if len(called) == 1 else None,
                counts={"associations": tally.repeats},
                detail=f"{reason}: {tally.repeats} more rejection(s) in {seconds:.0f} s"
                + (f" (calling AEs {', '.join(calling)})" if len(calling) > 1 else ""),
            )
        return len(summaries)

    def next_due_s(self) -> float:
        now = self.clock()
        with self._lock:
            starts = [t.window_start for t in self._tallies.values()]
        return max(0.05, min(starts, default=now) + self.interval_s - now)

    def start(self) -> RejectionAggregator:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="rejection-summaries", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and write every open summary."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self.flush(everything=True)

    def _run(self) -> None:
        while not self._stopping.wait(self.next_due_s()):
            try:
                self.flush()
            except Exception:
                log.exception("rejection_summary_failed")

