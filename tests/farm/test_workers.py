"""Several worker processes on one port: concurrent senders, a worker or the whole router killed
mid-association, against real Orthanc with DCMTK storescu. Nothing acknowledged is lost; every
instance reaches the PACS through one job per destination."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.orthanc_fixtures import make_test_instance, write_instance
from tests.support.router_process import RouterProcess
from tests.support.store_helpers import (
    edit_config,
    fast_retries,
    read_until_acknowledged,
    start_storescu,
    storescu,
    successful_sop_uids,
)

pytestmark = pytest.mark.slow

WORKERS = 2
SENDERS = 4
KILL_AFTER = 15  # acknowledgements seen before the kill


def instances(folder: Path, count: int, rows: int = 128) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    return [
        str(
            write_instance(
                folder / f"{index:04d}.dcm",
                make_test_instance(
                    study_uid=study_uid,
                    series_uid=series_uid,
                    rows=rows,
                    cols=rows,
                    instance_number=index + 1,
                ),
            )
        )
        for index in range(count)
    ]


def sop_uids(files: list[str]) -> set[str]:
    return {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout} s")
        time.sleep(0.1)


def process_gone(pid: int) -> bool:
    """Ended (or a zombie nobody reaped yet: it holds no socket any more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def log_records(router: RouterProcess) -> list[dict]:
    return [json.loads(line) for line in router.log_text().splitlines() if line.startswith("{")]


def events(router: RouterProcess, event: str, **fields) -> list[dict]:
    return [
        r
        for r in log_records(router)
        if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
    ]


def jobs_per_instance(config_path: Path, destination: str) -> dict[str, list[str]]:
    """The states of each instance's forwarding jobs to `destination`, from the catalog."""
    database = config_path.parent / "var" / "catalog.db"
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "SELECT sop_instance_uid, state FROM forward_jobs WHERE destination = ?", (destination,)
        ).fetchall()
    jobs: dict[str, list[str]] = {}
    for sop_uid, state in rows:
        jobs.setdefault(sop_uid, []).append(state)
    return jobs


@pytest.fixture
def workers_router(farm_config, router_port):
    """The farm router as a supervisor and WORKERS workers, fast retries; always stopped."""
    edit_config(farm_config, fast_retries)
    router = RouterProcess(farm_config, router_port, workers=WORKERS).start()
    try:
        yield router
    finally:
        router.stop()
        router.kill()  # whatever outlived the drain


def test_concurrent_senders_every_instance_arrives_once(
    workers_router, clean_orthanc_farm, farm_config, tmp_path
):
    """Four storescu at once into two workers: every instance reaches the PACS, through exactly one
    job for its destination, and every log line says which process wrote it."""
    farm = clean_orthanc_farm
    batches = [instances(tmp_path / f"sender{index}", 25) for index in range(SENDERS)]
    with ThreadPoolExecutor(SENDERS) as pool:
        results = list(pool.map(lambda files: storescu(workers_router.port, files), batches))
    for result in results:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    expected = set().union(*(sop_uids(files) for files in batches))
    wait_until(
        lambda: expected <= set(farm[0].instance_sop_uids()), 120, "every instance in the PACS"
    )
    assert farm[0].instance_count() == len(expected)
    jobs = wait_until(
        lambda: (
            (j := jobs_per_instance(farm_config, farm[0].spec.name))
            and all(states == ["done"] for states in j.values())
            and j
        ),
        60,
        "every job done",
    )
    assert set(jobs) == expected, "one job per instance for the primary"
    records = log_records(workers_router)
    assert all("worker" in record for record in records), [r for r in records if "worker" not in r][
        :3
    ]
    accepted = events(workers_router, "association_accepted", calling_ae="WORKSTATION")
    assert len(accepted) == SENDERS
    assert {record["worker"] for record in accepted} <= set(range(WORKERS))
    print(
        f"\nassociations per worker: {[sum(r['worker'] == w for r in accepted) for w in range(WORKERS)]}"
    )


def test_sigkill_of_one_worker_mid_association_loses_nothing_acknowledged(
    workers_router, clean_orthanc_farm, tmp_path
):
    """The worker serving a storescu is SIGKILLed after KILL_AFTER acknowledgements: the supervisor
    replaces it, gives its claims back, and every acknowledged instance reaches the PACS."""
    farm = clean_orthanc_farm
    files = instances(tmp_path / "kill-one", 150, rows=256)
    sender = start_storescu(workers_router.port, files)
    lines = read_until_acknowledged(sender, KILL_AFTER)
    serving = events(workers_router, "association_accepted", calling_ae="WORKSTATION")[-1]["worker"]
    pid = next(
        r["pid"] for r in reversed(events(workers_router, "worker_ready")) if r["index"] == serving
    )
    os.kill(pid, signal.SIGKILL)
    output = "".join(lines) + sender.communicate(timeout=120)[0]
    acknowledged = successful_sop_uids(output, files)
    assert KILL_AFTER <= len(acknowledged) < len(files), "the kill should land mid-association"
    wait_until(
        lambda: events(workers_router, "worker_died", index=serving, pid=pid),
        10,
        "worker_died logged",
    )
    wait_until(
        lambda: [
            r for r in events(workers_router, "worker_ready", index=serving) if r["pid"] != pid
        ],
        60,
        "a replacement worker ready",
    )
    missing = lambda: acknowledged - set(farm[0].instance_sop_uids())  # noqa: E731
    wait_until(lambda: not missing(), 90, "every acknowledged instance in the PACS")
    # The router still takes stores on every worker.
    again = instances(tmp_path / "after", 5)
    assert storescu(workers_router.port, again).returncode == 0
    wait_until(
        lambda: sop_uids(again) <= set(farm[0].instance_sop_uids()), 60, "stores after the kill"
    )


def test_sigkill_of_the_process_group_then_restart_loses_nothing_acknowledged(
    workers_router, clean_orthanc_farm, tmp_path
):
    """Supervisor and workers SIGKILLed at once mid-association; after a restart every acknowledged
    instance reaches the PACS (the dead workers' claims end with their lease)."""
    farm = clean_orthanc_farm
    files = instances(tmp_path / "kill-all", 150, rows=256)
    sender = start_storescu(workers_router.port, files)
    lines = read_until_acknowledged(sender, KILL_AFTER)
    pids = workers_router.worker_pids()
    assert len(pids) == WORKERS
    workers_router.kill()
    output = "".join(lines) + sender.communicate(timeout=120)[0]
    acknowledged = successful_sop_uids(output, files)
    assert KILL_AFTER <= len(acknowledged) < len(files), "the kill should land mid-association"
    for pid in pids:
        wait_until(lambda pid=pid: process_gone(pid), 10, f"worker {pid} gone")
    workers_router.start()
    missing = lambda: acknowledged - set(farm[0].instance_sop_uids())  # noqa: E731
    wait_until(lambda: not missing(), 120, "every acknowledged instance in the PACS")
