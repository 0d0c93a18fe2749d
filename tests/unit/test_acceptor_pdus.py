"""The acceptor's A-ASSOCIATE-RQ parser and A-ASSOCIATE-AC / RJ builders (dul/pdu.py)."""

from __future__ import annotations

import struct

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC as PynetdicomAC
from pynetdicom.pdu import A_ASSOCIATE_RQ as PynetdicomRQ
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation, UserIdentityNegotiation

from dicomrouter.dul.pdu import (
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTED,
    REJECT_APPLICATION_CONTEXT,
    REJECT_PROTOCOL_VERSION,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    ContextResult,
    MalformedRequest,
    RequestRejected,
    RoleProposal,
    associate_ac,
    first_supported,
    negotiate,
    parse_associate_rq,
    valid_ae_title,
)
from dicomrouter.net.upper_layer import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    associate_request,
    parse_accepted,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def body_of(pdu: bytes) -> bytes:
    return pdu[6:]


def by_table(supported):
    """A context decider from a table of abstract syntax -> supported transfer syntaxes."""

    def decide(context, _roles):
        syntaxes = supported.get(context.abstract_syntax)
        if syntaxes is None:
            return ContextResult(context.context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED, context.abstract_syntax, "")
        return first_supported(context, syntaxes)

    return decide


def test_parses_what_a_requestor_proposes():
    pdu = associate_request("CT_SCANNER", "DICOMROUTER", [(CT, [JPEG_BASELINE, EXPLICIT_VR_LE]), (MR, [IMPLICIT_VR_LE])], 32768)
    request = parse_associate_rq(body_of(pdu))
    assert (request.calling_ae, request.called_ae) == ("CT_SCANNER", "DICOMROUTER")
    assert request.max_pdu == 32768
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in request.contexts] == [
        (1, CT, (JPEG_BASELINE, EXPLICIT_VR_LE)),
        (3, MR, (IMPLICIT_VR_LE,)),
    ]


def test_negotiation_takes_the_requestors_first_supported_syntax():
    pdu = associate_request(
        "A", "B", [(CT, [JPEG_BASELINE, EXPLICIT_VR_LE]), (MR, [JPEG_BASELINE]), (STUDY_FIND, [IMPLICIT_VR_LE])], 0
    )
    request = parse_associate_rq(body_of(pdu))
    supported = {CT: frozenset({EXPLICIT_VR_LE, JPEG_BASELINE}), MR: frozenset({IMPLICIT_VR_LE})}
    results = negotiate(request, by_table(supported))
    assert [(r.context_id, r.result, r.transfer_syntax) for r in results] == [
        (1, ACCEPTED, JPEG_BASELINE),
        (3, TRANSFER_SYNTAXES_NOT_SUPPORTED, ""),
        (5, ABSTRACT_SYNTAX_NOT_SUPPORTED, ""),
    ]


def test_the_accept_reads_back_in_our_requestor_and_in_pynetdicom():
    rq = associate_request("MODALITY", "DICOMROUTER", [(CT, [EXPLICIT_VR_LE]), (MR, [JPEG_BASELINE])], 16384)
    request = parse_associate_rq(body_of(rq))
    results = negotiate(request, by_table({CT: frozenset({EXPLICIT_VR_LE}), MR: frozenset({EXPLICIT_VR_LE})}))
    ac = associate_ac(request, results, 262144, "1.2.3.4", "ROUTER")
    accepted, max_pdu = parse_accepted(body_of(ac))
    assert accepted == {1: EXPLICIT_VR_LE} and max_pdu == 262144
    decoded = PynetdicomAC()
    decoded.decode(ac)
    assert decoded.calling_ae_title == "MODALITY" and decoded.called_ae_title == "DICOMROUTER"
    by_id = {cx.context_id: cx for cx in decoded.presentation_context}
    assert by_id[1].result == 0 and by_id[1].transfer_syntax == EXPLICIT_VR_LE
    assert by_id[3].result == TRANSFER_SYNTAXES_NOT_SUPPORTED
    assert decoded.user_information.maximum_length == 262144


