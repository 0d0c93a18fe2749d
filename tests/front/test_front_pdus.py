"""Malformed PDUs from a raw socket: the router drops the peer within its timeouts and keeps serving."""

from __future__ import annotations

import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.front.test_echo_scp import write_router_config
from tests.support.pdus import (
    A_ABORT,
    A_ASSOCIATE_RJ,
    A_RELEASE_RQ,
    P_DATA_TF,
    associate_rq,
    echo_command,
    p_data,
    pdu,
)
from tests.support.raw_peer import RawPeer, process_figures
from tests.support.router_process import RouterProcess
from tests.support.scu_sockets import OUTGOING_SOCKET_HANDLERS

ACSE_TIMEOUT = 3.0
NETWORK_TIMEOUT = 3.0
SLACK = 2.0  # scheduling on a loaded 2-core machine
MAX_PDU = 16384
HUGE = 0xFFFFFFFF

BEFORE_ASSOCIATION = {
    # name: (bytes sent, the router must hang up before the ACSE timeout: nothing left to wait for)
    "unknown PDU type 0x09": (pdu(0x09, b"abc"), False),
    "unknown PDU type 0x00": (pdu(0x00, b""), False),
    "A-ABORT before the request": (pdu(A_ABORT, bytes(4)), True),
    "A-RELEASE-RQ before the request": (pdu(A_RELEASE_RQ, bytes(4)), True),
    "A-ASSOCIATE-RQ of length 0xFFFFFFFF, no body": (struct.pack(">BxI", 0x01, HUGE), True),
    "P-DATA-TF of length 0xFFFFFFFF, no body": (struct.pack(">BxI", P_DATA_TF, HUGE), True),
    "P-DATA-TF before the request": (p_data(1, echo_command(), True), True),
    "A-ASSOCIATE-RQ of garbage": (pdu(0x01, b"x" * 100), True),
    "A-ASSOCIATE-RQ cut short, then silence": (associate_rq("WORKSTATION", "DICOMROUTER")[:40], False),
    "three bytes of a header, then silence": (b"\x01\x00\x00", False),
    "connected, never a byte": (b"", False),
}

AFTER_ASSOCIATION = {
    "garbage": (b"\x55" * 50, False),
    "P-DATA-TF of length 0xFFFFFFFF, no body": (struct.pack(">BxI", P_DATA_TF, HUGE), True),
    "P-DATA-TF over the maximum PDU": (pdu(P_DATA_TF, bytes(MAX_PDU + 4096)), True),
    "unknown PDU type 0x0A": (pdu(0x0A, b"abc"), False),
    "a second A-ASSOCIATE-RQ": (associate_rq("WORKSTATION", "DICOMROUTER"), True),
    "P-DATA-TF cut short, then silence": (p_data(1, echo_command(), True)[:20], False),
    "PDV longer than its PDU": (pdu(P_DATA_TF, struct.pack(">IBB", 5000, 1, 3) + b"abc"), False),
    "command that is not a command set": (p_data(1, b"\xff" * 40, True), False),
}


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    path, port = write_router_config(
        tmp_path_factory.mktemp("front-pdus"),
        router={
            "acse_timeout": ACSE_TIMEOUT,
            "network_timeout": NETWORK_TIMEOUT,
            "dimse_timeout": 5,
            "max_associations": 16,
            "max_pending_per_address": 64,  # every case comes from 127.0.0.1 at once
            "max_pdu_size": MAX_PDU,
        },
    )
    process = RouterProcess(path, port)
    process.start()
    try:
        assert echo_succeeds(port)  # warm up: the first association loads what later ones reuse
        yield process
    finally:
        process.stop()


def echo_succeeds(port: int) -> bool:
    client = AE(ae_title="WORKSTATION")
    client.add_requested_context(Verification)
    assoc = client.associate("127.0.0.1", port, ae_title="DICOMROUTER", evt_handlers=OUTGOING_SOCKET_HANDLERS)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0x0000
    finally:
        assoc.release()


def run_case(port: int, data: bytes, associate: bool):
    with RawPeer(port) as peer:
        if associate:
            peer.associate()
        peer.send(data)
        return peer.wait_closed(timeout=max(ACSE_TIMEOUT, NETWORK_TIMEOUT) + SLACK + 5)


