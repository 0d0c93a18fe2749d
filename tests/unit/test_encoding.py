"""encode_answer writes C-FIND answers as pydicom would, without converting raw elements."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode, encode

from dicomrouter.net.encoding import RawAnswer, decode_answer, encode_answer


def answer_bytes(implicit: bool, **extra) -> bytes:
    """A study answer as a PACS sends it (an empty element among them)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.QueryRetrieveLevel = "STUDY"
    ds.AccessionNumber = ""
    ds.PatientName = "Müller^Anna"
    ds.PatientID = "P1"
    ds.StudyDate = "20240101"
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.NumberOfStudyRelatedInstances = "12"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return encode(ds, implicit, True)


def received_answer(implicit: bool, **extra) -> Dataset:
    """An answer as the find client has it: decoded lazily, the router's Retrieve AE added."""
    data = answer_bytes(implicit, ModalitiesInStudy=["CT", "MR"], Rows=5, **extra)
    answer = decode(BytesIO(data), implicit, True)
    answer[0x00080054] = DataElement(0x00080054, "AE", "DICOMROUTER")
    return answer


@pytest.mark.parametrize("received_implicit", [True, False])
@pytest.mark.parametrize("sent_implicit", [True, False])
def test_same_bytes_as_pydicom(received_implicit, sent_implicit):
    expected = encode(received_answer(received_implicit), sent_implicit, True)
    assert encode_answer(received_answer(received_implicit), sent_implicit) == expected


def test_a_sequence_changing_encoding_goes_through_pydicom():
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    answer = received_answer(True, ReferencedStudySequence=Sequence([item]))
    encoded = encode_answer(answer, False)
    assert decode(BytesIO(encoded), False, True).ReferencedStudySequence[0].ReferencedSOPInstanceUID == "1.2.3"


def test_an_added_text_element_goes_through_pydicom():
    answer = received_answer(False)
    answer.InstitutionName = "Hôpital"
    assert decode(BytesIO(encode_answer(answer, False)), False, True).InstitutionName == "Hôpital"


@pytest.mark.parametrize("implicit", [True, False])
def test_decode_answer_reads_what_pydicom_reads(implicit):
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    for data in (answer_bytes(implicit), answer_bytes(implicit, ReferencedStudySequence=Sequence([item])), b""):
        ours, theirs = decode_answer(data, implicit), decode(BytesIO(data), implicit, True)
        assert [tuple(ours.get_item(tag)) for tag in ours.keys()] == [tuple(theirs.get_item(tag)) for tag in theirs.keys()]
        assert ours == theirs
        assert ours.original_character_set == theirs.original_character_set
        assert encode_answer(ours, not implicit) == encode_answer(theirs, not implicit)


def test_what_only_pydicom_reads_goes_to_pydicom():
    explicit = answer_bytes(False)
    assert not RawAnswer(explicit, True).plain  # encoded otherwise than negotiated
    assert RawAnswer(explicit, True).dataset().PatientID == "P1"
    assert not RawAnswer(explicit[:-3], False).plain  # truncated
    undefined = encode(Dataset(), False, True) + bytes.fromhex("0800 1511 5351 0000 ffffffff feffdde0 00000000")
    assert not RawAnswer(undefined, False).plain


@pytest.mark.parametrize("implicit", [True, False])
def test_a_raw_answer_goes_out_as_pydicom_would_write_it(implicit):
    data = answer_bytes(implicit, IssuerOfPatientID="HOSP")
    raw = RawAnswer(data, implicit)
    assert raw.plain and raw.text(0x0020000D) == "1.2.3.4.5" and raw.text(0x00081030) == ""
    expected = decode(BytesIO(data), implicit, True)
    del expected.IssuerOfPatientID
    expected[0x00080054] = DataElement(0x00080054, "AE", "ROUTER")
    spliced = raw.encode(implicit, [0x00100021], [(0x00080054, "AE", "ROUTER")])
    assert spliced == encode(expected, implicit, True)
    assert raw.encode(implicit, [], []) is data
    assert raw.encode(not implicit, [], []) is None  # the caller's encoding differs: pydicom's way
