"""`/metrics` of a real router in front of real Orthanc: a destination goes down and comes back."""

from __future__ import annotations

import pytest

from tests.front.test_prometheus_alerts import alert_metric_names
from tests.support.http_support import (
    destination_lines,
    http_request,
    http_router,
    instances,
    metric,
    metric_samples,
    wait_until,
)
from tests.support.router_process import run_dcmtk
from tests.support.store_helpers import storescu

pytestmark = pytest.mark.slow

DEST = "Test PACS 1"


@pytest.fixture
def metrics_router(farm_config, router_port):
    with http_router(farm_config, router_port) as running:
        yield running


def scrape(url: str) -> tuple[str, dict]:
    reply = http_request(url + "/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    return reply.text, metric_samples(reply.text)


def test_metrics_follow_a_destination_outage(
    metrics_router, clean_orthanc_farm, tmp_path, router_port
):
    router, url = metrics_router
    farm = clean_orthanc_farm

    def state(**expected):
        text, samples = scrape(url)
        values = {
            "up": metric(samples, "dicomrouter_destination_up", destination=DEST),
            "pending": metric(samples, "dicomrouter_queue_jobs", destination=DEST, state="pending"),
            "claimed": metric(samples, "dicomrouter_queue_jobs", destination=DEST, state="claimed"),
            "forwarded": metric(samples, "dicomrouter_forwarded_instances_total", destination=DEST)
            or 0,
        }
        return (text, samples) if all(values[k] == v for k, v in expected.items()) else None

    first = instances(tmp_path / "first", 3)
    assert storescu(router_port, first).returncode == 0
    before, samples = wait_until(lambda: state(up=1, pending=0, claimed=0, forwarded=3))
    assert metric(samples, "dicomrouter_queue_oldest_pending_seconds", destination=DEST) == 0
    assert metric(samples, "dicomrouter_stores_received_total", outcome="success") == 3
    assert metric(samples, "dicomrouter_associations_total", outcome="accepted") >= 1
    assert metric(samples, "dicomrouter_ready") == 1
    assert metric(samples, "dicomrouter_spool_free_bytes") > 0

    farm[0].stop()
    try:
        second = instances(tmp_path / "second", 4)
        assert storescu(router_port, second).returncode == 0
        during, samples = wait_until(lambda: state(up=0, forwarded=3), timeout=30)
        waiting = sum(
            metric(samples, "dicomrouter_queue_jobs", destination=DEST, state=s)
            for s in ("pending", "claimed")
        )
        assert waiting == 4
        wait_until(
            lambda: (
                metric(scrape(url)[1], "dicomrouter_queue_oldest_pending_seconds", destination=DEST)
                >= 1
            )
        )
        during, samples = scrape(url)
        assert (
            metric(
                samples,
                "dicomrouter_forward_failures_total",
                destination=DEST,
                reason="unreachable",
            )
            >= 1
        )
        assert metric(samples, "dicomrouter_spool_bytes") > 0
    finally:
        farm[0].start()
    after, samples = wait_until(lambda: state(up=1, pending=0, claimed=0, forwarded=7), timeout=60)
    assert metric(samples, "dicomrouter_queue_oldest_pending_seconds", destination=DEST) == 0
    assert farm[0].instance_count() == 7

    # A federated C-FIND is counted with its duration.
    result = run_dcmtk(
        "findscu",
        "-S",
        "-aet",
        "WORKSTATION",
        "-aec",
        "DICOMROUTER",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "127.0.0.1",
        str(router_port),
    )
    assert result.returncode == 0, result.stderr
    samples = wait_until(
        lambda: (
            (s := scrape(url)[1])
            and metric(s, "dicomrouter_requests_total", operation="find", outcome="success")
            and s
        )
    )
    assert metric(samples, "dicomrouter_request_duration_seconds_count", operation="find") == 1
    # Every metric the alert rules use is served.
    served = {name for name, _labels in samples}
    assert alert_metric_names() <= served, alert_metric_names() - served
    # No label carries a UID or a patient's name.
    assert "1.2." not in after.replace("0.0.4", "") and "Patient" not in after

    report = tmp_path.parent / "metrics-outage.txt"
    report.write_text(
        "\n".join(
            [
                "# before",
                *destination_lines(before, DEST),
                "# during",
                *destination_lines(during, DEST),
                "# after",
                *destination_lines(after, DEST),
            ]
        )
        + "\n"
    )
    print(report.read_text())
