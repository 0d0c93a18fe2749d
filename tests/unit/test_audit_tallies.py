"""Audit rows that sum many events: rejected associations per address and reason, deliveries per burst."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from structlog.testing import capture_logs

from dicomrouter.audit import DeliveryAudit, RejectionAggregator


class Trail:
    """Collects what would be written to the audit trail and counted in the metrics."""

    def __init__(self):
        self.rows: list[tuple[str, str, dict]] = []
        self.observed: list[tuple[str, str]] = []

    def record(self, operation, outcome, observed=False, **fields):
        self.rows.append((operation, outcome, fields))
        if not observed:
            self.observed.append((operation, outcome))

    def observe(self, operation, outcome):
        self.observed.append((operation, outcome))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_flood_of_rejections_is_one_line_and_row_then_one_summary_per_interval():
    trail, clock = Trail(), Clock()
    rejections = RejectionAggregator(trail, interval_s=60, clock=clock)
    with capture_logs() as logs:
        for _ in range(1500):
            rejections.record("10.0.0.9", "unknown calling AE", "SCANNER", "DICOMROUTER")
            clock.now += 0.006  # 1,500 in 9 s
        rejections.record(
            "10.0.0.7", "unknown calling AE", "OTHER", "DICOMROUTER"
        )  # another address: its own line
        assert rejections.flush() == 0  # the interval has not ended
        clock.now += 60
        assert rejections.flush() == 1
    rejected = [e for e in logs if e["event"] == "association_rejected"]
    assert [e["address"] for e in rejected] == ["10.0.0.9", "10.0.0.7"]
    (summary,) = [e for e in logs if e["event"] == "association_rejections_repeated"]
    assert summary["address"] == "10.0.0.9" and summary["associations"] == 1499
    assert summary["calling_aes"] == ["SCANNER"]
    assert len(trail.rows) == 3
    assert sum(fields["counts"]["associations"] for _, _, fields in trail.rows) == 1501
    assert trail.rows[2][2]["address"] == "10.0.0.9" and trail.rows[2][2]["calling_ae"] == "SCANNER"
    assert len(trail.observed) == 1501, "the metrics still count every rejection"

    # Still going: summed again; after a quiet interval the next one is logged on its own.
    with capture_logs() as logs:
        rejections.record("10.0.0.9", "unknown calling AE", "SCANNER", "DICOMROUTER")
        clock.now += 61
        rejections.flush()  # one more in this window: a summary of 1
        clock.now += 61
        rejections.flush()  # a quiet window: forgotten
        rejections.record("10.0.0.9", "unknown calling AE", "SCANNER", "DICOMROUTER")
    assert [e["event"] for e in logs] == ["association_rejections_repeated", "association_rejected"]


def test_stop_writes_the_open_summaries():
    trail = Trail()
    rejections = RejectionAggregator(trail, interval_s=3600).start()
    for _ in range(5):
        rejections.record("10.0.0.9", "local limit exceeded", "A", "B")
    rejections.stop()
    assert [fields["counts"]["associations"] for _, _, fields in trail.rows] == [1, 4]


def test_deliveries_are_one_row_per_destination_and_study_per_burst():
    trail, clock = Trail(), Clock()
    deliveries = DeliveryAudit(trail, quiet_s=5, max_open_s=300, clock=clock)
    start = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
    for second in range(100):  # 2,000 instances of one study in 16-instance batches, 100 s
        deliveries.add("Test PACS 1", "1.2.3", 20, at=start + timedelta(seconds=second))
        clock.now += 1
        assert deliveries.flush() == 0
    deliveries.add("Test PACS 2", "1.2.3", 20, at=start)
    assert deliveries.next_due_s() == 4  # Test PACS 1 was last touched a second ago
    clock.now += 5
    assert deliveries.flush() == 2
    rows = {fields["servers"][0]: fields for _, _, fields in trail.rows}
    assert rows["Test PACS 1"]["counts"] == {"instances": 2000}
    assert rows["Test PACS 1"]["at"] == start + timedelta(seconds=99)
    assert "2026-01-01T08:00:00+00:00 to 2026-01-01T08:01:39+00:00" in rows["Test PACS 1"]["detail"]
    assert {op for op, _, _ in trail.rows} == {"deliver"}
    assert deliveries.next_due_s() is None


def test_a_long_backlog_writes_a_row_every_max_open():
    trail, clock = Trail(), Clock()
    deliveries = DeliveryAudit(trail, quiet_s=5, max_open_s=300, clock=clock)
    for _ in range(700):
        deliveries.add("Test PACS 1", "1.2.3", 1)
        clock.now += 1
        deliveries.flush()
    deliveries.flush(everything=True)
    assert [fields["counts"]["instances"] for _, _, fields in trail.rows] == [300, 300, 100]


def test_without_its_thread_a_later_rejection_writes_the_due_summary():
    trail, clock = Trail(), Clock()
    rejections = RejectionAggregator(trail, interval_s=60, clock=clock)  # never started
    for _ in range(10):
        rejections.record("10.0.0.9", "unknown calling AE", "SCANNER", "DICOMROUTER")
    clock.now += 61
    rejections.record("10.0.0.8", "unknown calling AE", "OTHER", "DICOMROUTER")
    assert [fields["counts"]["associations"] for _, _, fields in trail.rows] == [1, 9, 1]
