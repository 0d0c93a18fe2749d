"""A router of several worker processes, seen from its port: reload reaches every worker or none,
the association limits hold for the router as a whole, a crash-looping worker does not spin."""

from __future__ import annotations

import os
import signal
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.front.test_echo_scp import ROUTER_AE, echoscu, log_events, write_router_config
from tests.front.test_reload import add_client, edit_yaml
from tests.support.pdus import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, RJ_LOCAL_LIMIT_BODY, associate_rq
from tests.support.raw_peer import RawPeer
from tests.support.router_process import RouterProcess
from tests.support.scu_sockets import OUTGOING_SOCKET_HANDLERS

pytestmark = pytest.mark.slow

WORKERS = 2
MAX_ASSOCIATIONS = 4  # a quarter (one) only configured callers may take
ATTEMPTS = 8  # connections beyond the limit, each landing on whichever worker the kernel picks


def wait_for_events(
    router: RouterProcess, event: str, count: int, timeout: float = 15.0, **fields
) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [
            r for r in log_events(router, event) if all(r.get(k) == v for k, v in fields.items())
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture
def router(tmp_path):
    path, port = write_router_config(
        tmp_path, accept_unknown_callers=True, router={"max_associations": MAX_ASSOCIATIONS}
    )
    with RouterProcess(path, port, workers=WORKERS) as process:
        yield process


def workers_that_logged(router: RouterProcess, event: str, timeout: float = 15.0) -> set[int]:
    """The workers that wrote `event`, once every one did (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = {r["worker"] for r in log_events(router, event)}
        if workers >= set(range(WORKERS)) or time.monotonic() > deadline:
            return workers
        time.sleep(0.05)


def test_sighup_reaches_every_worker(router):
    edit_yaml(router.config_path, add_client("NEWCOMER"))
    router.reload()
    # The supervisor watches the file too: the edit may bring a second reload ("file changed"), before
    # or after the SIGHUP's, and a worker's line names the reason current when it read the snapshot.
    sent = wait_for_events(router, "config_reload_sent", 1, reason="SIGHUP")
    assert [r["workers"] for r in sent] == [list(range(WORKERS))], router.log_tail()
    assert workers_that_logged(router, "config_reloaded") == set(range(WORKERS)), router.log_tail()


def test_file_change_reaches_every_worker(router):
    edit_yaml(router.config_path, add_client("FROMDISK"))
    reloaded = wait_for_events(router, "config_reloaded", WORKERS, reason="file changed")
    assert sorted(r["worker"] for r in reloaded) == list(range(WORKERS)), router.log_tail()


def test_bad_config_on_sighup_changes_no_worker(router):
    def break_it(document) -> None:
        document["router"]["max_associations"] = 1  # would be in force if any worker took the file
        document["servers"][0]["port"] = 70000

    edit_yaml(router.config_path, break_it)
    router.reload()
    refused = wait_for_events(router, "config_reload_refused", 1)
    assert refused and refused[0]["worker"] == "supervisor"
    assert "servers[0].port" in str(refused[0]["problems"])
    # Every worker still runs the old limits: MAX_ASSOCIATIONS associations at once, wherever they land.
    held = hold_associations(router.port, "WORKSTATION", MAX_ASSOCIATIONS)
    try:
        assert len(held) == MAX_ASSOCIATIONS
    finally:
        for peer in held:
            peer.close()
    assert not [r for r in log_events(router, "config_reloaded")], (
        "no worker may take a refused file"
    )
    assert router.process.poll() is None


def hold_associations(port: int, calling_ae: str, count: int) -> list[RawPeer]:
    """Up to `count` associations opened and held; those refused are closed."""
    held = []
    for _ in range(count):
        peer = RawPeer(port)
        peer.send(associate_rq(calling_ae, ROUTER_AE))
        answer = peer.read_pdu(timeout=10)
        if answer is not None and answer[0] == A_ASSOCIATE_AC:
            held.append(peer)
        else:
            peer.close()
    return held


def refused_local_limit(port: int, calling_ae: str) -> bool:
    with RawPeer(port) as peer:
        peer.send(associate_rq(calling_ae, ROUTER_AE))
        return peer.read_pdu(timeout=10) == (A_ASSOCIATE_RJ, RJ_LOCAL_LIMIT_BODY)


def test_association_limits_hold_across_workers(router):
    """max_associations and the quarter kept for configured callers count every worker's associations."""
    unknown = hold_associations(router.port, "STRANGER", MAX_ASSOCIATIONS)
    try:
        # Unknown callers get all but the reserved quarter, however the kernel spread them.
        assert len(unknown) == MAX_ASSOCIATIONS - 1
        assert all(refused_local_limit(router.port, "STRANGER") for _ in range(ATTEMPTS))
        known = hold_associations(router.port, "WORKSTATION", 2)
        try:
            assert len(known) == 1, "the configured caller takes the reserved slot, and only it"
            assert all(refused_local_limit(router.port, "WORKSTATION") for _ in range(ATTEMPTS))
        finally:
            for peer in known:
                peer.close()
    finally:
        for peer in unknown:
            peer.close()
    accepted = log_events(router, "association_accepted")
    spread = sorted({r["worker"] for r in accepted})
    print(f"\nassociations accepted by workers {spread}")
    # Once they are closed, there is room again.
    client = AE(ae_title="WORKSTATION")
    client.add_requested_context(Verification)
    deadline = time.monotonic() + 10
    while True:
        assoc = client.associate(
            "127.0.0.1", router.port, ae_title=ROUTER_AE, evt_handlers=OUTGOING_SOCKET_HANDLERS
        )
        if assoc.is_established:
            assoc.release()
            break
        assert time.monotonic() < deadline, "no room after the associations closed"
        time.sleep(0.1)


def test_associations_are_spread_over_the_workers(router):
    """One port for all workers: each connection goes to the worker holding the fewest, in turn among
    equals (SO_REUSEPORT's hash put three of four modalities on one worker about half the time)."""
    held = hold_associations(router.port, "WORKSTATION", MAX_ASSOCIATIONS)
    try:
        assert len(held) == MAX_ASSOCIATIONS
        accepted = wait_for_events(router, "association_accepted", MAX_ASSOCIATIONS)
        by_worker = [sum(r["worker"] == index for r in accepted) for index in range(WORKERS)]
        # Each takes its half; a worker slow to wake (a loaded machine) passes its turn on after 10 ms.
        assert min(by_worker) >= MAX_ASSOCIATIONS // WORKERS - 1, by_worker
    finally:
        for peer in held:
            peer.close()


def test_callers_arriving_while_a_worker_is_down_are_served(router):
    """The port stays open in the supervisor: what arrives while a worker is gone waits for the other."""
    os.kill(wait_for_events(router, "worker_ready", 1, index=1)[-1]["pid"], signal.SIGKILL)
    assert [echoscu(router.port, "WORKSTATION").returncode for _ in range(4)] == [0] * 4
    assert wait_for_events(router, "worker_died", 1, index=1), router.log_tail()


def test_a_worker_that_keeps_dying_is_restarted_after_growing_pauses(router):
    """Killed again as soon as it is back: restarted at once, then after 1 s, then 2 s (no spinning)."""
    pauses = []
    for round_number in range(3):
        ready = wait_for_events(router, "worker_ready", round_number + 1, timeout=30, index=1)
        assert len(ready) == round_number + 1, router.log_tail()
        pid = ready[-1]["pid"]
        os.kill(pid, signal.SIGKILL)
        died = wait_for_events(router, "worker_died", round_number + 1, index=1)
        assert len(died) == round_number + 1, router.log_tail()
        pauses.append(died[-1]["restart_in_s"])
        assert died[-1]["how"] == "signal SIGKILL"
    assert pauses == [0.0, 1.0, 2.0]
    assert len(wait_for_events(router, "worker_ready", 4, timeout=30, index=1)) == 4, (
        "replaced after the pause"
    )
    assert echoscu(router.port, "WORKSTATION").returncode == 0


def test_metrics_add_up_every_workers_counts(tmp_path):
    """Only worker 0 serves HTTP; its /metrics counts the associations of both."""
    import urllib.request

    from dicomrouter.pacsfarm import free_ports

    http_port = free_ports(1)[0]
    path, port = write_router_config(
        tmp_path, router={"http": {"host": "127.0.0.1", "port": http_port}}
    )
    with RouterProcess(path, port, workers=WORKERS) as router:
        echoes = 8
        assert all(echoscu(port, "WORKSTATION").returncode == 0 for _ in range(echoes))
        with urllib.request.urlopen(
            f"http://127.0.0.1:{http_port}/metrics", timeout=10
        ) as response:
            text = response.read().decode()
        served_by = {r["worker"] for r in log_events(router, "http_listening")}
        print(
            f"\nechoes per worker: {sorted(r['worker'] for r in log_events(router, 'association_accepted'))}"
        )
    assert served_by == {0}
    assert f'dicomrouter_associations_total{{outcome="accepted"}} {echoes}.0' in text, text[:2000]
    assert f'dicomrouter_requests_total{{operation="echo",outcome="success"}} {echoes}.0' in text
