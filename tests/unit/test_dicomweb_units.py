"""DICOMweb pieces that need no peer: QIDO parameters, DICOM JSON, multipart, STOW responses."""

from __future__ import annotations

import io

import pytest
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicomrouter.dicom_file import dataset_offset
from dicomrouter.http.dicomweb.dicomjson import answer_json, dataset_json
from dicomrouter.http.dicomweb.multipart import (
    MultipartError,
    MultipartWriter,
    content_type_parameters,
    iter_parts,
)
from dicomrouter.http.dicomweb.qido import QidoError, parse_qido
from dicomrouter.http.dicomweb.search import retrieve_url, warning_value
from dicomrouter.http.dicomweb.stow import SpillingSink, StoredPart, StowResult
from dicomrouter.store.spool import Spool


def test_qido_study_parameters_become_a_study_root_identifier():
    query = parse_qido(
        "studies",
        [
            ("PatientName", "SMITH*"),
            ("00080020", "20200101-20201231"),
            ("StudyInstanceUID", "1.2.3,1.2.4"),
            ("includefield", "StudyDescription,00081030,InstitutionName"),
            ("limit", "10"),
            ("offset", "5"),
            ("fuzzymatching", "true"),
        ],
    )
    identifier = query.identifier
    assert query.level == "STUDY"
    assert identifier.QueryRetrieveLevel == "STUDY"
    assert identifier.PatientName == "SMITH*"
    assert identifier.StudyDate == "20200101-20201231"
    assert list(identifier.StudyInstanceUID) == [
        "1.2.3",
        "1.2.4",
    ]  # a UID list, backslash-separated
    assert "InstitutionName" in identifier and "ModalitiesInStudy" in identifier
    assert (query.limit, query.offset, query.fuzzy) == (10, 5, True)
    assert query.matching == ("PatientName", "StudyDate", "StudyInstanceUID")


def test_qido_series_of_a_study_and_instances_of_a_series():
    series = parse_qido("series", [("Modality", "CT")], study_uid="1.2.3")
    assert series.level == "SERIES" and series.identifier.StudyInstanceUID == "1.2.3"
    instances = parse_qido("instances", [], study_uid="1.2.3", series_uid="1.2.3.4")
    assert instances.level == "IMAGE"
    assert instances.identifier.SeriesInstanceUID == "1.2.3.4"
    assert "SOPClassUID" in instances.identifier


def test_qido_study_search_asks_modalities_in_study_for_modality():
    """OHIF's study list asks includefield=00080060 and filters on Modality: a STUDY-level C-FIND
    has no Modality (Orthanc answers it empty, and OHIF v2's list then fails), ModalitiesInStudy
    holds the study's modalities."""
    query = parse_qido("studies", [("includefield", "00081030,00080060"), ("Modality", "CT")])
    assert "Modality" not in query.identifier
    assert query.identifier.ModalitiesInStudy == "CT"
    assert query.matching == ("ModalitiesInStudy",)
    series = parse_qido("series", [("includefield", "00080060"), ("Modality", "MR")])
    assert series.identifier.Modality == "MR"


def test_qido_all_fields_below_study_level_ask_for_study_attributes():
    query = parse_qido("instances", [("includefield", "all")])
    assert query.include_all and "PatientName" in query.identifier


def test_qido_non_ascii_value_goes_as_utf8():
    query = parse_qido("studies", [("PatientName", "Müller*")])
    assert query.identifier.SpecificCharacterSet == "ISO_IR 192"


@pytest.mark.parametrize(
    "parameters",
    [
        [("NotAKeyword", "x")],
        [("limit", "many")],
        [("offset", "-1")],
        [("PatientName.PatientID", "x")],
    ],
)
def test_qido_bad_parameters_are_refused(parameters):
    with pytest.raises(QidoError):
        parse_qido("studies", parameters)


def test_answer_json_decodes_the_pacs_charset_and_drops_bookkeeping():
    answer = Dataset()
    answer.SpecificCharacterSet = "ISO_IR 100"
    answer.QueryRetrieveLevel = "STUDY"
    # As the federation hands it on: raw Latin-1 bytes, decoded only when converted.
    answer[0x00100010] = RawDataElement(Tag(0x00100010), "PN", 8, b"M\xfcller^A", 0, False, True)
    answer.StudyInstanceUID = "1.2.3"
    result = answer_json(answer, "http://router/dicom-web/studies/1.2.3")
    assert result["00100010"]["Value"] == [{"Alphabetic": "Müller^A"}]
    assert "00080052" not in result and "00080005" not in result
    assert result["00081190"]["Value"] == ["http://router/dicom-web/studies/1.2.3"]


