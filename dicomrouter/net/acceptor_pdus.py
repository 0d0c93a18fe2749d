"""The acceptor's side of association negotiation: read an A-ASSOCIATE-RQ, build the A-ASSOCIATE-AC (PS3.8 9.3).

Used by the front's lean store path (scp/store_session.py). Anything this parser does not
fully understand is left to pynetdicom: `parse_associate_rq` raises, and the caller replays
the request to pynetdicom's acceptor, which answers it as it always did.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from dicomrouter.net.upper_layer import A_ASSOCIATE_AC, APPLICATION_CONTEXT

# Presentation context results (PS3.8 9.3.3.2)
ACCEPTED = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# User information sub-items the lean path understands; any other goes to pynetdicom
# (role selection 0x54, asynchronous operations 0x53, extended negotiation 0x56/0x57, user identity 0x58).
MAX_LENGTH_ITEM, IMPLEMENTATION_UID_ITEM, IMPLEMENTATION_VERSION_ITEM = 0x51, 0x52, 0x55
# A peer that can take less than this per PDU is left to pynetdicom (real ones take 4 KiB and more).
MIN_PEER_MAX_PDU = 1024


class NotForLeanPath(ValueError):
    """The request is malformed, or uses a feature only pynetdicom's acceptor negotiates."""


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class AssociateRequest:
    called_ae: str
    calling_ae: str
    called_ae_raw: bytes  # echoed back in the A-ASSOCIATE-AC as received
    calling_ae_raw: bytes
    contexts: tuple[ProposedContext, ...]
    max_pdu: int  # the requestor's maximum PDU length, 0: unlimited
    implementation_class_uid: str


def _uid(value: bytes) -> str:
    return value.rstrip(b"\0 ").decode("ascii")


def _items(data: bytes, offset: int) -> list[tuple[int, bytes]]:
    """The (type, value) items from `offset` to the end; raises when one overruns."""
    items = []
    while offset < len(data):
        if offset + 4 > len(data):
            raise NotForLeanPath("truncated item header")
        item_type, length = struct.unpack_from(">BxH", data, offset)
        if offset + 4 + length > len(data):
            raise NotForLeanPath(f"item 0x{item_type:02X} overruns the PDU")
        items.append((item_type, data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return items


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """The body of an A-ASSOCIATE-RQ (after the 6-byte PDU header)."""
    try:
        return _parse(body)
    except (UnicodeDecodeError, struct.error, IndexError) as exc:
        raise NotForLeanPath(f"malformed request: {exc}") from None


def _parse(body: bytes) -> AssociateRequest:
    if len(body) < 68:
        raise NotForLeanPath("request shorter than its fixed fields")
    (version,) = struct.unpack_from(">H", body, 0)
    if not version & 1:
        raise NotForLeanPath("protocol version not supported")
    called_raw, calling_raw = body[4:20], body[20:36]
    application_context = None
    contexts: list[ProposedContext] = []
    max_pdu = 0
    implementation_uid = None
    seen_ids: set[int] = set()
    for item_type, value in _items(body, 68):
        if item_type == 0x10:
            application_context = _uid(value)
        elif item_type == 0x20:
            context_id = value[0]
            if context_id % 2 == 0 or context_id in seen_ids:
                raise NotForLeanPath(f"presentation context ID {context_id} is even or repeated")
            seen_ids.add(context_id)
            abstract_syntax = None
            syntaxes: list[str] = []
            for sub_type, sub_value in _items(value, 4):
                if sub_type == 0x30:
                    abstract_syntax = _uid(sub_value)
                elif sub_type == 0x40:
                    syntaxes.append(_uid(sub_value))
                else:
                    raise NotForLeanPath(f"unknown presentation context sub-item 0x{sub_type:02X}")
            if not abstract_syntax or not syntaxes:
                raise NotForLeanPath(f"presentation context {context_id} lacks its syntaxes")
            contexts.append(ProposedContext(context_id, abstract_syntax, tuple(syntaxes)))
        elif item_type == 0x50:
            for sub_type, sub_value in _items(value, 0):
                if sub_type == MAX_LENGTH_ITEM and len(sub_value) == 4:
                    (max_pdu,) = struct.unpack(">I", sub_value)
                elif sub_type == IMPLEMENTATION_UID_ITEM:
                    implementation_uid = _uid(sub_value)
                elif sub_type == IMPLEMENTATION_VERSION_ITEM:
                    pass
                else:
                    raise NotForLeanPath(f"user information sub-item 0x{sub_type:02X}")
        else:
            raise NotForLeanPath(f"unknown item 0x{item_type:02X}")
    if application_context != APPLICATION_CONTEXT:
        raise NotForLeanPath("application context name not supported")
    if not contexts or implementation_uid is None:
        raise NotForLeanPath("no presentation context or no implementation class UID")
    if 0 < max_pdu < MIN_PEER_MAX_PDU:
        raise NotForLeanPath(f"maximum PDU length {max_pdu} is too small to answer in")
    return AssociateRequest(
        called_ae=called_raw.decode("ascii").strip(),
        calling_ae=calling_raw.decode("ascii").strip(),
        called_ae_raw=called_raw,
        calling_ae_raw=calling_raw,
        contexts=tuple(contexts),
        max_pdu=max_pdu,
        implementation_class_uid=implementation_uid,
    )


@dataclass(frozen=True)
class ContextResult:
    context_id: int
    result: int
    abstract_syntax: str
    transfer_syntax: str  # the accepted one; empty when refused


def negotiate(request: AssociateRequest, supported: Mapping[str, frozenset[str]]) -> list[ContextResult]:
    """Accept each context whose abstract syntax we support, with the first proposed transfer
    syntax we support (the requestor's order of preference, as pynetdicom's acceptor does)."""
    results = []
    for context in request.contexts:
        syntaxes = supported.get(context.abstract_syntax)
        if syntaxes is None:
            results.append(ContextResult(context.context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED, context.abstract_syntax, ""))
            continue
        chosen = next((ts for ts in context.transfer_syntaxes if ts in syntaxes), None)
        if chosen is None:
            results.append(ContextResult(context.context_id, TRANSFER_SYNTAXES_NOT_SUPPORTED, context.abstract_syntax, ""))
        else:
            results.append(ContextResult(context.context_id, ACCEPTED, context.abstract_syntax, chosen))
    return results


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(payload)) + payload


def associate_ac(
    request: AssociateRequest,
    results: list[ContextResult],
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version: str,
) -> bytes:
    """The A-ASSOCIATE-AC PDU for `results`, announcing our maximum PDU length."""
    body = struct.pack(">HH", 1, 0) + request.called_ae_raw + request.calling_ae_raw + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
    for result in results:
        # A refused context still carries a transfer syntax sub-item, whose value is not significant.
        syntax = result.transfer_syntax.encode("ascii") if result.result == ACCEPTED else b""
        body += _item(0x21, bytes([result.context_id, 0, result.result, 0]) + _item(0x40, syntax))
    user = _item(MAX_LENGTH_ITEM, struct.pack(">I", max_pdu))
    user += _item(IMPLEMENTATION_UID_ITEM, implementation_class_uid.encode("ascii"))
    if implementation_version:  # 1 to 16 characters when present (PS3.7 D.3.3.2.3)
        user += _item(IMPLEMENTATION_VERSION_ITEM, implementation_version.encode("ascii")[:16])
    body += _item(0x50, user)
    return struct.pack(">BxI", A_ASSOCIATE_AC, len(body)) + body
