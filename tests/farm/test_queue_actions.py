"""`queue suspend/resume/reroute` against a real router and real Orthanc; audited, shown by the API and the page."""

from __future__ import annotations

import json
import time

import pytest

from dicomrouter.http.auth import new_token
from tests.support.http_support import (
    basic,
    http_request,
    http_router,
    instances,
    metric,
    metric_samples,
    wait_until,
)
from tests.support.store_helpers import storescu

pytestmark = pytest.mark.slow

TOKEN, TOKEN_HASH = new_token()
ADMIN = basic("ADMIN_DESK", TOKEN)
FIRST, SECOND = "Test PACS 1", "Test PACS 2"


@pytest.fixture
def router(farm_config, router_port):
    def add_admin(data):
        data["clients"].append(
            {"ae_title": "ADMIN_DESK", "roles": ["admin"], "http_token_sha256": TOKEN_HASH}
        )

    with http_router(farm_config, router_port, add_admin) as running:
        yield running


def queue_row(url: str, destination: str) -> dict:
    return next(
        r for r in http_request(url + "/api/queue", ADMIN).json() if r["destination"] == destination
    )


def test_suspend_holds_jobs_without_attempts_resume_sends_them(
    router, clean_orthanc_farm, tmp_path, router_port
):
    process, url = router
    farm = clean_orthanc_farm
    result = process.cli("queue", "suspend", FIRST)
    assert result.returncode == 0 and "suspended" in result.stdout, result.stderr
    assert "already suspended" in process.cli("queue", "suspend", FIRST).stdout
    assert process.cli("queue", "suspend", "No Such PACS").returncode == 1

    assert storescu(router_port, instances(tmp_path / "held", 3)).returncode == 0
    row = wait_until(lambda: (r := queue_row(url, FIRST))["pending"] == 3 and r)
    assert row["suspended_at"] and row["suspended_by"].startswith("cli ")
    samples = metric_samples(http_request(url + "/metrics").text)
    assert metric(samples, "dicomrouter_destination_suspended", destination=FIRST) == 1
    assert metric(samples, "dicomrouter_destination_suspended", destination=SECOND) == 0
    # Several poll intervals (0.2 s) pass: nothing is sent, no attempt is spent.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert farm[0].instance_count() == 0
        time.sleep(0.25)
    jobs = json.loads(process.cli("queue", "list", "--instances", "--json").stdout)["instances"]
    assert [(j["destination"], j["state"], j["attempts"]) for j in jobs] == [
        (FIRST, "pending", 0)
    ] * 3
    listing = process.cli("queue", "list").stdout
    assert "suspended" in listing.splitlines()[0]
    page = http_request(url + "/", ADMIN).text
    assert f'data-server="{FIRST}" data-status="suspended"' in page

    assert process.cli("queue", "resume", FIRST).returncode == 0
    assert "was not suspended" in process.cli("queue", "resume", FIRST).stdout
    assert farm[0].wait_for_instance_count(3, timeout=30) == 3
    wait_until(lambda: queue_row(url, FIRST)["pending"] == 0)
    actions = http_request(url + "/api/audit?operation=queue", ADMIN).json()
    assert [(a["outcome"], a["servers"]) for a in actions] == [
        ("suspended", [FIRST]),
        ("resumed", [FIRST]),
    ]
    page = http_request(url + "/", ADMIN).text
    assert "suspend Test PACS 1" in page and "resume Test PACS 1" in page


def test_reroute_sends_what_is_stuck_elsewhere(router, clean_orthanc_farm, tmp_path, router_port):
    process, url = router
    farm = clean_orthanc_farm
    farm[0].stop()
    try:
        assert storescu(router_port, instances(tmp_path / "stuck", 2)).returncode == 0
        wait_until(lambda: queue_row(url, FIRST)["pending"] == 2)
        bad = process.cli("queue", "reroute", "--from", FIRST, "--to", FIRST)
        assert bad.returncode == 2
        result = process.cli("queue", "reroute", "--from", FIRST, "--to", SECOND)
        assert result.returncode == 0, result.stderr
        assert "2 job(s) rerouted" in result.stdout
        assert farm[1].wait_for_instance_count(2, timeout=30) == 2
    finally:
        farm[0].start()
    action = http_request(url + "/api/audit?operation=queue", ADMIN).json()[-1]
    assert action["outcome"] == "rerouted" and action["servers"] == [FIRST, SECOND]
    assert farm[0].instance_count() == 0
