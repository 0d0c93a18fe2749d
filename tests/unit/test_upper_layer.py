"""The lean upper layer's PDU building and DIMSE message reassembly, without a network."""

from __future__ import annotations

import struct

import pytest

from dicomrouter.dul.dimse import us
from dicomrouter.net.upper_layer import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    MessageReader,
    associate_request,
    command_set,
    parse_accepted,
)
from tests.support.pdus import associate_ac_body

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"


def pdata_body(*pdvs: tuple[int, int, bytes]) -> bytes:
    return b"".join(struct.pack(">IBB", len(data) + 2, context, header) + data for context, header, data in pdvs)


def test_associate_request_numbers_contexts_and_offers_scp_roles():
    pdu = associate_request("ROUTER", "PACS", [(STUDY_GET, [EXPLICIT_VR_LE]), (CT, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])],
                            262144, scp_roles=[CT])
    assert pdu[0] == 0x01 and struct.unpack_from(">I", pdu, 2)[0] == len(pdu) - 6
    assert pdu[10:26] == b"PACS".ljust(16) and pdu[26:42] == b"ROUTER".ljust(16)
    assert b"\x20\x00" in pdu and pdu.count(CT.encode()) == 2  # its context and its role item
    role = struct.pack(">H", len(CT)) + CT.encode() + bytes([0, 1])
    assert role in pdu


def test_parse_accepted_keeps_only_accepted_contexts_and_the_max_pdu():
    accepted, max_pdu = parse_accepted(associate_ac_body({1: EXPLICIT_VR_LE, 5: IMPLICIT_VR_LE}, rejected=(3,)))
    assert accepted == {1: EXPLICIT_VR_LE, 5: IMPLICIT_VR_LE}
    assert max_pdu == 16384


def test_message_reader_reassembles_fragmented_command_and_dataset():
    command = command_set([(0x0100, us(0x0001)), (0x0110, us(7)), (0x0800, us(0x0000)), (0x1000, b"1.2.3\0")])
    dataset = bytes(range(256)) * 1000
    reader = MessageReader()
    assert reader.feed(pdata_body((3, 1, command[:10]))) == []
    assert reader.feed(pdata_body((3, 3, command[10:]), (3, 0, dataset[:1000]))) == []
    [message] = reader.feed(pdata_body((3, 2, dataset[1000:])))
    assert message.context_id == 3 and message.command_field == 0x0001 and message.us(0x0110) == 7
    assert message.text(0x1000) == "1.2.3"
    assert message.dataset == dataset


def test_message_reader_returns_commands_without_dataset_at_once():
    status = command_set([(0x0100, us(0x8021)), (0x0800, us(0x0101)), (0x0900, us(0xFF00)), (0x1021, us(4))])
    final = command_set([(0x0100, us(0x8021)), (0x0800, us(0x0101)), (0x0900, us(0x0000))])
    messages = MessageReader().feed(pdata_body((1, 3, status), (1, 3, final)))
    assert [m.status for m in messages] == [0xFF00, 0x0000]
    assert messages[0].us(0x1021) == 4 and messages[0].dataset is None


def test_a_data_set_in_a_file_goes_out_in_pdus_read_as_they_go(tmp_path):
    """A message's PDUs gathered into sendmsg() calls, a data set in a file read a group at a time: the
    bytes on the wire are those of PDUs built one by one from memory, whatever the socket takes at once."""
    import socket
    import threading

    from dicomrouter.dul.pdata import (
        GROUP_BYTES,
        FileSlice,
        message_groups,
        pdata_pdus,
        send_message,
    )
    from dicomrouter.net.upper_layer import pdvs

    data = bytes(range(256)) * (3 * GROUP_BYTES // 256 + 77)  # three groups and a bit, after a 1,000-byte head
    path = tmp_path / "instance.dcm"
    path.write_bytes(b"h" * 1000 + data)
    command = command_set([(0x0100, us(0x0001)), (0x0800, us(0x0000))])
    expected = pdata_pdus(5, command, True, 16384) + pdata_pdus(5, data, False, 16384)
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel takes a little at a time
    received = bytearray()
    reader = threading.Thread(target=lambda: [received.extend(c) for c in iter(lambda: theirs.recv(65536), b"")])
    reader.start()
    send_message(ours, 5, command, FileSlice(path, 1000, len(data)), max_pdu=16384)  # the PDU body, as negotiated
    ours.close()
    reader.join()
    theirs.close()
    assert bytes(received) == expected
    pdus, offset = [], 0
    while offset < len(received):
        length = int.from_bytes(received[offset + 2 : offset + 6], "big")
        pdus.append(bytes(received[offset : offset + 6 + length]))
        offset += 6 + length
    assert all(len(pdu) - 6 <= 16384 for pdu in pdus) and len(pdus) == 1 + -(-len(data) // (16384 - 6))
    headers = [pdvs(pdu[6:])[0][1] for pdu in pdus]
    assert headers == [3] + [0] * (len(pdus) - 2) + [2]  # command (last fragment), then the data set's
    with pytest.raises(OSError):
        for _ in message_groups(5, command, FileSlice(path, 1000, len(data) + 10), max_pdu=16384):
            pass  # the file is shorter
