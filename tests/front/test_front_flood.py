"""Association limits under load: a flood is refused, idle connections are dropped, echo keeps working."""

from __future__ import annotations

import time

import pytest

from dicomrouter.dul.listener import SILENT_EVICTION_AGE_S
from tests.front.test_echo_scp import log_events, write_router_config
from tests.front.test_front_pdus import crashes_in_log, echo_succeeds
from tests.support.flood import connect_cycles, flood, wait_for_figures
from tests.support.pdus import A_ASSOCIATE_RJ, RJ_LOCAL_LIMIT_BODY, associate_rq
from tests.support.raw_peer import RawPeer, process_figures
from tests.support.router_process import RouterProcess

MAX_ASSOCIATIONS = 8
PER_ADDRESS = 4  # router.max_pending_per_address
ACSE_TIMEOUT = 4.0  # the flood client itself is slow to send its requests on 2 cores


@pytest.fixture(params=[1, 2], ids=["1 worker", "2 workers"])
def router(tmp_path, request):
    """The limits hold for the router as a whole: one process, or two workers sharing the port."""
    path, port = write_router_config(
        tmp_path,
        router={
            "max_associations": MAX_ASSOCIATIONS,
            "max_pending_per_address": PER_ADDRESS,
            "acse_timeout": ACSE_TIMEOUT,
            "network_timeout": 20,
            "audit": {
                "rejection_summary_interval": 0.5
            },  # repeated rejections are summed: see them soon
        },
    )
    process = RouterProcess(path, port, workers=request.param)
    process.start()
    try:
        assert echo_succeeds(port)
        yield process
    finally:
        process.stop()


def refusals_in_log(router: RouterProcess) -> int:
    """Connections the router turned away: A-ASSOCIATE-RJ "local limit exceeded", or closed at once
    when even the few threads that answer refusals were busy. Repeats from one address are summed:
    one line each, then summaries with the count."""
    turned_away = ("local limit exceeded", "too many connections")
    single = sum(
        1 for r in log_events(router, "association_rejected") if r["reason"].startswith(turned_away)
    )
    repeated = sum(
        r["associations"]
        for r in log_events(router, "association_rejections_repeated")
        if r["reason"].startswith(turned_away)
    )
    return single + repeated


def silent_drops_in_log(router: RouterProcess) -> int:
    """Connections closed without a word from the peer: to make room, or at the ACSE timeout."""
    silent = ("silent while others waited for room", "no A-ASSOCIATE-RQ within")
    return sum(1 for r in log_events(router, "connection_dropped") if r["reason"].startswith(silent))


def wait_for_outcomes(router: RouterProcess, expected: int, timeout: float = 10.0) -> tuple[int, int]:
    """(refused, dropped as silent) once they add up to `expected` (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        refused, dropped = refusals_in_log(router), silent_drops_in_log(router)
        if refused + dropped >= expected or time.monotonic() > deadline:
            return refused, dropped
        time.sleep(0.1)


def accept_queue(port: int) -> int:
    """Connections the kernel holds for the router's accept() on `port` (Recv-Q of its listening socket)."""
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    waiting += int(fields[4].split(":")[1], 16)
    return waiting


def wait_until_silent(port: int, timeout: float = 10.0) -> None:
    """Every connection made so far accepted by the router, then twice SILENT_EVICTION_AGE_S: from then on
    they are silent in the router's eyes. Their age counts from the router's accept(), which a busy
    machine delays well past the connect(): sleeping from the connect() alone races that."""
    deadline = time.monotonic() + timeout
    while accept_queue(port) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert accept_queue(port) == 0, "the router did not accept the connections"
    time.sleep(2 * SILENT_EVICTION_AGE_S)


