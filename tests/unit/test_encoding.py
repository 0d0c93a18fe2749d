"""encode_answer writes C-FIND answers as pydicom would, without converting raw elements."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode, encode

from dicomrouter.net.encoding import encode_answer


def received_answer(implicit: bool, **extra) -> Dataset:
    """An answer as the find client has it: decoded lazily, the router's Retrieve AE added."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "Müller^Anna"
    ds.PatientID = "P1"
    ds.StudyDate = "20240101"
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.ModalitiesInStudy = ["CT", "MR"]
    ds.NumberOfStudyRelatedInstances = "12"
    ds.Rows = 5
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    answer = decode(BytesIO(encode(ds, implicit, True)), implicit, True)
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
