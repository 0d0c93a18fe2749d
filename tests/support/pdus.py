"""Canonical encoded PDUs for the tests: every test that builds PDUs by hand takes them from here.

Each is built field by field as PS3.8 section 9.3 lays it out (the comments name the fields), so a
test reads as the bytes on the wire, and a fix to one encoding is made once. The router's own
encoders (dicomrouter.dul.pdu for the acceptor, dicomrouter.net.upper_layer for the requestor)
are checked against these and against pynetdicom's, not used to build them.
"""

from __future__ import annotations

import struct

from dicomrouter.dul.dimse import us
from dicomrouter.net.upper_layer import (
    APPLICATION_CONTEXT,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    command_set,
)

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
VERIFICATION = "1.2.840.10008.1.1"


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body)) + body


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(payload)) + payload


def associate_rq(
    calling_ae: str,
    called_ae: str,
    abstract_syntax: str = VERIFICATION,
    transfer_syntaxes: tuple[str, ...] = (EXPLICIT_VR_LE, IMPLICIT_VR_LE),
    max_pdu: int = 65536,
) -> bytes:
    """A-ASSOCIATE-RQ with one presentation context (ID 1)."""
    context = bytes([1, 0, 0, 0]) + _item(0x30, abstract_syntax.encode())
    context += b"".join(_item(0x40, syntax.encode()) for syntax in transfer_syntaxes)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4.5")
    body = struct.pack(">HH", 1, 0) + called_ae.encode().ljust(16) + calling_ae.encode().ljust(16) + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode()) + _item(0x20, context) + _item(0x50, user)
    return pdu(A_ASSOCIATE_RQ, body)


def associate_ac_body(accepted: dict[int, str], rejected: tuple[int, ...] = (), max_pdu: int = 16384) -> bytes:
    """The body of an A-ASSOCIATE-AC (no PDU header): context ID -> accepted transfer syntax,
    the IDs of contexts rejected (result 3: abstract syntax not supported), our maximum length."""
    body = struct.pack(">HH", 1, 0) + b" " * 32 + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, syntax in accepted.items():
        body += _item(0x21, bytes([context_id, 0, 0, 0]) + _item(0x40, syntax.encode()))
    for context_id in rejected:
        body += _item(0x21, bytes([context_id, 0, 3, 0]) + _item(0x40, IMPLICIT_VR_LE.encode()))
    return body + _item(0x50, _item(0x51, struct.pack(">I", max_pdu)))


def p_data(context_id: int, data: bytes, command: bool, last: bool = True) -> bytes:
    header = (1 if command else 0) | (2 if last else 0)
    return pdu(P_DATA_TF, struct.pack(">IBB", len(data) + 2, context_id, header) + data)


def echo_command(message_id: int = 1) -> bytes:
    return command_set(
        [(0x0002, VERIFICATION.encode()), (0x0100, us(0x0030)), (0x0110, us(message_id)), (0x0800, us(0x0101))]
    )


def store_command(sop_class_uid: str, sop_instance_uid: str, message_id: int = 1) -> bytes:
    return command_set(
        [
            (0x0002, sop_class_uid.encode()),
            (0x0100, us(0x0001)),
            (0x0110, us(message_id)),
            (0x0700, us(0x0000)),
            (0x0800, us(0x0000)),
            (0x1000, sop_instance_uid.encode()),
        ]
    )


def find_command(sop_class_uid: str, message_id: int = 1) -> bytes:
    return command_set(
        [(0x0002, sop_class_uid.encode()), (0x0100, us(0x0020)), (0x0110, us(message_id)), (0x0700, us(0)), (0x0800, us(0))]
    )


# Fixed PDUs (PS3.8 9.3.6-9.3.8): type, reserved, length 4, then the fields.
RELEASE_RQ = pdu(A_RELEASE_RQ, bytes(4))  # 4 reserved bytes
RELEASE_RP = pdu(A_RELEASE_RP, bytes(4))
# A-ASSOCIATE-RJ body: reserved, result 2 (rejected-transient), source 3 (service provider,
# presentation), reason 2 (local limit exceeded)
RJ_LOCAL_LIMIT_BODY = b"\x00\x02\x03\x02"
# reserved, result 1 (rejected-permanent), source 1 (service user), reason 3 (calling AE not recognised)
RJ_CALLING_AE_BODY = b"\x00\x01\x01\x03"
# A-ABORT body: 2 reserved, source 2 (service provider), reason 6 (invalid PDU parameter value)
ABORT_INVALID_PARAMETER_BODY = b"\x00\x00\x02\x06"
