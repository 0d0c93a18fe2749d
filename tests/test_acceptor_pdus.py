"""The acceptor's A-ASSOCIATE-RQ parser and A-ASSOCIATE-AC builder (net/acceptor_pdus.py)."""

from __future__ import annotations

import struct

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC as PynetdicomAC
from pynetdicom.pdu import A_ASSOCIATE_RQ as PynetdicomRQ
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation, UserIdentityNegotiation

from dicomrouter.net.acceptor_pdus import (
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTED,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    NotForLeanPath,
    associate_ac,
    negotiate,
    parse_associate_rq,
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
    results = negotiate(request, supported)
    assert [(r.context_id, r.result, r.transfer_syntax) for r in results] == [
        (1, ACCEPTED, JPEG_BASELINE),
        (3, TRANSFER_SYNTAXES_NOT_SUPPORTED, ""),
        (5, ABSTRACT_SYNTAX_NOT_SUPPORTED, ""),
    ]


def test_the_accept_reads_back_in_our_requestor_and_in_pynetdicom():
    rq = associate_request("MODALITY", "DICOMROUTER", [(CT, [EXPLICIT_VR_LE]), (MR, [JPEG_BASELINE])], 16384)
    request = parse_associate_rq(body_of(rq))
    results = negotiate(request, {CT: frozenset({EXPLICIT_VR_LE}), MR: frozenset({EXPLICIT_VR_LE})})
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


@pytest.mark.parametrize("extra", [role_selection, user_identity], ids=["role selection", "user identity"])
def test_negotiation_features_go_to_pynetdicom(extra):
    with pytest.raises(NotForLeanPath):
        parse_associate_rq(body_of(pynetdicom_rq([extra()])))


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
    "protocol version 2 only": struct.pack(">H", 2) + GOOD[2:],
    "item overrunning the PDU": GOOD[:-3],
    "AE title not ASCII": GOOD[:4] + "É".encode("latin-1") * 16 + GOOD[20:],
    "wrong application context": GOOD.replace(b"1.2.840.10008.3.1.1.1", b"1.2.840.10008.3.1.1.9"),
    "even context ID": _even_context(GOOD),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_go_to_pynetdicom(body):
    parse_associate_rq(GOOD)  # the unbroken request parses
    with pytest.raises(NotForLeanPath):
        parse_associate_rq(body)


def test_a_peer_taking_tiny_pdus_goes_to_pynetdicom():
    with pytest.raises(NotForLeanPath):
        parse_associate_rq(body_of(associate_request("A", "B", [(CT, [EXPLICIT_VR_LE])], 6)))
    assert parse_associate_rq(body_of(associate_request("A", "B", [(CT, [EXPLICIT_VR_LE])], 4096))).max_pdu == 4096
