"""The in-memory parts of the metrics: destination states, throughput per minute, counting through the audit trail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import generate_latest

from dicomrouter.audit import AssociationAudit, AuditTrail
from dicomrouter.metrics import DestinationStates, Metrics, Throughput
from tests.support.http_support import metric, metric_samples


def test_destination_state_keeps_since_until_it_flips():
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    states = DestinationStates(clock=lambda: now[0])
    states.answered("A", "echo", 3.0)
    now[0] += timedelta(seconds=10)
    states.unreachable("A", "send", "connection refused")
    down_since = states.get("A").since
    now[0] += timedelta(seconds=10)
    states.unreachable("A", "echo", "timeout")
    state = states.get("A")
    assert (state.up, state.since, state.how, state.last_error) == (
        False,
        down_since,
        "echo",
        "timeout",
    )
    now[0] += timedelta(seconds=10)
    states.answered("A", "send")
    assert (
        states.get("A").up
        and states.get("A").since == now[0]
        and states.get("A").last_error is None
    )


def test_throughput_buckets_per_minute_over_an_hour():
    clock = [3600.0 * 100]
    throughput = Throughput(minutes=60, clock=lambda: clock[0])
    throughput.add(received=2)
    clock[0] += 61
    throughput.add(received=1, forwarded=3)
    clock[0] += 3600  # the first two minutes fall out of the hour
    throughput.add(forwarded=1)
    hour = throughput.last_hour()
    assert len(hour) == 60 and sum(m["received"] for m in hour) == 0
    assert hour[-1]["forwarded"] == 1


def test_the_audit_trail_counts_what_it_records():
    metrics = Metrics()
    trail = AuditTrail(lambda rows: None, metrics=metrics)  # not started: rows stay in the buffer
    trail.record("association", "accepted", calling_ae="CT")
    trail.record("association", "rejected", calling_ae="X")
    trail.record("find", "success", duration_s=0.2)
    trail.record("config", "changed")
    association = AssociationAudit(trail, "CT", "DICOMROUTER", "10.0.0.1")
    association.count_store("1.2.3", "success", ["PACS"], None)
    association.count_store("1.2.3", "refused", [], "not authorized")
    metrics.forwarded("PACS", 2)
    metrics.forward_failed("PACS", "unreachable", "refused", reachable=False)
    samples = metric_samples(generate_latest(metrics.registry).decode())
    assert metric(samples, "dicomrouter_associations_total", outcome="accepted") == 1
    assert metric(samples, "dicomrouter_associations_total", outcome="rejected") == 1
    assert metric(samples, "dicomrouter_requests_total", operation="find", outcome="success") == 1
    assert metric(samples, "dicomrouter_request_duration_seconds_count", operation="find") == 1
    assert metric(samples, "dicomrouter_stores_received_total", outcome="success") == 1
    assert metric(samples, "dicomrouter_stores_received_total", outcome="refused") == 1
    assert metric(samples, "dicomrouter_forwarded_instances_total", destination="PACS") == 2
    assert (
        metric(
            samples, "dicomrouter_forward_failures_total", destination="PACS", reason="unreachable"
        )
        == 1
    )
    assert not metrics.destinations.get("PACS").up
    assert "duration_s" not in str(trail._buffer)  # the duration is a metric, not an audit column