def crashes_in_log(router: RouterProcess) -> list[str]:
    """Exceptions nothing handled: a thread that died, not pynetdicom logging a bad PDU it refused."""
    return [line for line in router.log_text().splitlines() if "Exception in thread" in line or "Traceback" in line and "dicomrouter" in line]


def wait_threads_back(pid: int, baseline: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        threads = process_figures(pid)["threads"]
        if threads <= baseline or time.monotonic() > deadline:
            return threads
        time.sleep(0.1)


def test_malformed_pdus_are_dropped_within_the_timeouts(router):
    before = process_figures(router.process.pid)
    cases = [(f"before association: {name}", data, quick, False) for name, (data, quick) in BEFORE_ASSOCIATION.items()]
    cases += [(f"after association: {name}", data, quick, True) for name, (data, quick) in AFTER_ASSOCIATION.items()]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda case: run_case(router.port, case[1], case[3]), cases))
    problems = []
    for (name, data, quick, _associated), closed in zip(cases, results, strict=True):
        bound = (1.0 if quick else max(ACSE_TIMEOUT, NETWORK_TIMEOUT)) + SLACK
        if not closed.closed or closed.seconds > bound:
            problems.append(f"{name}: closed={closed.closed} after {closed.seconds:.2f} s (bound {bound} s)")
        if HUGE.to_bytes(4, "big") in data[2:6] and A_ABORT not in closed.pdu_types:
            problems.append(f"{name}: no A-ABORT before the close ({closed.pdu_types})")
    assert not problems, "\n".join(problems)
    assert router.process.poll() is None, router.log_tail()
    assert echo_succeeds(router.port)
    assert not crashes_in_log(router)
    after = process_figures(router.process.pid)
    print(f"\nmalformed PDUs: {len(cases)} cases, router before {before}, after {after}")


# One PDU: (type, body, declared length or None for the true one)
pdu_parts = st.tuples(
    st.integers(0, 12),
    st.binary(max_size=80),
    st.one_of(st.none(), st.integers(0, 300), st.sampled_from([HUGE, MAX_PDU + 1, 2**31])),
)

fuzz_counts = {"cases": 0}
fuzz_lock = threading.Lock()


def encode_parts(parts) -> bytes:
    return b"".join(struct.pack(">BxI", kind, len(body) if length is None else length) + body for kind, body, length in parts)


@pytest.mark.parametrize("associate", [False, True], ids=["before-association", "after-association"])
def test_generated_pdu_streams(router, associate):
    """Many generated PDU streams (wrong types, lengths, bodies), sent then half-closed."""
    before = process_figures(router.process.pid)

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(parts=st.lists(pdu_parts, min_size=1, max_size=4), tail=st.binary(max_size=16))
    def check(parts, tail):
        with RawPeer(router.port) as peer:
            if associate:
                peer.associate()
            peer.send(encode_parts(parts) + tail)
            peer.finish_sending()
            closed = peer.wait_closed(timeout=max(ACSE_TIMEOUT, NETWORK_TIMEOUT) + SLACK)
        with fuzz_lock:
            fuzz_counts["cases"] += 1
        assert closed.closed, f"still open after {closed.seconds:.1f} s"

    check()
    assert router.process.poll() is None, router.log_tail()
    assert echo_succeeds(router.port)
    threads = wait_threads_back(router.process.pid, before["threads"], timeout=ACSE_TIMEOUT + SLACK)
    assert threads <= before["threads"], f"{threads} threads, {before['threads']} before"
    assert not crashes_in_log(router)
    print(f"\ngenerated PDU streams so far: {fuzz_counts['cases']}; router before {before}, after {process_figures(router.process.pid)}")


def test_association_is_refused_before_anything_when_the_caller_lies_about_the_pdu_size(router):
    """A-ASSOCIATE-RJ, not a crash, for a request whose items overrun the PDU."""
    request = bytearray(associate_rq("WORKSTATION", "DICOMROUTER"))
    request[-10:] = b"\xff" * 10  # the user information item now claims more than is there
    with RawPeer(router.port) as peer:
        peer.send(bytes(request))
        closed = peer.wait_closed(timeout=ACSE_TIMEOUT + SLACK)
    assert closed.closed
    assert set(closed.pdu_types) <= {A_ABORT, A_ASSOCIATE_RJ}
    assert echo_succeeds(router.port)
