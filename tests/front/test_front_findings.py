"""The findings of the network-layer review (issue 10), each probed against a running router.

Each test sends what the review sent, over real sockets, to a real `dicomrouter serve`, on an
association that also proposes a C-FIND context (on the old front that handed the association
to pynetdicom's acceptor, where the holes were).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dicomrouter.cli.main import cli
from dicomrouter.net.upper_layer import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    associate_request,
    parse_command,
)
from tests.front.test_echo_scp import write_router_config
from tests.front.test_front_pdus import echo_succeeds
from tests.support.pdus import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    P_DATA_TF,
    RJ_LOCAL_LIMIT_BODY,
    p_data,
    store_command,
)
from tests.support.raw_peer import RawPeer
from tests.support.router_process import RouterProcess, wait_for_port

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PDU_BYTES = 65536
MIB = 1024 * 1024


def memory(pid: int) -> dict[str, int]:
    """Resident and peak resident memory (KiB) of a process."""
    figures = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0])
    return figures


@pytest.fixture
def router(tmp_path):
    path, port = write_router_config(tmp_path, router={"network_timeout": 20, "max_in_memory_dataset": 4 * MIB})
    with RouterProcess(path, port) as process:
        assert echo_succeeds(port)
        process.config_path = path
        process.spool = tmp_path / "var" / "spool"
        yield process


def spool_files(spool: Path) -> list[Path]:
    return [p for p in spool.rglob("*") if p.is_file()] if spool.exists() else []


def associate_mixed(peer: RawPeer, calling_ae: str = "WORKSTATION") -> None:
    """Storage (CT, context 1) beside C-FIND (context 3), implicit VR little endian."""
    peer.send(associate_request(calling_ae, "DICOMROUTER", [(CT, [IMPLICIT_VR_LE]), (STUDY_FIND, [IMPLICIT_VR_LE])], PDU_BYTES))
    answer = peer.read_pdu(timeout=10)
    assert answer is not None and answer[0] == A_ASSOCIATE_AC, answer


def element(group: int, number: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", group, number, len(value)) + value


def dataset_header(sop_instance: str, pixel_length: int) -> bytes:
    """A CT data set up to the Pixel Data header, which declares `pixel_length` bytes (implicit VR LE)."""
    return b"".join(
        (
            element(0x0008, 0x0016, CT.encode()),
            element(0x0008, 0x0018, sop_instance.encode()),
            element(0x0008, 0x0060, b"CT"),
            element(0x0010, 0x0020, b"FINDINGS"),
            element(0x0020, 0x000D, b"1.2.826.0.1.3680043.9.7433.3.1"),
            element(0x0020, 0x000E, b"1.2.826.0.1.3680043.9.7433.3.2"),
            element(0x0028, 0x0010, struct.pack("<H", 512)),
            element(0x0028, 0x0011, struct.pack("<H", 512)),
            struct.pack("<HHI", 0x7FE0, 0x0010, pixel_length),
        )
    )


def send_store(peer: RawPeer, sop_instance: str, header: bytes, body_bytes: int, context_id: int = 1,
               sop_class: str = CT) -> None:
    """A C-STORE whose data set is `header` then `body_bytes` zero bytes, in PDUs of 64 KiB."""
    peer.send(p_data(context_id, store_command(sop_class, sop_instance), command=True))
    chunk = PDU_BYTES - 6
    payload = header
    remaining = body_bytes
    zeros = bytes(chunk)
    while True:
        room = chunk - len(payload)
        take = min(room, remaining)
        payload += zeros[:take]
        remaining -= take
        last = remaining == 0
        peer.send(p_data(context_id, payload, command=False, last=last))
        if last:
            return
        payload = b""


def store_status(peer: RawPeer, timeout: float = 60.0) -> int | None:
    answer = peer.read_pdu(timeout=timeout)
    if answer is None or answer[0] != P_DATA_TF:
        return None
    command = parse_command(answer[1][6:])
    return int.from_bytes(command[0x0900], "little")


def test_1_a_truncated_data_set_is_never_success_and_pixel_data_is_not_loaded(router):
    """40 MiB of Pixel Data declared, 30 MiB sent: refused, nothing spooled, no pixel data held in memory."""
    before = memory(router.process.pid)
    with RawPeer(router.port, timeout=60) as peer:
        associate_mixed(peer)
        send_store(peer, "1.2.826.0.1.3680043.9.7433.3.3", dataset_header("1.2.826.0.1.3680043.9.7433.3.3", 40 * MIB), 30 * MIB)
        status = store_status(peer)
    assert status is not None and status >= 0xA000, f"0x{status or 0:04X}"
    assert not [p for p in spool_files(router.spool) if p.suffix == ".dcm"]
    assert router.cli("queue", "list").stdout.count("1.2.826.0.1.3680043.9.7433.3.3") == 0
    grown_mib = (memory(router.process.pid)["VmHWM"] - before["VmRSS"]) / 1024
    assert grown_mib < 30, f"peak RSS grew {grown_mib:.0f} MiB"


def test_2_authorization_comes_before_the_data_set(router):
    """A read-only client's 300 MiB store: refused 0x0124 at the command; RSS and the spool untouched."""
    before = memory(router.process.pid)
    with RawPeer(router.port, timeout=120) as peer:
        associate_mixed(peer, calling_ae="ANYWHERE")  # test_read only
        uid = "1.2.826.0.1.3680043.9.7433.3.4"
        send_store(peer, uid, dataset_header(uid, 300 * MIB), 300 * MIB)
        assert store_status(peer) == 0x0124
    assert spool_files(router.spool) == []
    grown_mib = (memory(router.process.pid)["VmHWM"] - before["VmRSS"]) / 1024
    assert grown_mib < 50, f"peak RSS grew {grown_mib:.0f} MiB"
    assert echo_succeeds(router.port)


