"""Two workers' connection tables over one shared table (as two worker processes see it), and a
worker's share of the router's forwarding lanes."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest

from dicomrouter.config import ForwardingConfig
from dicomrouter.dul.connection import Connection
from dicomrouter.dul.listener import ConnectionLimits, ConnectionTable
from dicomrouter.dul.shared_counts import CLAIM_POLL_S, SharedCounts
from dicomrouter.supervisor import WorkerRole
from tests.support.configs import base_document, write_document

MAX_ASSOCIATIONS, PER_ADDRESS = 8, 4


@pytest.fixture
def tables() -> Iterator[tuple[ConnectionTable, ConnectionTable, SharedCounts]]:
    """Worker 0's and worker 1's tables, and the supervisor's view; worker 1 answers claims as its
    listener would."""
    supervisor = SharedCounts.create(2)
    limits = ConnectionLimits.for_associations(MAX_ASSOCIATIONS, PER_ADDRESS)
    shared = [SharedCounts(supervisor.fd, 2, slot) for slot in (0, 1)]
    for counts in shared:  # as each worker does when it starts
        counts.start_serving()
    first, second = (
        ConnectionTable(lambda: limits, lambda address: address == "10.0.0.1", counts) for counts in shared
    )
    stop = threading.Event()

    def answer_claims() -> None:
        while not stop.wait(CLAIM_POLL_S):
            second.collect_claims()

    thread = threading.Thread(target=answer_claims, daemon=True)
    thread.start()
    yield first, second, supervisor
    stop.set()
    thread.join()


@pytest.fixture
def peers() -> Iterator[list[socket.socket]]:
    kept: list[socket.socket] = []
    yield kept
    for sock in kept:
        sock.close()


def connect(
    peers: list[socket.socket], address: str = "127.0.0.1", age_s: float = 1.0
) -> Connection:
    """A connection as the router accepted it `age_s` ago; its peer's end kept in `peers`."""
    ours, theirs = socket.socketpair()
    peers.append(theirs)
    connection = Connection(ours, address)
    connection.accepted_at -= age_s
    return connection


def test_a_silent_connection_of_another_worker_makes_room(tables, peers):
    first, second, _ = tables
    silent = [connect(peers) for _ in range(PER_ADDRESS)]
    assert [second.admit(c)[0] for c in silent] == ["pending"] * PER_ADDRESS
    second.collect_claims()  # published with their age
    assert first.admit(connect(peers, age_s=0)) == ("pending", [])
    assert sum(c.closed for c in silent) == 1, (
        "the other worker closed its oldest silent connection"
    )
    assert first.counts()["pending"] == PER_ADDRESS


def test_a_connection_that_spoke_is_not_dropped_for_another(tables, peers):
    first, second, _ = tables
    waiting = [connect(peers) for _ in range(PER_ADDRESS)]
    for connection in waiting:
        second.admit(connection)
    second.collect_claims()
    for peer in peers:
        peer.send(b"\x01")  # the start of a request, unread by the router yet
    assert first.admit(connect(peers, age_s=0))[0] == "refuse"
    assert not any(c.closed for c in waiting)


def test_associations_count_for_the_router_as_a_whole(tables, peers):
    first, second, _ = tables
    unknown = [connect(peers, f"192.0.2.{i}") for i in range(MAX_ASSOCIATIONS)]
    admitted = []
    for index, connection in enumerate(unknown):
        table = (first, second)[index % 2]
        table.admit(connection)
        admitted.append(table.associate(connection, known_caller=False))
    reserved = MAX_ASSOCIATIONS // 4
    assert admitted == [True] * (MAX_ASSOCIATIONS - reserved) + [False] * reserved
    known = connect(peers, "10.0.0.1")
    first.admit(known)
    assert first.associate(known, known_caller=True), "a configured caller takes a reserved slot"
    assert (
        first.counts()["associated"]
        == second.counts()["associated"]
        == MAX_ASSOCIATIONS - reserved + 1
    )


def test_a_dead_workers_counts_are_cleared(tables, peers):
    first, second, supervisor = tables
    for index in range(3):
        connection = connect(peers, f"192.0.2.{index}")
        second.admit(connection)
        second.associate(connection, known_caller=True)
    assert first.counts()["associated"] == 3
    with supervisor.locked():
        supervisor.clear(1)
    assert first.counts()["associated"] == 0


@pytest.mark.parametrize(
    ("configured", "workers", "each"), [(2, 1, 2), (2, 2, 1), (5, 2, 3), (2, 8, 1), (32, 8, 4)]
)
def test_each_worker_runs_its_share_of_the_forwarding_lanes(tmp_path, configured, workers, each):
    from dicomrouter.config import load_config

    document = base_document()
    document["router"]["forwarding"] = {"workers_per_destination": configured}
    config = load_config(write_document(tmp_path / "r.yaml", document))
    role = WorkerRole(0, None, None, None, workers)
    shared = role.share(config)
    assert shared.router.forwarding.workers_per_destination == each
    assert (
        replace(shared.router.forwarding, workers_per_destination=configured)
        == config.router.forwarding
    )
    assert isinstance(shared.router.forwarding, ForwardingConfig)


def test_the_worker_holding_fewest_takes_the_next_connection_then_turns_alternate(tables, peers):
    """One listening socket for every worker: the table names who takes the next connection."""
    first, second, supervisor = tables
    # Both idle: the one that took a connection least recently (worker 0 started first).
    assert [first.next_to_accept(), second.next_to_accept()] == [True, False]
    first.took_connection()
    assert [first.next_to_accept(), second.next_to_accept()] == [False, True]
    second.took_connection()
    assert [first.next_to_accept(), second.next_to_accept()] == [True, False]
    # Fewest held wins over whose turn it is.
    assert first.admit(connect(peers))[0] == "pending"
    assert [first.next_to_accept(), second.next_to_accept()] == [False, True]


def test_a_slot_no_worker_runs_in_never_has_the_turn(tables):
    first, second, supervisor = tables
    with supervisor.locked():
        supervisor.clear(1)  # worker 1 died: until its successor starts, worker 0 takes every connection
    assert first.next_to_accept()
    first.took_connection()
    assert first.next_to_accept()