def pynetdicom_rq(extra_user_items=()) -> bytes:
    """An A-ASSOCIATE-RQ as pynetdicom encodes it, with optional extra user information items."""
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        MaximumLengthNotification,
    )
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.calling_ae_title = "SCU"
    primitive.called_ae_title = "DICOMROUTER"
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    context = build_context(CT, [EXPLICIT_VR_LE])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3"
    primitive.user_information = [max_length, implementation, *extra_user_items]
    pdu = PynetdicomRQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def test_pynetdicom_requests_parse():
    request = parse_associate_rq(body_of(pynetdicom_rq()))
    assert request.calling_ae == "SCU" and request.contexts[0].abstract_syntax == CT


def role_selection():
    item = SCP_SCU_RoleSelectionNegotiation()
    item.sop_class_uid = CT
    item.scu_role, item.scp_role = False, True
    return item


def user_identity():
    item = UserIdentityNegotiation()
    item.user_identity_type = 1
    item.primary_field = b"radiologist"
    return item


def test_role_selection_is_read_and_answered():
    request = parse_associate_rq(body_of(pynetdicom_rq([role_selection(), user_identity()])))
    assert request.roles == {CT: RoleProposal(scu=False, scp=True)}
    results = [ContextResult(1, ACCEPTED, CT, EXPLICIT_VR_LE, scu_role=False, scp_role=True)]
    decoded = PynetdicomAC()
    decoded.decode(associate_ac(request, results, 16384, "1.2.3.4", "ROUTER"))
    (answer,) = decoded.user_information.role_selection.values()
    assert (answer.sop_class_uid, answer.scu_role, answer.scp_role) == (CT, False, True)
    assert decoded.user_information.user_identity is None  # not negotiated: declined by leaving it out


GOOD = body_of(associate_request("A", "B", [(CT, [EXPLICIT_VR_LE])], 0))


def _even_context(body: bytes) -> bytes:
    data = bytearray(body)
    (context_name_length,) = struct.unpack_from(">H", body, 70)  # the application context item comes first
    first_context = 68 + 4 + context_name_length
    assert data[first_context] == 0x20
    data[first_context + 4] = 2  # its presentation context ID
    return bytes(data)


MALFORMED = {
    "too short": GOOD[:60],
    "item overrunning the PDU": GOOD[:-3],
    "even context ID": _even_context(GOOD),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_are_refused(body):
    parse_associate_rq(GOOD)  # the unbroken request parses
    with pytest.raises(MalformedRequest):
        parse_associate_rq(body)


@pytest.mark.parametrize(
    ("body", "reject"),
    [
        (struct.pack(">H", 2) + GOOD[2:], REJECT_PROTOCOL_VERSION),
        (GOOD.replace(b"1.2.840.10008.3.1.1.1", b"1.2.840.10008.3.1.1.9"), REJECT_APPLICATION_CONTEXT),
    ],
    ids=["protocol version 2 only", "wrong application context"],
)
def test_well_formed_but_unsupported_requests_are_rejected(body, reject):
    with pytest.raises(RequestRejected) as refused:
        parse_associate_rq(body)
    assert refused.value.reject == reject


@pytest.mark.parametrize(
    "raw", ["É".encode("latin-1") * 16, b"CT\rFORGED LINE  ", b"CT\x1b[31mRED   ", b"A\\B" + b" " * 13]
)
def test_ae_titles_with_control_characters_are_flagged(raw):
    raw = raw.ljust(16, b" ")
    body = GOOD[:20] + raw + GOOD[36:]
    request = parse_associate_rq(body)
    assert request.bad_ae_title and "calling AE title" in request.bad_ae_title
    assert not valid_ae_title(raw.decode("latin-1"))


def test_128_contexts_negotiate():
    contexts = [(f"1.2.3.{index}", [EXPLICIT_VR_LE]) for index in range(128)]
    request = parse_associate_rq(body_of(associate_request("A", "B", contexts, 0)))
    assert len(negotiate(request, by_table({}))) == 128


def test_a_peer_taking_tiny_pdus_is_refused():
    with pytest.raises(MalformedRequest):
        parse_associate_rq(body_of(associate_request("A", "B", [(CT, [EXPLICIT_VR_LE])], 6)))
    assert parse_associate_rq(body_of(associate_request("A", "B", [(CT, [EXPLICIT_VR_LE])], 4096))).max_pdu == 4096
