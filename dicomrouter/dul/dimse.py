"""DIMSE command sets (PS3.7 9.3, 10.3, E): read them bounded, write them in one piece."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from dicomrouter.dul.connection import ProtocolViolation
from dicomrouter.dul.pdu import ABORT_INVALID_PARAMETER

MAX_COMMAND_SET = 64 * 1024  # a command set is a few hundred bytes; nothing legitimate comes near this

C_STORE_RQ, C_GET_RQ, C_FIND_RQ, C_MOVE_RQ, C_ECHO_RQ = 0x0001, 0x0010, 0x0020, 0x0021, 0x0030
N_EVENT_REPORT_RQ, N_ACTION_RQ = 0x0100, 0x0130
C_CANCEL_RQ = 0x0FFF
RESPONSE_BIT = 0x8000
NO_DATASET = 0x0101

# Command elements (group 0000)
AFFECTED_SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, MESSAGE_ID_RESPONDED = 0x0002, 0x0100, 0x0110, 0x0120
MOVE_DESTINATION, PRIORITY, DATASET_TYPE, STATUS, ERROR_COMMENT = 0x0600, 0x0700, 0x0800, 0x0900, 0x0902
AFFECTED_SOP_INSTANCE, REQUESTED_SOP_CLASS, REQUESTED_SOP_INSTANCE = 0x1000, 0x0003, 0x1001
EVENT_TYPE_ID, ACTION_TYPE_ID = 0x1002, 0x1008
REMAINING, COMPLETED, FAILED, WARNING_COUNT = 0x1020, 0x1021, 0x1022, 0x1023
MOVE_ORIGINATOR_AE, MOVE_ORIGINATOR_ID = 0x1030, 0x1031
MAX_ERROR_COMMENT = 64  # (0000,0902) is LO


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def _element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def encode_command(elements: Iterable[tuple[int, bytes]]) -> bytes:
    """An implicit VR little endian command set, group length first, elements in tag order."""
    body = b"".join(_element(tag, value) for tag, value in sorted(elements))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def text_value(text: str, pad: bytes = b" ") -> bytes:
    data = text.encode("latin-1", "replace")
    return data + pad * (len(data) % 2)


def comment_value(comment: str) -> bytes:
    """An Error Comment: 64 characters at most, no control characters."""
    clean = "".join(ch if ch.isprintable() else " " for ch in comment)[:MAX_ERROR_COMMENT]
    return text_value(clean)


@dataclass(frozen=True)
class Command:
    """A received command set: element number -> raw value."""

    elements: dict[int, bytes]

    def number(self, element: int) -> int | None:
        value = self.elements.get(element)
        return int.from_bytes(value[:2], "little") if value is not None and len(value) >= 2 else None

    def uid(self, element: int) -> str:
        """A UI value without its padding; bytes that are not ASCII become U+FFFD (never a valid UID)."""
        return self.elements.get(element, b"").rstrip(b"\0 ").decode("ascii", "replace")

    def text(self, element: int) -> str:
        return self.elements.get(element, b"").decode("latin-1").strip(" \x00")

    @property
    def command_field(self) -> int | None:
        return self.number(COMMAND_FIELD)

    @property
    def has_dataset(self) -> bool:
        return self.number(DATASET_TYPE) not in (None, NO_DATASET)


def parse_command(data: bytes | bytearray) -> Command:
    """A command set, every element length checked against what arrived (implicit VR LE, group 0000)."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise ProtocolViolation("truncated command element", ABORT_INVALID_PARAMETER)
        group, element, length = struct.unpack_from("<HHI", data, offset)
        if group != 0x0000 or offset + 8 + length > len(data):
            raise ProtocolViolation("malformed command set", ABORT_INVALID_PARAMETER)
        elements[element] = bytes(data[offset + 8 : offset + 8 + length])
        offset += 8 + length
    return Command(elements)
