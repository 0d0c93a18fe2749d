"""Retrieval through the router keeps every instance as the PACS holds it (issue 17).

pydicom's transfer-syntax test files (new UIDs, one study) go straight into one Orthanc; DCMTK
storescp is the workstation (`+xa`: every syntax, `+B`: data sets written as received), movescu
and getscu ask the router. Every instance must arrive in the syntax Orthanc holds it in, its data
set byte for byte; a workstation taking only uncompressed syntaxes gets those and a failure with
a reason for each other one.
"""

from __future__ import annotations

import io
import warnings
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicomrouter.dicom_file import dataset_offset
from dicomrouter.pacsfarm import OrthancServer
from tests.support.find_support import edit_config, running_front
from tests.support.move_support import getscu, movescu, received_sop_uids, workstation

pytestmark = pytest.mark.slow

# pydicom test file, its transfer syntax, getscu's option preferring that syntax
FILES = [
    ("CT_small.dcm", "1.2.840.10008.1.2.1", "+xe"),
    # getscu 3.6.7 has no option proposing implicit VR alone for C-GET (its +xi proposes explicit)
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2", None),
    ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2", "+xb"),
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99", "+xd"),
    ("SC_rgb_small_odd_jpeg.dcm", "1.2.840.10008.1.2.4.50", "+xy"),
    ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51", "+xx"),
    ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70", "+xs"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", "+xt"),
    ("JPEGLSNearLossless_08.dcm", "1.2.840.10008.1.2.4.81", "+xu"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90", "+xv"),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", "+xw"),
    ("SC_rgb_rle.dcm", "1.2.840.10008.1.2.5", "+xr"),
]
# What storescp accepts without options
UNCOMPRESSED = {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"}
EVERY_SYNTAX = ("+xa", "+B")
DEFLATED = "1.2.840.10008.1.2.1.99"


def load_held_study(server: OrthancServer) -> dict:
    """Each test file with new UIDs in one study, uploaded as it is; sop UID -> (syntax, file)."""
    study_uid = generate_uid()
    held = {}
    for name, syntax, option in FILES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(get_testdata_file(name, download=False))
        assert str(ds.file_meta.TransferSyntaxUID) == syntax
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = "HELDSYNTAX"
        ds.PatientName = "Held^Syntax"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        server.upload(buffer.getvalue())
        held[ds.SOPInstanceUID] = (syntax, option, ds.SeriesInstanceUID)
    return {"study": study_uid, "instances": held}


def syntax_and_dataset(data: bytes) -> tuple[str, bytes]:
    """A DICOM file's transfer syntax and its data set's bytes (after the file meta), inflated
    when deflated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    syntax = str(meta.TransferSyntaxUID)
    dataset = data[dataset_offset(data[:8192]) :]
    if syntax == DEFLATED:
        dataset = zlib.decompress(dataset, -zlib.MAX_WBITS)
    return syntax, dataset


def elements(data: bytes) -> dict:
    """Every element's value, pixel data included, as pydicom reads it; not group lengths nor
    trailing padding (Orthanc drops them when it sends) nor the VR (it writes OB where a file
    says OW for encapsulated pixel data)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(io.BytesIO(data))
    return {elem.tag: elem.value for elem in ds if elem.tag.element != 0 and elem.tag != 0xFFFCFFFC}


def received_files(folder: Path) -> dict[str, bytes]:
    """SOP Instance UID -> the file storescp or getscu wrote."""
    files = {}
    for path in folder.iterdir():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sop_uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        files[sop_uid] = path.read_bytes()
    return files


def assert_as_held(server: OrthancServer, study: dict, folder: Path, expected: set[str]) -> None:
    """Each instance in the syntax the PACS holds it in, every element (pixel data included) equal
    to its file's."""
    got = received_files(folder)
    assert set(got) == expected
    for sop_uid, data in got.items():
        held = server.download_instance(sop_uid)
        syntax = syntax_and_dataset(data)[0]
        assert syntax == syntax_and_dataset(held)[0] == study["instances"][sop_uid][0], sop_uid
        assert elements(data) == elements(held), f"{syntax}: the data set changed"


def _relay_only(farm_config: Path) -> None:
    def drop(document):
        del document["servers"][0]["move_routing"]["WORKSTATION"]

    edit_config(farm_config, drop)


def _move_study(farm_config, router_port, workstation_port, folder: Path, study: dict, options):
    with running_front(farm_config, router_port) as front:
        with workstation(workstation_port, folder, options=options):
            return movescu(
                front.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study['study']}"
            )


