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
    from dicomrouter.net.upper_layer import FileSlice, iter_file_pdus, pdata_pdus, pdvs

    data = bytes(range(256)) * 300  # 76,800 bytes after a 1,000-byte head
    path = tmp_path / "instance.dcm"
    path.write_bytes(b"h" * 1000 + data)
    pdus = list(iter_file_pdus(5, FileSlice(path, 1000, len(data)), max_pdu=16384))  # the PDU body, as negotiated
    assert all(len(pdu) - 6 <= 16384 for pdu in pdus) and len(pdus) == -(-len(data) // (16384 - 6))
    assert b"".join(pdus) == pdata_pdus(5, data, False, 16384)  # the same bytes as from memory
    fragments = [pdvs(pdu[6:])[0] for pdu in pdus]
    assert [header for _, header, _ in fragments] == [0] * (len(pdus) - 1) + [2]
    assert b"".join(fragment for _, _, fragment in fragments) == data
    with pytest.raises(OSError):
        list(iter_file_pdus(5, FileSlice(path, 1000, len(data) + 10), max_pdu=16384))  # the file is shorter