def _with_pixels(size: int) -> Dataset:
    dataset = Dataset()
    dataset.SOPInstanceUID = "1.2.3"
    dataset.PixelData = b"\x00" * size
    dataset["PixelData"].VR = "OW"
    dataset.add_new(0x00091010, "OB", b"\x01" * 4096)  # large private binary: bulk too
    return dataset


def test_metadata_json_leaves_bulk_data_out_or_references_it():
    plain = dataset_json(_with_pixels(16))  # pixel data is bulk data however small
    assert "7FE00010" not in plain and "00091010" not in plain and "00080018" in plain
    referenced = dataset_json(_with_pixels(16), lambda element: f"http://x/bulk/{element.tag:08X}")
    assert referenced["7FE00010"]["BulkDataURI"] == "http://x/bulk/7FE00010"
    assert referenced["00091010"]["BulkDataURI"] == "http://x/bulk/00091010"


def test_retrieve_url_per_level():
    answer = Dataset()
    answer.StudyInstanceUID, answer.SeriesInstanceUID, answer.SOPInstanceUID = "1", "2", "3"
    assert retrieve_url("http://h/dicom-web", "STUDY", answer) == "http://h/dicom-web/studies/1"
    assert (
        retrieve_url("http://h/dicom-web", "IMAGE", answer)
        == "http://h/dicom-web/studies/1/series/2/instances/3"
    )


def test_warning_header_quotes_the_text():
    assert warning_value('PACS "A": timeout') == '299 dicomrouter "PACS \\"A\\": timeout"'


class Collect:
    def __init__(self, headers):
        self.headers = headers
        self.data = bytearray()

    def write(self, data):
        self.data += data


def _body(parts: list[bytes], boundary: str = "b0undary") -> bytes:
    writer = MultipartWriter(boundary)
    out = b""
    for content in parts:
        out += writer.part("application/dicom") + content
    return out + writer.close()


def test_multipart_round_trip_with_delimiter_lookalikes_and_small_reads():
    parts = [b"\r\n--b0undar" * 50_000, b"", b"x" * 1_000_001, b"--b0undary-not-at-line-start"]
    body = _body(parts)
    stream = io.BytesIO(body)

    def read(size: int) -> bytes:
        return stream.read(min(size, 7777))  # odd sizes: delimiters cross reads

    got = [(headers, bytes(sink.data)) for headers, sink in iter_parts(read, "b0undary", Collect)]
    assert [content for _, content in got] == parts
    assert got[0][0]["content-type"] == "application/dicom"


def test_multipart_truncated_or_without_boundary_is_refused():
    body = _body([b"abc" * 1000])
    with pytest.raises(MultipartError):
        list(iter_parts(io.BytesIO(body[:-40]).read, "b0undary", Collect))
    with pytest.raises(MultipartError):
        list(iter_parts(io.BytesIO(b"no parts here").read, "b0undary", Collect))


def test_content_type_parameters():
    media, params = content_type_parameters(
        'Multipart/Related; type="application/dicom"; boundary="a b"'
    )
    assert media == "multipart/related" and params == {
        "type": "application/dicom",
        "boundary": "a b",
    }


def test_spilling_sink_goes_to_the_spool_past_the_threshold(tmp_path):
    spool = Spool(tmp_path)
    small = SpillingSink(spool, 100)
    small.write(b"x" * 100)
    assert small.partial is None and small.size == 100
    large = SpillingSink(spool, 100)
    large.write(b"x" * 60)
    large.write(b"y" * 60)
    assert large.memory is None and large.size == 120
    assert large.partial.path.stat().st_size == 120
    large.discard()
    assert not list(spool.tmp.iterdir())


def test_stow_response_statuses_and_sequences():
    ok = StoredPart("1.2.840.10008.5.1.4.1.1.7", "1.2.3.1", 0x0000, study_uid="1.2.3")
    bad = StoredPart(
        "1.2.840.10008.5.1.4.1.1.7", "1.2.3.2", 0x0124, "not authorized", study_uid="1.2.3"
    )
    assert StowResult([ok]).http_status == 200
    assert StowResult([ok, bad]).http_status == 202
    assert StowResult([bad]).http_status == 409
    body = StowResult([ok, bad]).response("http://h/dicom-web")
    assert body["00081190"]["Value"] == ["http://h/dicom-web/studies/1.2.3"]
    assert body["00081198"]["Value"][0]["00081197"]["Value"] == [0x0124]
    assert body["00081199"]["Value"][0]["00081155"]["Value"] == ["1.2.3.1"]