def test_move_keeps_every_transfer_syntax_direct_and_relayed(
    farm_config, router_port, clean_orthanc_farm, workstation_port, tmp_path
):
    """Direct (the PACS stores to the workstation), then relayed (the router C-GETs and stores
    on): the same instances, the same syntaxes, the same data set bytes as the PACS sends them."""
    pacs = clean_orthanc_farm[0]
    study = load_held_study(pacs)
    runs = {}
    for route in ("direct", "relay"):
        if route == "relay":
            _relay_only(farm_config)
        run = _move_study(
            farm_config, router_port, workstation_port, tmp_path / route, study, EVERY_SYNTAX
        )
        assert run.status == 0x0000, run.output
        assert run.count("Completed") == len(FILES), route
        assert run.count("Failed") == 0, route
        assert_as_held(pacs, study, tmp_path / route, set(study["instances"]))
        runs[route] = received_files(tmp_path / route)
    for sop_uid, data in runs["relay"].items():
        syntax, relayed = syntax_and_dataset(data)
        assert relayed == syntax_and_dataset(runs["direct"][sop_uid])[1], syntax


def test_relay_to_an_uncompressed_workstation_fails_each_other_syntax_with_a_reason(
    farm_config, router_port, clean_orthanc_farm, workstation_port, tmp_path
):
    pacs = clean_orthanc_farm[0]
    study = load_held_study(pacs)
    _relay_only(farm_config)
    with running_front(farm_config, router_port) as front:
        with workstation(workstation_port, tmp_path / "ws", options=("+B",)) as folder:
            run = movescu(
                front.port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study['study']}"
            )
    uncompressed = {
        sop for sop, (syntax, _, _) in study["instances"].items() if syntax in UNCOMPRESSED
    }
    assert run.status == 0xB000, run.output
    assert run.count("Completed") == len(uncompressed)
    assert run.count("Failed") == len(FILES) - len(uncompressed)
    # The comment names the refused syntaxes (the log has every instance's)
    assert run.error_comment.startswith("WORKSTATION refuses "), run.error_comment
    assert "JPEG" in run.error_comment or "RLELossless" in run.error_comment
    assert_as_held(pacs, study, folder, uncompressed)
    assert received_sop_uids(folder) == uncompressed


def test_get_through_the_router_keeps_each_transfer_syntax(
    farm_config, router_port, clean_orthanc_farm, tmp_path
):
    """getscu takes one syntax per class (the one it prefers): each instance is asked for with the
    option preferring its own syntax, and comes back in it, unchanged."""
    pacs = clean_orthanc_farm[0]
    study = load_held_study(pacs)
    with running_front(farm_config, router_port) as front:
        for sop_uid, (syntax, option, series_uid) in study["instances"].items():
            if option is None:
                continue
            folder = tmp_path / syntax
            run = getscu(
                front.port,
                folder,
                "QueryRetrieveLevel=IMAGE",
                f"StudyInstanceUID={study['study']}",
                f"SeriesInstanceUID={series_uid}",
                f"SOPInstanceUID={sop_uid}",
                options=(option, "+B"),
            )
            assert run.status == 0x0000, (syntax, run.output[-3000:])
            assert run.count("Completed") == 1, syntax
            assert_as_held(pacs, study, folder, {sop_uid})


