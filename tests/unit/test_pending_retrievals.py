"""Which pending C-MOVE to the router an arriving instance belongs to (retrieve/pending.py)."""

from __future__ import annotations

import io
import subprocess
import sys

import pydicom
from pydicom import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomrouter.net.get_client import ReceivedInstance
from dicomrouter.net.upper_layer import FileSlice
from dicomrouter.retrieve.handoff import MoveExchange
from dicomrouter.retrieve.pending import NOT_WANTED, SUCCESS, PendingRetrievals, instance_keys
from tests.support.orthanc_fixtures import make_test_instance


def received(ds: Dataset, syntax: str = ImplicitVRLittleEndian) -> ReceivedInstance:
    """The data set as a PACS would send it in `syntax` (no file meta)."""
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    encoded = buffer.getvalue()
    start = 132 + 12 + int.from_bytes(encoded[140:144], "little")
    return ReceivedInstance(ds.SOPClassUID, ds.SOPInstanceUID, syntax, encoded[start:])


def identifier(study_uid: str, series_uid: str | None = None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    ds.StudyInstanceUID = study_uid
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    return ds


def test_keys_read_from_the_first_bytes_in_memory_file_and_deflated(tmp_path):
    ds = make_test_instance()
    assert instance_keys(received(ds)) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    deflated = received(make_test_instance(), DeflatedExplicitVRLittleEndian)
    assert instance_keys(deflated)[0]
    spilled = tmp_path / "dataset.part"
    spilled.write_bytes(b"junk" + received(ds).dataset)
    in_file = ReceivedInstance(
        ds.SOPClassUID,
        ds.SOPInstanceUID,
        ImplicitVRLittleEndian,
        FileSlice(spilled, 4, spilled.stat().st_size - 4),
    )
    assert instance_keys(in_file) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)


def test_an_instance_goes_to_the_move_that_asked_for_it_and_only_while_it_is_pending():
    pending = PendingRetrievals()
    study_a, study_b = make_test_instance(), make_test_instance()
    taken: dict[str, list[str]] = {"a": [], "b": []}

    def keep(name):
        return lambda instance: taken[name].append(instance.sop_instance_uid) or SUCCESS

    with (
        pending.expect("PACS", "ROUTER", identifier(study_a.StudyInstanceUID), keep("a")) as a,
        pending.expect("PACS", "ROUTER", identifier(study_b.StudyInstanceUID), keep("b")) as b,
    ):
        assert a.message_id != b.message_id
        # The Move Originator names b's move; without it, every move to that server is a candidate.
        assert pending.candidates("PACS", "ROUTER", b.message_id) == [b]
        assert pending.candidates("PACS", "", None) == [a, b]
        assert pending.candidates("OTHER PACS", "ROUTER", a.message_id) == []
        status, _ = pending.deliver(received(study_b), pending.candidates("PACS", "", None))
        assert status == SUCCESS and taken["b"] == [study_b.SOPInstanceUID] and b.received == 1
        # b's move named, but the instance is a's study: b does not take it.
        status, reason = pending.deliver(received(study_a), [b])
        assert status == NOT_WANTED and "no pending retrieval" in reason and taken["a"] == []
    assert pending.candidates("PACS", "", None) == []


def test_a_series_move_takes_only_its_series():
    pending = PendingRetrievals()
    wanted, other = make_test_instance(), make_test_instance()
    other.StudyInstanceUID = wanted.StudyInstanceUID
    ask = identifier(wanted.StudyInstanceUID, wanted.SeriesInstanceUID)
    with pending.expect("PACS", "ROUTER", ask, lambda instance: SUCCESS) as move:
        assert pending.deliver(received(other), [move])[0] == NOT_WANTED
        assert pending.deliver(received(wanted), [move])[0] == SUCCESS


def test_another_worker_hands_an_instance_over_inline_or_as_its_file(tmp_path):
    folder = tmp_path / "moves"
    taken: list[tuple[str, int | None, ReceivedInstance]] = []

    def deliver(server_name, move_id, instance):
        taken.append((server_name, move_id, instance))
        return SUCCESS, ""

    owner = MoveExchange(folder, deliver)
    marker = owner.announce("Test PACS", 7)
    try:
        small = received(make_test_instance())
        sender = MoveExchange(folder, deliver)
        assert sender.hand_over(owner.address, "Test PACS", 7, small) == (SUCCESS, "")
        spilled = tmp_path / "large.part"
        spilled.write_bytes(small.dataset)
        as_file = ReceivedInstance(
            small.sop_class_uid,
            small.sop_instance_uid,
            small.transfer_syntax,
            FileSlice(spilled, 0, len(small.dataset)),
        )
        assert sender.hand_over(owner.address, "Test PACS", None, as_file)[0] == SUCCESS
        assert [(name, move_id) for name, move_id, _ in taken] == [
            ("Test PACS", 7),
            ("Test PACS", None),
        ]
        assert taken[0][2].dataset == small.dataset
        assert taken[1][2].dataset == FileSlice(spilled, 0, len(small.dataset))
        # The owner's own marker is not "another worker"; a dead process's marker is removed.
        assert owner.owner("Test PACS", 7) is None
        dead = folder / f"{marker.name.rsplit('.', 1)[0]}.{_dead_pid()}"
        dead.write_text("gone")
        assert owner.owner("Test PACS", 7) is None and not dead.exists()
        unreachable = sender.hand_over("\0dicomrouter-moves-nobody", "Test PACS", 7, as_file)
        assert unreachable[0] == 0xA700 and not spilled.exists()  # discarded, not left behind
    finally:
        owner.close()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