def test_spilling_sink_adds_the_preamble_a_client_left_out(tmp_path):
    import pydicom

    from tests.support.orthanc_fixtures import make_test_instance

    ds = make_test_instance(rows=8, cols=8)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)  # pydicom 3 writes no preamble unless asked
    assert buffer.getvalue()[:2] == b"\x02\x00"
    sink = SpillingSink(Spool(tmp_path), 1 << 20)
    for start in range(0, len(buffer.getvalue()), 50):
        sink.write(buffer.getvalue()[start : start + 50])
    assert sink.header()["SOPInstanceUID"] == ds.SOPInstanceUID
    assert bytes(sink.memory[128:132]) == b"DICM"
    assert dataset_offset(bytes(sink.memory)) > 144  # the file meta group length was added


def test_config_check_lists_the_dicomweb_url(tmp_path):
    from click.testing import CliRunner

    from dicomrouter.cli.main import cli
    from tests.support.configs import base_document, write_document

    document = base_document()
    path = write_document(tmp_path / "plain.yaml", document)
    result = CliRunner().invoke(cli, ["--config", str(path), "config", "check"])
    assert result.exit_code == 0, result.output
    assert "http    off" in result.output
    document["router"]["http"] = {"host": "127.0.0.1", "port": 8099}
    path = write_document(tmp_path / "web.yaml", document)
    result = CliRunner().invoke(cli, ["--config", str(path), "config", "check"])
    assert result.exit_code == 0, result.output
    assert "dicomweb http://127.0.0.1:8099/dicom-web" in result.output
    assert "cors    none: same-origin pages only" in result.output
    document["router"]["http"]["cors_origins"] = ["https://viewer.example"]
    path = write_document(tmp_path / "cors.yaml", document)
    result = CliRunner().invoke(cli, ["--config", str(path), "config", "check"])
    assert "cors    https://viewer.example" in result.output


def test_frames_native_and_encapsulated_as_stored():
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.encaps import generate_frames

    from dicomrouter.http.dicomweb.errors import DicomWebError
    from dicomrouter.http.dicomweb.frames import extract_frames, frame_media_type, parse_frame_list

    native = get_testdata_file("rtdose.dcm", read=False)
    with open(native, "rb") as handle:
        content = handle.read()
    syntax, frames = extract_frames(content, [2, 15])
    pixels = dcmread(native).PixelData
    assert syntax == "1.2.840.10008.1.2" and frames == [pixels[400:800], pixels[5600:6000]]
    assert frame_media_type(syntax) == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2"

    rle = get_testdata_file("SC_rgb_rle_2frame.dcm", read=False)
    with open(rle, "rb") as handle:
        content = handle.read()
    syntax, frames = extract_frames(content, [2])
    expected = list(generate_frames(dcmread(rle).PixelData, number_of_frames=2))[1]
    assert frames == [expected] and frame_media_type(syntax).startswith("image/dicom-rle")

    with pytest.raises(DicomWebError) as missing:
        extract_frames(content, [3])
    assert missing.value.status == 404
    assert parse_frame_list("1,3") == [1, 3]
    with pytest.raises(DicomWebError):
        parse_frame_list("0")


def test_bulk_data_paths_name_values_inside_sequences_and_serve_their_bytes():
    from pydicom import dcmread
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from dicomrouter.http.dicomweb.bulkdata import bulk_data_uris, bulk_value, parse_path
    from dicomrouter.http.dicomweb.errors import DicomWebError

    lut = Dataset()
    lut.add_new(0x00283006, "OW", bytes(range(256)) * 8)
    ds = Dataset()
    ds.PatientID = "P"
    ds.VOILUTSequence = [Dataset(), lut]
    result = dataset_json(
        ds, bulk_data_uris(ds, "http://r/dicom-web/studies/1/series/2/instances/3")
    )
    uri = result["00283010"]["Value"][1]["00283006"]["BulkDataURI"]
    assert uri == "http://r/dicom-web/studies/1/series/2/instances/3/bulkdata/00283010/1/00283006"

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    fresh = dcmread(io.BytesIO(buffer.getvalue()), force=True)
    assert parse_path("00283010/1/00283006") == [0x00283010, 1, 0x00283006]
    assert bulk_value(fresh, parse_path("00283010/1/00283006")) == bytes(range(256)) * 8
    for bad in ("00283010/x", "00283010/1", "zz"):
        with pytest.raises(DicomWebError) as info:
            parse_path(bad)
        assert info.value.status == 400
    with pytest.raises(DicomWebError) as info:
        bulk_value(fresh, parse_path("00283010/5/00283006"))
    assert info.value.status == 404
