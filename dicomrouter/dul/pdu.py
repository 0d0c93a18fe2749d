"""Association PDUs as the acceptor sees them (PS3.8 9.3): read an A-ASSOCIATE-RQ, answer AC, RJ or A-ABORT.

Every length in a request is checked against what actually arrived before it is used; a
request this parser cannot make sense of raises `MalformedRequest`, which the listener
answers with A-ABORT (PS3.8 9.3.8: invalid PDU parameter value). User information sub-items
the router does not negotiate (asynchronous operations, extended negotiation, user identity)
are read past and left unanswered, which PS3.7 D.3.3 defines as "not supported".
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from dicomrouter.dul.ae_title import ae_title_problem

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
PDU_HEADER_LENGTH = 6
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# A-ASSOCIATE-RQ with every storage class in every transfer syntax is ~100 KiB; release and
# abort PDUs are 4 bytes. Only P-DATA-TF is bounded by the negotiated maximum length.
MAX_ASSOCIATION_PDU_LENGTH = 1024 * 1024
# A peer off by a header's length is not worth an abort; a 4 GB length is.
P_DATA_SLACK = 1024

# Presentation context results (PS3.8 9.3.3.2)
ACCEPTED = 0
USER_REJECTION = 1
NO_REASON = 2
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4
RESULT_WORDS = {
    ACCEPTED: "accepted",
    USER_REJECTION: "user rejection",
    NO_REASON: "no reason",
    ABSTRACT_SYNTAX_NOT_SUPPORTED: "abstract syntax not supported",
    TRANSFER_SYNTAXES_NOT_SUPPORTED: "transfer syntaxes not supported",
}

# User information sub-items (PS3.7 D.3.3)
MAX_LENGTH_ITEM, IMPLEMENTATION_UID_ITEM, ASYNC_OPERATIONS_ITEM = 0x51, 0x52, 0x53
ROLE_SELECTION_ITEM, IMPLEMENTATION_VERSION_ITEM = 0x54, 0x55
# A peer that can take less than this per PDU cannot be answered sensibly (real ones take 4 KiB and more).
MIN_PEER_MAX_PDU = 1024
MAX_CONTEXTS = 128  # presentation context IDs are the odd numbers 1..255

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE not recognised
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # rejected-permanent, service-user, no reason given
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)  # service-provider (ACSE), protocol version not supported
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit
REJECT_CONGESTION = (0x02, 0x03, 0x01)  # rejected-transient, temporary congestion

# A-ABORT source 2 (service provider), reasons (PS3.8 9.3.8)
ABORT_NOT_SPECIFIED_REASON, ABORT_UNEXPECTED_PDU_REASON, ABORT_INVALID_PARAMETER_REASON = 0, 2, 6


class MalformedRequest(ValueError):
    """The A-ASSOCIATE-RQ is not a well-formed request (answered with A-ABORT)."""


class BadAETitle(ValueError):
    """An AE title with control characters, or over 16 bytes (answered with A-ASSOCIATE-RJ)."""


def ae_title_from(raw: bytes) -> str:
    """An AE title as received: 16 bytes, space padded, checked by the one rule every path uses."""
    title = raw.rstrip(b"\0").decode("latin-1")
    problem = ae_title_problem(title)
    if problem:
        raise BadAETitle(problem)
    return title.strip(" ")


def valid_ae_title(title: str) -> bool:
    return ae_title_problem(title) is None


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class RoleProposal:
    scu: bool
    scp: bool


@dataclass(frozen=True)
class AssociateRequest:
    called_ae: str
    calling_ae: str
    called_ae_raw: bytes  # echoed back in the A-ASSOCIATE-AC as received
    calling_ae_raw: bytes
    contexts: tuple[ProposedContext, ...]
    max_pdu: int  # the requestor's maximum PDU length, 0: unlimited
    implementation_class_uid: str
    implementation_version: str = ""
    roles: dict[str, RoleProposal] | None = None  # SOP class -> the roles the requestor proposed
    bad_ae_title: str | None = None  # why the calling or called AE title cannot be accepted


def _uid(value: bytes) -> str:
    return value.rstrip(b"\0 ").decode("ascii")


def _items(data: bytes, offset: int) -> list[tuple[int, bytes]]:
    """The (type, value) items from `offset` to the end; raises when one overruns."""
    items = []
    while offset < len(data):
        if offset + 4 > len(data):
            raise MalformedRequest("truncated item header")
        item_type, length = struct.unpack_from(">BxH", data, offset)
        if offset + 4 + length > len(data):
            raise MalformedRequest(f"item 0x{item_type:02X} overruns the PDU")
        items.append((item_type, data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return items


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """The body of an A-ASSOCIATE-RQ (after the 6-byte PDU header)."""
    try:
        return _parse(body)
    except (UnicodeDecodeError, struct.error, IndexError) as exc:
        raise MalformedRequest(f"malformed request: {exc}") from None


def _role_selection(value: bytes) -> tuple[str, RoleProposal]:
    (uid_length,) = struct.unpack_from(">H", value, 0)
    if 2 + uid_length + 2 != len(value):
        raise MalformedRequest("role selection sub-item of the wrong length")
    return _uid(value[2 : 2 + uid_length]), RoleProposal(bool(value[-2]), bool(value[-1]))


def _parse(body: bytes) -> AssociateRequest:
    if len(body) < 68:
        raise MalformedRequest("request shorter than its fixed fields")
    (version,) = struct.unpack_from(">H", body, 0)
    called_raw, calling_raw = body[4:20], body[20:36]
    application_context = None
    contexts: list[ProposedContext] = []
    max_pdu = 0
    implementation_uid = ""
    implementation_version = ""
    roles: dict[str, RoleProposal] = {}
    seen_ids: set[int] = set()
    for item_type, value in _items(body, 68):
        if item_type == 0x10:
            application_context = _uid(value)
        elif item_type == 0x20:
            if len(value) < 4:
                raise MalformedRequest("presentation context item too short")
            context_id = value[0]
            if context_id % 2 == 0 or context_id in seen_ids:
                raise MalformedRequest(f"presentation context ID {context_id} is even or repeated")
            seen_ids.add(context_id)
            abstract_syntax = None
            syntaxes: list[str] = []
            for sub_type, sub_value in _items(value, 4):
                if sub_type == 0x30:
                    abstract_syntax = _uid(sub_value)
                elif sub_type == 0x40:
                    syntaxes.append(_uid(sub_value))
                else:
                    raise MalformedRequest(f"unknown presentation context sub-item 0x{sub_type:02X}")
            if not abstract_syntax or not syntaxes:
                raise MalformedRequest(f"presentation context {context_id} lacks its syntaxes")
            contexts.append(ProposedContext(context_id, abstract_syntax, tuple(syntaxes)))
        elif item_type == 0x50:
            for sub_type, sub_value in _items(value, 0):
                if sub_type == MAX_LENGTH_ITEM:
                    if len(sub_value) != 4:
                        raise MalformedRequest("maximum length sub-item of the wrong length")
                    (max_pdu,) = struct.unpack(">I", sub_value)
                elif sub_type == IMPLEMENTATION_UID_ITEM:
                    implementation_uid = _uid(sub_value)
                elif sub_type == IMPLEMENTATION_VERSION_ITEM:
                    implementation_version = sub_value.decode("ascii", "replace").strip()[:16]
                elif sub_type == ROLE_SELECTION_ITEM:
                    sop_class, proposal = _role_selection(sub_value)
                    roles[sop_class] = proposal
                # Other sub-items (asynchronous operations, extended negotiation, user identity)
                # are not negotiated: leaving them out of the answer declines them.
        # Unknown items are ignored, as PS3.8 9.3.1 asks of an acceptor.
    if not version & 1:
        raise _Rejection(REJECT_PROTOCOL_VERSION, "protocol version not supported")
    if application_context != APPLICATION_CONTEXT:
        raise _Rejection(REJECT_APPLICATION_CONTEXT, f"application context {application_context!r} not supported")
    if not contexts:
        raise MalformedRequest("no presentation context proposed")
    if 0 < max_pdu < MIN_PEER_MAX_PDU:
        raise MalformedRequest(f"maximum PDU length {max_pdu} is too small to answer in")
    bad = None
    called_ae = calling_ae = ""
    try:
        called_ae = ae_title_from(called_raw)
    except BadAETitle as exc:
        bad = f"called AE title {called_raw!r}: {exc}"
    try:
        calling_ae = ae_title_from(calling_raw)
    except BadAETitle as exc:
        bad = f"calling AE title {calling_raw!r}: {exc}"
    return AssociateRequest(
        called_ae=called_ae,
        calling_ae=calling_ae,
        called_ae_raw=called_raw,
        calling_ae_raw=calling_raw,
        contexts=tuple(contexts),
        max_pdu=max_pdu,
        implementation_class_uid=implementation_uid,
        implementation_version=implementation_version,
        roles=roles,
        bad_ae_title=bad,
    )


class _Rejection(MalformedRequest):
    """Well-formed enough to answer with A-ASSOCIATE-RJ (`reject`) rather than A-ABORT."""

    def __init__(self, reject: tuple[int, int, int], reason: str):
        super().__init__(reason)
        self.reject = reject


RequestRejected = _Rejection


@dataclass(frozen=True)
class ContextResult:
    context_id: int
    result: int
    abstract_syntax: str
    transfer_syntax: str  # the accepted one; empty when refused
    reason: str = ""  # why it was refused, for the log
    scu_role: bool | None = None  # role selection answered (None: no role selection item for it)
    scp_role: bool | None = None

    @property
    def accepted(self) -> bool:
        return self.result == ACCEPTED


# (proposed context, the requestor's proposed roles or None) -> result
ContextDecider = Callable[[ProposedContext, RoleProposal | None], ContextResult]


def negotiate(request: AssociateRequest, decide: ContextDecider) -> list[ContextResult]:
    """Each proposed context through `decide`; more than 128 contexts is a malformed request."""
    if len(request.contexts) > MAX_CONTEXTS:
        raise MalformedRequest(f"{len(request.contexts)} presentation contexts proposed, at most {MAX_CONTEXTS}")
    roles = request.roles or {}
    return [decide(context, roles.get(context.abstract_syntax)) for context in request.contexts]


def first_supported(
    context: ProposedContext, supported: frozenset[str] | set[str], result_if_none: int = TRANSFER_SYNTAXES_NOT_SUPPORTED
) -> ContextResult:
    """Accept with the first proposed transfer syntax in `supported` (the requestor's preference)."""
    chosen = next((ts for ts in context.transfer_syntaxes if ts in supported), None)
    if chosen is None:
        return ContextResult(
            context.context_id, result_if_none, context.abstract_syntax, "",
            reason="none of the proposed transfer syntaxes is supported",
        )
    return ContextResult(context.context_id, ACCEPTED, context.abstract_syntax, chosen)


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
    answered_roles: dict[str, tuple[bool, bool]] = {}
    for result in results:
        # A refused context still carries a transfer syntax sub-item, whose value is not significant.
        syntax = result.transfer_syntax.encode("ascii") if result.accepted else b""
        body += _item(0x21, bytes([result.context_id, 0, result.result, 0]) + _item(0x40, syntax))
        if result.accepted and result.scu_role is not None and result.scp_role is not None:
            answered_roles[result.abstract_syntax] = (result.scu_role, result.scp_role)
    user = _item(MAX_LENGTH_ITEM, struct.pack(">I", max_pdu))
    user += _item(IMPLEMENTATION_UID_ITEM, implementation_class_uid.encode("ascii"))
    for sop_class, (scu, scp) in answered_roles.items():
        uid = sop_class.encode("ascii")
        user += _item(ROLE_SELECTION_ITEM, struct.pack(">H", len(uid)) + uid + bytes([int(scu), int(scp)]))
    if implementation_version:  # 1 to 16 characters when present (PS3.7 D.3.3.2.3)
        user += _item(IMPLEMENTATION_VERSION_ITEM, implementation_version.encode("ascii")[:16])
    body += _item(0x50, user)
    return struct.pack(">BxI", A_ASSOCIATE_AC, len(body)) + body


def associate_rj(reject: tuple[int, int, int]) -> bytes:
    """A-ASSOCIATE-RJ with (result, source, reason/diagnostic)."""
    return struct.pack(">BxIxBBB", A_ASSOCIATE_RJ, 4, *reject)


def a_abort(reason: int = ABORT_NOT_SPECIFIED_REASON, source: int = 2) -> bytes:
    return struct.pack(">BxIxxBB", A_ABORT, 4, source, reason)


ABORT_NOT_SPECIFIED = a_abort(ABORT_NOT_SPECIFIED_REASON)
ABORT_UNEXPECTED_PDU = a_abort(ABORT_UNEXPECTED_PDU_REASON)
ABORT_INVALID_PARAMETER = a_abort(ABORT_INVALID_PARAMETER_REASON)
RELEASE_RP = struct.pack(">BxIxxxx", A_RELEASE_RP, 4)
RELEASE_RQ = struct.pack(">BxIxxxx", A_RELEASE_RQ, 4)
