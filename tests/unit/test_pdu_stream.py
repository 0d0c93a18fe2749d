"""The PDU reader gives the same PDUs whether it reads exactly or ahead, however the bytes arrive."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import pytest

from dicomrouter.dul.connection import PduRefused, PduStream, PduTimeout
from dicomrouter.dul.pdu import P_DATA_TF


def pdu(body: bytes, pdu_type: int = P_DATA_TF) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body)) + body


@pytest.mark.parametrize("read_ahead", [0, 4096])
def test_pdus_come_whole_and_in_order(read_ahead):
    chooser = random.Random(7)
    sizes = [0, 1, 10, 4090, 4096, 4100, 9000, 20000]
    pdus = [pdu(bytes([index % 251]) * chooser.choice(sizes)) for index in range(200)]
    data = b"".join(pdus)
    ours, theirs = socket.socketpair()

    def send() -> None:  # in pieces of every size, sometimes pausing mid-PDU
        position = 0
        while position < len(data):
            size = chooser.choice([1, 5, 100, 3000, 10000])
            ours.sendall(data[position : position + size])
            position += size

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    stream = PduStream(theirs, 1 << 20, read_ahead=read_ahead)
    received = []
    while len(received) < len(pdus):
        try:
            pdu_type, body = stream.read(time.monotonic() + 0.01)
        except PduTimeout:
            continue  # what arrived is kept for the next read
        received.append(pdu(bytes(body), pdu_type))
    sender.join()
    ours.close()
    theirs.close()
    assert received == pdus


def test_reading_ahead_still_refuses_a_length_over_the_cap_before_its_body():
    ours, theirs = socket.socketpair()
    ours.sendall(pdu(b"x" * 10) + struct.pack(">BxI", P_DATA_TF, 5000))
    stream = PduStream(theirs, 4096, read_ahead=65536)
    assert bytes(stream.read(time.monotonic() + 1)[1]) == b"x" * 10
    with pytest.raises(PduRefused, match="5000 bytes"):
        stream.read(time.monotonic() + 1)
    ours.close()
    theirs.close()
