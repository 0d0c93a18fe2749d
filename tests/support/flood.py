"""An association flood against a running router, for the test suite and scripts/flood.py."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.pdus import A_RELEASE_RP, A_RELEASE_RQ, pdu
from tests.support.raw_peer import RawPeer, process_figures
from tests.support.scu_sockets import OUTGOING_SOCKET_HANDLERS

LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # rejected-transient, service provider (presentation)


def client_ae() -> AE:
    client = AE(ae_title="WORKSTATION")
    client.add_requested_context(Verification)
    client.acse_timeout = 30
    client.network_timeout = 30
    return client


@dataclass
class FloodResult:
    attempts: int
    established: int = 0
    rejected_local_limit: int = 0
    other: list[str] = field(default_factory=list)
    echo_count: int = 0
    echo_max_s: float = 0.0
    echo_failures: int = 0


def flood(port: int, attempts: int, hold_s: float = 60.0) -> FloodResult:
    """`attempts` associations at once, the accepted ones held until every attempt has its answer
    (at most `hold_s`), while an association made before keeps echoing."""
    result = FloodResult(attempts)
    lock = threading.Lock()
    answered = threading.Semaphore(0)
    all_answered = threading.Event()
    keeper = client_ae().associate("127.0.0.1", port, ae_title="DICOMROUTER", evt_handlers=OUTGOING_SOCKET_HANDLERS)
    assert keeper.is_established, "no association before the flood"
    stop = threading.Event()

    def echo_probe() -> None:
        while not stop.is_set():
            started = time.monotonic()
            status = keeper.send_c_echo()
            elapsed = time.monotonic() - started
            result.echo_count += 1
            result.echo_max_s = max(result.echo_max_s, elapsed)
            if not status or status.Status != 0x0000:
                result.echo_failures += 1
            time.sleep(0.02)

    def one(_index: int) -> None:
        assoc = client_ae().associate("127.0.0.1", port, ae_title="DICOMROUTER", evt_handlers=OUTGOING_SOCKET_HANDLERS)
        with lock:
            if assoc.is_established:
                result.established += 1
            elif assoc.is_rejected:
                answer = assoc.acceptor.primitive
                reason = (answer.result, answer.result_source, answer.diagnostic)
                if reason == LOCAL_LIMIT_EXCEEDED:
                    result.rejected_local_limit += 1
                else:
                    result.other.append(f"rejected {reason}")
            else:
                result.other.append(f"aborted={assoc.is_aborted} state={assoc.dul.state_machine.current_state} socket={assoc.dul.socket is not None}")
        answered.release()
        if assoc.is_established:
            all_answered.wait(hold_s)
            assoc.release()

    def watch_answers() -> None:
        for _ in range(attempts):
            answered.acquire()
        all_answered.set()

    probe = threading.Thread(target=echo_probe, daemon=True)
    probe.start()
    threading.Thread(target=watch_answers, daemon=True).start()
    try:
        with ThreadPoolExecutor(attempts) as pool:
            list(pool.map(one, range(attempts)))
    finally:
        stop.set()
        probe.join(timeout=30)
        keeper.release()
    return result


def connect_cycles(port: int, cycles: int, workers: int = 4) -> int:
    """Connect/disconnect `cycles` times: associate and release, or a bare connect and close."""

    def one(index: int) -> bool:
        with RawPeer(port) as peer:
            if index % 4 == 3:
                return True  # a port probe: connect, close
            peer.associate()
            peer.send(pdu(A_RELEASE_RQ, bytes(4)))
            answer = peer.read_pdu(timeout=10)
            return answer is not None and answer[0] == A_RELEASE_RP

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, range(cycles)))


def wait_for_figures(pid: int, threads: int, fds: int, timeout: float) -> dict[str, int]:
    """Poll until the router's threads and open files are back to the given counts (or timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        figures = process_figures(pid)
        if (figures["threads"] <= threads and figures["open_fds"] <= fds) or time.monotonic() > deadline:
            return figures
        time.sleep(0.1)