def test_get_of_the_whole_study_by_an_uncompressed_caller_counts_what_it_received(
    farm_config, router_port, clean_orthanc_farm, tmp_path
):
    """getscu by default: the router takes explicit VR little endian (its first proposal) for each
    class. The C-GET the router sends proposes just that, so the PACS sends each instance in that
    syntax where it can convert it; what it cannot send is counted failed, with a reason."""
    pacs = clean_orthanc_farm[0]
    study = load_held_study(pacs)
    with running_front(farm_config, router_port) as front:
        run = getscu(
            front.port,
            tmp_path / "got",
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study['study']}",
            options=("+B",),
        )
    got = received_files(tmp_path / "got")
    for data in got.values():
        assert syntax_and_dataset(data)[0] == "1.2.840.10008.1.2.1"
    assert run.count("Completed") == len(got)
    # Every instance is counted: received, or failed
    assert run.count("Failed") == len(FILES) - len(got), run.output[-3000:]
    if len(got) < len(FILES):
        expected = {0xB000} if got else {0xA702, 0xC000}
        assert run.status in expected, run.output[-3000:]
        assert "Test PACS 1" in run.error_comment
    else:
        assert run.status == 0x0000, run.output[-3000:]


def test_router_as_move_destination_accepts_the_syntax_proposed_first(farm_router, router_port):
    """A PACS delivering sub-operations proposes the syntax it holds an instance in first, the
    uncompressed ones after: the router takes that first one, compressed or not, per context."""
    from pynetdicom import AE, build_context

    from tests.support.orthanc_fixtures import ROUTER_AE

    secondary_capture, ct = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.2"
    uncompressed = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    firsts = [syntax for _, syntax, _ in FILES if syntax not in uncompressed]
    ae = AE(ae_title="TEST_PACS_1")
    ae.requested_contexts = [
        *(build_context(secondary_capture, [first, *uncompressed]) for first in firsts),
        build_context(ct, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]),
    ]
    assoc = ae.associate("127.0.0.1", router_port, ae_title=ROUTER_AE)
    try:
        assert assoc.is_established
        accepted = {cx.context_id: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    finally:
        assoc.release()
    proposed = {2 * i + 1: cx.transfer_syntax[0] for i, cx in enumerate(ae.requested_contexts)}
    assert accepted == proposed


def test_move_command_with_a_relay_keeps_every_transfer_syntax(
    farm_config, clean_orthanc_farm, workstation_port, tmp_path
):
    """`dicomrouter move` on the relay route: the same code, the same result."""
    from click.testing import CliRunner

    from dicomrouter.cli.main import cli
    from dicomrouter.cli.move import move_command

    if move_command.name not in cli.commands:
        cli.add_command(move_command)
    pacs = clean_orthanc_farm[0]
    study = load_held_study(pacs)
    _relay_only(farm_config)
    with workstation(workstation_port, tmp_path / "ws", options=EVERY_SYNTAX) as folder:
        result = CliRunner().invoke(
            cli,
            ["--config", str(farm_config), "move", study["study"], "--to", "WORKSTATION"],
            catch_exceptions=False,
        )
    assert result.exit_code == 0, result.output
    assert_as_held(pacs, study, folder, set(study["instances"]))


# Eleven image storage classes: more than one association can carry with a context per syntax
MANY_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX
    "1.2.840.10008.5.1.4.1.1.1.2",  # MG
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.6.1",  # US
    "1.2.840.10008.5.1.4.1.1.7",  # SC
    "1.2.840.10008.5.1.4.1.1.20",  # NM
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
    "1.2.840.10008.5.1.4.1.1.12.1",  # XA
]


def test_relay_of_a_study_with_more_classes_than_one_association_carries(
    farm_config, router_port, clean_orthanc_farm, workstation_port, tmp_path
):
    from tests.support.orthanc_fixtures import instance_bytes, make_test_instance

    pacs = clean_orthanc_farm[0]
    study_uid, series_uid = generate_uid(), generate_uid()
    sops = set()
    for number, sop_class in enumerate(MANY_CLASSES, start=1):
        ds = make_test_instance(
            study_uid=study_uid, series_uid=series_uid, instance_number=number, rows=8, cols=8
        )
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        pacs.upload(instance_bytes(ds))
        sops.add(ds.SOPInstanceUID)
    _relay_only(farm_config)
    run = _move_study(
        farm_config,
        router_port,
        workstation_port,
        tmp_path / "ws",
        {"study": study_uid},
        EVERY_SYNTAX,
    )
    assert run.status == 0x0000, run.output[-3000:]
    assert run.count("Completed") == len(MANY_CLASSES)
    assert set(received_files(tmp_path / "ws")) == sops