def test_flood_is_refused_while_echo_keeps_answering(router):
    pids = router.worker_pids() or [router.process.pid]  # each process that serves associations
    before = {pid: process_figures(pid) for pid in pids}
    idle = [RawPeer(router.port) for _ in range(MAX_ASSOCIATIONS)]  # connected, never a byte
    wait_until_silent(router.port)
    try:
        result = flood(router.port, attempts=10 * MAX_ASSOCIATIONS)
        # The keeper holds one slot; the flood gets at most the rest.
        assert 1 <= result.established <= MAX_ASSOCIATIONS - 1
        # Every other attempt was turned away: most with A-ASSOCIATE-RJ "local limit exceeded"; beyond
        # the bounded number of threads that answer refusals, a connection is closed at once (the
        # requestor sees an abort). Nothing else, and nothing waits.
        assert all(other.startswith("aborted=True") for other in result.other), result.other
        assert result.echo_failures == 0
        assert result.echo_count >= 3
        assert result.echo_max_s < 1.0, f"a C-ECHO took {result.echo_max_s:.2f} s during the flood"
        # The idle connections were dropped (to make room, or after the ACSE timeout), not held.
        for peer in idle:
            assert peer.wait_closed(timeout=ACSE_TIMEOUT + 5).closed
        # Each attempt not established is in the log: refused, or (a requestor that had not sent its
        # A-ASSOCIATE-RQ yet when room was needed: a starved test process) dropped as silent, like the idle.
        turned_away = result.attempts - result.established
        refused, dropped = wait_for_outcomes(router, turned_away + len(idle))
        assert dropped >= len(idle) and refused + dropped - len(idle) == turned_away, (refused, dropped)
    finally:
        for peer in idle:
            peer.close()
    cycles = connect_cycles(router.port, 400)
    assert cycles == 400
    for pid, figures in before.items():
        # A few files open lazily (catalog connections); a leak would show one per connection.
        fds_bound = figures["open_fds"] + 8
        after = wait_for_figures(pid, figures["threads"], fds_bound, timeout=ACSE_TIMEOUT + 10)
        assert after["threads"] <= figures["threads"], (figures, after)
        assert after["open_fds"] <= fds_bound, (figures, after)
        # Generous: a leak of a few KiB per connection would show over 480 connections and 400 cycles.
        assert after["rss_kib"] < figures["rss_kib"] + 64 * 1024, (figures, after)
    assert echo_succeeds(router.port)
    assert not crashes_in_log(router)
    print(f"\nflood {result}; 400 cycles; router before {before}, after {after}")


def test_idle_connections_do_not_take_association_slots(router):
    """As many connections as max_associations sit idle; an association still gets in."""
    idle = [RawPeer(router.port) for _ in range(MAX_ASSOCIATIONS)]
    try:
        wait_until_silent(router.port)
        assert echo_succeeds(router.port)
    finally:
        for peer in idle:
            peer.close()


def test_silent_connections_cannot_lock_a_caller_out(router):
    """Twice the connection bound of silent sockets: a real request still gets in at once, and the silent
    ones are dropped (oldest first, to make room, or after the ACSE timeout)."""
    idle = [RawPeer(router.port) for _ in range(2 * MAX_ASSOCIATIONS)]
    try:
        wait_until_silent(router.port)
        started = time.monotonic()
        assert echo_succeeds(router.port)
        assert time.monotonic() - started < 1.0
        for peer in idle:
            assert peer.wait_closed(timeout=ACSE_TIMEOUT + 5).closed
        assert echo_succeeds(router.port)
    finally:
        for peer in idle:
            peer.close()


def test_slow_requests_over_the_per_address_cap_get_local_limit_exceeded(router):
    """Connections from one address that have started but not finished their request are not dropped to make
    room; one more from that address is answered A-ASSOCIATE-RJ "local limit exceeded" (transient)."""
    request = associate_rq("WORKSTATION", "DICOMROUTER")
    slow = [RawPeer(router.port) for _ in range(PER_ADDRESS)]
    try:
        for peer in slow:
            peer.send(request[:10])  # a header and a little: heard from, not complete
        # Accepted, not necessarily read: bytes in the socket (still unread by a busy router) count as heard
        # from, like bytes read. (With several workers each has its own accept queue: without this wait the
        # next connection may be accepted before these.)
        deadline = time.monotonic() + 10
        while accept_queue(router.port) and time.monotonic() < deadline:
            time.sleep(0.01)
        with RawPeer(router.port) as peer:
            peer.send(request)
            assert peer.read_pdu(timeout=ACSE_TIMEOUT + 5) == (A_ASSOCIATE_RJ, RJ_LOCAL_LIMIT_BODY)
        for peer in slow:
            assert peer.wait_closed(timeout=ACSE_TIMEOUT + 5).closed
        assert echo_succeeds(router.port)
    finally:
        for peer in slow:
            peer.close()


def test_port_probes_free_their_slot_at_once(router):
    """Connect-and-close probes do not wait out the ACSE timeout holding a slot."""
    for _ in range(5 * MAX_ASSOCIATIONS):
        RawPeer(router.port).close()
    started = time.monotonic()
    assert echo_succeeds(router.port)
    assert time.monotonic() - started < ACSE_TIMEOUT


def test_idle_association_is_dropped_after_the_network_timeout(tmp_path):
    path, port = write_router_config(tmp_path, router={"network_timeout": 1.5})
    with RouterProcess(path, port):
        with RawPeer(port) as peer:
            peer.associate()
            closed = peer.wait_closed(timeout=10)
        assert closed.closed
        assert 1.0 < closed.seconds < 6.0
