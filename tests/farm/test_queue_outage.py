"""A destination outage as an admin sees it: queue summaries, recovery log lines, catalog where, delivery audit.

Real router (`dicomrouter serve`), real Orthanc servers, DCMTK storescu, the real CLI.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.support.orthanc_fixtures import make_test_instance, write_instance
from tests.support.router_process import RouterProcess
from tests.support.store_helpers import edit_config, fast_retries, storescu

pytestmark = pytest.mark.slow

STUDY_SIZE = 30


def _study(folder: Path, count: int) -> tuple[str, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    files = [
        str(
            write_instance(
                folder / f"{index:04d}.dcm",
                make_test_instance(
                    study_uid=study_uid, series_uid=series_uid, instance_number=index + 1
                ),
            )
        )
        for index in range(count)
    ]
    return study_uid, files


def _wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def _log_events(router: RouterProcess, event: str) -> list[dict]:
    events = []
    for line in router.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            events.append(record)
    return events


def _cli_json(router: RouterProcess, *args: str):
    result = router.cli(*args, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def both_test_pacs(farm_config):
    """CT goes to Test PACS 1 and Test PACS 2; fast retries."""

    def change(data):
        fast_retries(data)
        data["routes"] = [
            {
                "name": "CT to both",
                "match": {"Modality": "CT"},
                "destinations": ["Test PACS 1", "Test PACS 2"],
            }
        ]

    return edit_config(farm_config, change)


def test_outage_is_summarised_logged_on_recovery_and_deliveries_audited(
    both_test_pacs, clean_orthanc_farm, tmp_path, router_port
):
    farm = clean_orthanc_farm
    study_uid, files = _study(tmp_path / "ct", STUDY_SIZE)
    router = RouterProcess(both_test_pacs, router_port).start()
    try:
        farm[0].stop()
        try:
            result = storescu(router_port, files)
            assert result.returncode == 0, result.stderr
            assert farm[1].wait_for_instance_count(STUDY_SIZE) == STUDY_SIZE

            # Item 10: one row per destination, not one per instance; the outage is stated.
            def down_summary():
                listing = _cli_json(router, "queue", "list")
                rows = {d["destination"]: d for d in listing["destinations"]}
                row = rows.get("Test PACS 1")
                return (
                    listing
                    if row and row["unreachable_since"] and row["failed_connects"] >= 2
                    else None
                )

            listing = _wait_for(down_summary)
            assert listing, router.cli("queue", "list").stdout
            (down,) = listing["destinations"]
            assert down["destination"] == "Test PACS 1"
            assert down["pending"] + down["sending"] == STUDY_SIZE and down["dead"] == 0
            assert down["oldest"] and down["next_attempt"] and down["last_error"]
            (study,) = listing["studies"]
            assert (study["destination"], study["study_uid"]) == ("Test PACS 1", study_uid)
            assert study["pending"] + study["sending"] == STUDY_SIZE and study["oldest"]
            text = router.cli("queue", "list").stdout
            assert "Test PACS 1" in text and "unreachable_since" in text
            assert len(text.splitlines()) < 12, text  # summaries, not 30 instance rows

            # Per instance, behind a flag: attempts 0 beside an error that says nothing was sent.
            rows = _cli_json(router, "queue", "list", "--instances")["instances"]
            assert len(rows) == STUDY_SIZE
            assert {r["study_uid"] for r in rows} == {study_uid}
            for row in rows:
                assert row["attempts"] == 0
                assert row["last_error"] is None or row["last_error"].startswith(
                    ("not sent, destination unreachable", "not sent, destination rejected")
                )
            assert (
                len(router.cli("queue", "list", "--instances", "--limit", "5").stdout.splitlines())
                == 2 + 5 + 2
            )

            # Per study: every destination, every state.
            def study_rows():
                rows = _cli_json(router, "queue", "list", "--study", study_uid)["studies"]
                return {row["destination"]: row for row in rows}

            per_study = _wait_for(
                lambda: (r := study_rows()).get("Test PACS 2", {}).get("done") == STUDY_SIZE and r
            )
            assert per_study, study_rows()
            assert (
                per_study["Test PACS 1"]["pending"] + per_study["Test PACS 1"]["sending"]
                == STUDY_SIZE
            )
            assert per_study["Test PACS 1"]["done"] == 0

            # Item 12: catalog where shows the copy on Test PACS 2 and the pending delivery to Test PACS 1.
            where = _wait_for(
                lambda: (w := _cli_json(router, "catalog", "where", study_uid))["servers"] and w
            )
            assert [(s["server"], s["instances"]) for s in where["servers"]] == [
                ("Test PACS 2", STUDY_SIZE)
            ]
            assert [
                (d["destination"], d["pending"] + d["sending"]) for d in where["deliveries"]
            ] == [("Test PACS 1", STUDY_SIZE)]
            where_text = router.cli("catalog", "where", study_uid).stdout
            assert "deliveries not done" in where_text and "Test PACS 1" in where_text
            assert not _log_events(router, "destination_recovered")
        finally:
            farm[0].start()

        # Item 11: recovery and drain are logged, with the outage length and the count.
        assert farm[0].wait_for_instance_count(STUDY_SIZE, timeout=60) == STUDY_SIZE
        drained = _wait_for(lambda: _log_events(router, "destination_backlog_drained"), timeout=30)
        assert drained, router.log_tail()
        (recovered,) = _log_events(router, "destination_recovered")
        assert recovered["destination"] == "Test PACS 1" and recovered["outage_s"] > 0
        assert 0 < recovered["pending"] <= STUDY_SIZE
        (drain,) = drained
        assert drain["destination"] == "Test PACS 1" and drain["instances"] == STUDY_SIZE
        assert drain["outage_s"] == recovered["outage_s"]

        # The summary is empty again, the outage no longer shown; where names both servers.
        listing = _cli_json(router, "queue", "list")
        assert listing["destinations"] == [] and listing["studies"] == []
        where = _cli_json(router, "catalog", "where", study_uid)
        assert sorted((s["server"], s["instances"]) for s in where["servers"]) == [
            ("Test PACS 1", STUDY_SIZE),
            ("Test PACS 2", STUDY_SIZE),
        ]
        assert where["deliveries"] == []
    finally:
        router.stop()

    # Item 13: the trail says when the images really reached each destination, one row per burst.
    events = _cli_json(router, "audit", "--study", study_uid)
    deliveries = [e for e in events if e["operation"] == "deliver"]
    per_server: dict[str, int] = {}
    for event in deliveries:
        assert event["outcome"] == "success"
        (server,) = event["servers"]
        per_server[server] = per_server.get(server, 0) + event["counts"]["instances"]
    assert per_server == {"Test PACS 1": STUDY_SIZE, "Test PACS 2": STUDY_SIZE}
    assert len(deliveries) <= 4, deliveries
    stored = next(e for e in events if e["operation"] == "store")
    delivered_1 = max(e["at"] for e in deliveries if e["servers"] == ["Test PACS 1"])
    assert delivered_1 > stored["at"]