def test_3_command_sets_are_capped(router):
    """Command fragments past 64 KiB from a read-only client: A-ABORT, memory flat."""
    before = memory(router.process.pid)
    with RawPeer(router.port, timeout=30) as peer:
        associate_mixed(peer, calling_ae="ANYWHERE")
        fragment = p_data(3, b"\0" * (PDU_BYTES - 6), command=True, last=False)
        for _ in range(400 * MIB // PDU_BYTES):  # up to 400 MiB, as the review sent
            peer.send(fragment)
            if peer.sock.fileno() < 0:
                break
        closed = peer.wait_closed(timeout=10)
    assert closed.closed and A_ABORT in closed.pdu_types
    assert (memory(router.process.pid)["VmHWM"] - before["VmRSS"]) / 1024 < 20
    assert "command set over 64 KiB" in router.log_text()


@pytest.mark.parametrize(
    ("sop_class", "status"),
    [(MR, 0x0122), ("1.2.3.abc", 0xA900), ("1.2.840.10008.5.1.4.1.1.2\\1.2.3", 0xA900)],
    ids=["another class than the context's", "not a UID", "two UIDs"],
)
def test_5_the_commands_sop_class_must_be_the_contexts(router, sop_class, status):
    with RawPeer(router.port, timeout=30) as peer:
        associate_mixed(peer)
        uid = "1.2.826.0.1.3680043.9.7433.3.5"
        send_store(peer, uid, dataset_header(uid, 1024), 1024, sop_class=sop_class)
        assert store_status(peer) == status
    assert spool_files(router.spool) == []


def raw_rq(calling_ae: bytes) -> bytes:
    request = bytearray(associate_request("X", "DICOMROUTER", [(CT, [EXPLICIT_VR_LE])], PDU_BYTES))
    request[6 + 20 : 6 + 36] = calling_ae.ljust(16, b" ")
    return bytes(request)


@pytest.mark.parametrize("calling_ae", [b"WORK\r\nFORGED", b"WORK\x1b[2J", b"WORK\x00STATION"])
def test_6_ae_titles_with_control_characters_are_rejected_and_printed_escaped(router, calling_ae):
    with RawPeer(router.port) as peer:
        peer.send(raw_rq(calling_ae))
        answer = peer.read_pdu(timeout=10)
    assert answer is not None and answer[0] == A_ASSOCIATE_RJ
    assert answer[1][1:] == b"\x01\x01\x03"  # permanent, service user, calling AE title not recognised
    deadline = time.monotonic() + 10
    while True:  # the audit row is written in the background
        printed = CliRunner().invoke(cli, ["--config", str(router.config_path), "audit", "--operation", "association"])
        if "rejected" in printed.output or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rows = [line for line in printed.output.splitlines() if "rejected" in line]
    assert rows, printed.output
    assert not any(ch in printed.output for ch in "\r\x1b\x00")
    assert all("FORGED" not in line or "\\r\\n" in line or "\\\\r" in line for line in printed.output.splitlines())


def test_4_unknown_callers_cannot_take_the_slots_kept_for_configured_clients(tmp_path):
    """With accept_unknown_callers, strangers may associate, but not into the last quarter of
    max_associations: a configured client still gets in."""
    path, port = write_router_config(tmp_path, accept_unknown_callers=True, router={"max_associations": 4})
    with RouterProcess(path, port):
        held = []
        try:
            for _ in range(3):  # 4 - max(1, 4 // 4) reserved
                peer = RawPeer(port)
                held.append(peer)
                peer.associate(calling_ae="STRANGER")
            with RawPeer(port) as one_more:
                one_more.send(raw_rq(b"STRANGER"))
                assert one_more.read_pdu(timeout=10) == (A_ASSOCIATE_RJ, RJ_LOCAL_LIMIT_BODY)
            assert echo_succeeds(port)  # WORKSTATION, a configured client: the reserved slot
        finally:
            for peer in held:
                peer.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_4_out_of_descriptors_the_router_backs_off_instead_of_spinning(tmp_path):
    """A hard limit of 64 open files and 100 connections: accept() fails with EMFILE; the router waits
    and drops silent connections instead of spinning, and serves again once they are gone."""
    path, port = write_router_config(tmp_path, router={"acse_timeout": 3})
    log_path = tmp_path / "router.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            ["prlimit", "--nofile=64:64", sys.executable, "-m", "dicomrouter", "--config", str(path), "serve",
             "--log-format", "json", "--workers", "1"],  # one process: its CPU is what is measured
            stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    try:
        wait_for_port(port)
        peers = []
        for _ in range(100):
            try:
                peers.append(RawPeer(port, timeout=2))
            except OSError:
                break
        before = cpu_seconds(process.pid)
        time.sleep(2.0)  # measuring what two seconds of EMFILE cost
        spent = cpu_seconds(process.pid) - before
        for peer in peers:
            peer.close()
        assert spent < 0.5, f"{spent:.2f} s of CPU in 2 s"
        deadline = time.monotonic() + 30
        while not echo_succeeds(port):
            assert time.monotonic() < deadline, "no echo after the connections went"
            time.sleep(0.2)
        assert "accept_failed" in log_path.read_text()
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
