"""The admin API and the status page of a real router in front of real Orthanc, the page in headless Chromium."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomrouter.http.auth import new_token
from tests.support.http_support import (
    basic,
    bearer,
    http_request,
    http_router,
    instances,
    wait_until,
)
from tests.support.store_helpers import storescu

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
DEST = "Test PACS 1"
ADMIN_TOKEN, ADMIN_HASH = new_token()
READER_TOKEN, READER_HASH = new_token()


@pytest.fixture
def admin_router(farm_config, router_port):
    def add_clients(data):
        data["clients"].append(
            {"ae_title": "ADMIN_DESK", "roles": ["admin"], "http_token_sha256": ADMIN_HASH}
        )
        data["clients"].append(
            {"ae_title": "READER", "roles": ["test_read"], "http_token_sha256": READER_HASH}
        )

    with http_router(farm_config, router_port, add_clients) as running:
        yield running


def test_admin_api_needs_the_admin_role(admin_router, clean_orthanc_farm, tmp_path, router_port):
    router, url = admin_router
    admin = basic("ADMIN_DESK", ADMIN_TOKEN)
    for path in ("/api/servers", "/api/queue", "/api/audit", "/"):
        assert http_request(url + path).status == 401
        assert http_request(url + path, bearer(READER_TOKEN)).status == 403
        assert http_request(url + path, admin).status == 200, path
    files = instances(tmp_path / "in", 2)
    assert storescu(router_port, files).returncode == 0
    servers = wait_until(
        lambda: (
            (s := http_request(url + "/api/servers", admin).json())
            and s[0]["health"]
            and s[0]["studies"] == 1
            and s
        )
    )
    assert (
        servers[0]["name"] == DEST
        and servers[0]["primary"]
        and servers[0]["health"]["status"] == "up"
    )
    assert {s["name"] for s in servers} == {server.spec.name for server in clean_orthanc_farm}
    queue = http_request(url + "/api/queue", admin).json()
    assert {"destination": DEST, "pending": 0, "sending": 0, "dead": 0}.items() <= queue[0].items()
    # The router writes its audit rows in the background, a moment after what they record.
    events = wait_until(
        lambda: http_request(
            url + "/api/audit?operation=association&ae=WORKSTATION&limit=5", admin
        ).json()
    )
    assert events and all(
        e["operation"] == "association" and e["calling_ae"] == "WORKSTATION" for e in events
    )
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    study = wait_until(
        lambda: (
            (r := http_request(url + f"/api/studies/{study_uid}", admin)).status == 200 and r.json()
        )
    )
    assert study["servers"][0]["server"] == DEST and study["servers"][0]["instances"] == 2
    assert study["deliveries"] == []
    assert http_request(url + "/api/studies/1.2.3.4", admin).status == 404
    refusals = wait_until(
        lambda: (rows := http_request(url + "/api/audit?operation=http&limit=50", admin).json())
        and {e["outcome"] for e in rows} >= {"unauthorized", "forbidden"}
        and rows
    )
    assert {e["outcome"] for e in refusals} == {"unauthorized", "forbidden"}
    assert http_request(url + "/api/audit?since=yesterday", admin).status == 400


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)"
)
def test_status_page_shows_an_outage_and_the_drain(
    admin_router, clean_orthanc_farm, tmp_path, router_port
):
    playwright_api = pytest.importorskip("playwright.sync_api")
    router, url = admin_router
    farm = clean_orthanc_farm
    requested: list[str] = []
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            # A phone-sized window, logged in with HTTP Basic (AE title, token).
            context = browser.new_context(
                viewport={"width": 390, "height": 844},
                http_credentials={"username": "ADMIN_DESK", "password": ADMIN_TOKEN},
            )
            page = context.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(url + "/")
            card = page.locator(f'[data-server="{DEST}"]')
            expect = playwright_api.expect
            expect(card).to_have_attribute("data-status", "up", timeout=20_000)
            expect(card.get_by_test_id("waiting")).to_have_text("0")

            farm[0].stop()
            try:
                assert storescu(router_port, instances(tmp_path / "outage", 4)).returncode == 0
                # The page refreshes itself: no reload from the test.
                expect(card).to_have_attribute("data-status", "unreachable", timeout=30_000)
                expect(card.get_by_test_id("waiting")).to_have_text("4", timeout=15_000)
                expect(card).to_contain_text("unreachable")
                expect(card.get_by_test_id("oldest")).not_to_have_text("-")
                page.screenshot(path=str(tmp_path / "outage.png"), full_page=True)
                overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
            finally:
                farm[0].start()
            expect(card).to_have_attribute("data-status", "up", timeout=60_000)
            expect(card.get_by_test_id("waiting")).to_have_text("0", timeout=30_000)
            expect(page.locator("svg")).to_be_visible()
            assert "received 4" in page.inner_text("body")
            page.screenshot(path=str(tmp_path / "drained.png"), full_page=True)
        finally:
            browser.close()
    assert farm[0].wait_for_instance_count(4) == 4
    # Everything the page loads comes from the router itself (no CDN, works offline).
    assert requested and all(r.startswith(url) for r in requested)
    keep = Path(tmp_path.parent / "status-page")
    keep.mkdir(exist_ok=True)
    for name in ("outage.png", "drained.png"):
        shutil.copy(tmp_path / name, keep / name)
