"""Worklist merge rule without Orthanc: an item is one scheduled step; copies only across servers."""

from __future__ import annotations

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from dicomrouter.config import load_config
from dicomrouter.net.find_client import WORKLIST_FIND
from dicomrouter.query.federation import Federation
from dicomrouter.query.keys import build_identifier
from dicomrouter.query.merge import merge_copies, prepare_query, worklist_item_key
from tests.support.configs import base_document, write_document
from tests.support.find_peers import SlowFindPeer, server_entry
from tests.support.worklist_support import pet_ct_procedure, worklist_item

STEP_ID_PATH = "ScheduledProcedureStepSequence.ScheduledProcedureStepID"


def test_steps_of_one_procedure_are_two_items_and_a_step_is_one():
    pt, ct = pet_ct_procedure("ACC1")
    assert worklist_item_key(pt) != worklist_item_key(ct)  # same accession, procedure and study UID
    copy = worklist_item("ACC1", "RP1", pt.StudyInstanceUID, "PT", "SPS1", station_ae="OTHER")
    assert worklist_item_key(copy) == worklist_item_key(pt)  # the same step, however described
    other_procedure = worklist_item("ACC1", "RP2", pt.StudyInstanceUID, "PT", "SPS1")
    assert worklist_item_key(other_procedure) != worklist_item_key(pt)  # step IDs are per procedure


def test_without_a_step_id_every_attribute_decides():
    pt, ct = pet_ct_procedure("ACC2", step_ids=False)
    assert worklist_item_key(pt) != worklist_item_key(ct)
    again = worklist_item("ACC2", "RP1", pt.StudyInstanceUID, "PT", None, station_ae="PETCT1")
    assert worklist_item_key(again) == worklist_item_key(pt)
    again.PatientSex = "F"
    assert worklist_item_key(again) != worklist_item_key(pt)
    # an empty attribute is one the server did not return
    again.PatientSex, again.PatientWeight = "O", None
    assert worklist_item_key(again) == worklist_item_key(pt)
    # no procedure to put the step in: its ID alone names nothing
    bare = [Dataset(), Dataset()]
    for item, modality in zip(bare, ("PT", "CT"), strict=True):
        step = Dataset()
        step.ScheduledProcedureStepID, step.Modality = "1", modality
        item.ScheduledProcedureStepSequence = [step]
    assert worklist_item_key(bare[0]) != worklist_item_key(bare[1])


def test_the_step_id_is_asked_inside_the_callers_item_and_stripped():
    identifier = build_identifier(
        "WORKLIST", ["PatientName", "ScheduledProcedureStepSequence[0].Modality"], False
    )
    query, added = prepare_query(identifier, "WORKLIST")
    assert added == {"AccessionNumber", "RequestedProcedureID", "StudyInstanceUID", STEP_ID_PATH}
    assert "ScheduledProcedureStepID" in query.ScheduledProcedureStepSequence[0]
    assert (
        "ScheduledProcedureStepID" not in identifier.ScheduledProcedureStepSequence[0]
    )  # the caller's, as sent
    answer = pet_ct_procedure("ACC3")[0]
    merged = merge_copies([answer], added)
    assert "ScheduledProcedureStepID" not in merged.ScheduledProcedureStepSequence[0]
    assert merged.ScheduledProcedureStepSequence[0].Modality == "PT"
    assert "StudyInstanceUID" not in merged

    no_steps = build_identifier("WORKLIST", ["PatientName"], False)
    query, added = prepare_query(no_steps, "WORKLIST")
    assert "ScheduledProcedureStepSequence" not in query  # a sequence key would be a matching key
    assert STEP_ID_PATH not in added


@pytest.fixture
def two_worklist_peers():
    petct = pet_ct_procedure("ACC-P")
    mr = worklist_item("ACC-MR", "RP1", generate_uid(), "MR", None)
    # The first lists the MR item twice (two alike steps); the second has the PET/CT steps and one MR.
    first = SlowFindPeer("WL_A", [*petct, mr, mr]).start()
    second = SlowFindPeer("WL_B", [*petct, mr], delay_s=0.05).start()
    yield first, second
    first.stop()
    second.stop()


@pytest.mark.parametrize("window", [None, 0.010])
def test_copies_are_merged_across_servers_never_within_one(tmp_path, two_worklist_peers, window):
    servers = [
        {
            **server_entry(peer.ae_title, peer.ae_title, peer.port, worklist=True),
            "primary": index == 0,
        }
        for index, peer in enumerate(two_worklist_peers)
    ]
    config = load_config(write_document(tmp_path / "wl.yaml", base_document(servers=servers)))
    federation = Federation(None, merge_window_s=window)
    query = build_identifier("WORKLIST", [], defaults=True)
    with capture_logs() as logs:
        run = federation.start(
            config.usable_servers(), config.router, WORKLIST_FIND, query, "WORKLIST", None
        )
        answers = list(run.answers())
    modalities = sorted(a.identifier.ScheduledProcedureStepSequence[0].Modality for a in answers)
    assert modalities == ["CT", "MR", "MR", "PT"]  # 7 answers: PT, CT and one MR on both servers
    held_by_both = [a for a in answers if len(a.servers) == 2]
    assert len(held_by_both) == 3
    done = next(entry for entry in logs if entry["event"] == "find_done")
    assert done["query_level"] == "WORKLIST"
    assert done["log_level"] == "info"
    assert done["answers"] == 4
