"""Which server gives which series (retrieve/plan.py), from what the servers said they hold."""

from __future__ import annotations

from pydicom import Dataset

from dicomrouter.net.move_client import PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE
from dicomrouter.retrieve.plan import RetrievePlan, _assign, _Survey
from tests.unit.test_move_routes import make_config


def study_request(study_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    return identifier


def test_each_series_once_from_the_most_complete_copy_primary_first(tmp_path):
    config = make_config(tmp_path)
    server = config.server
    surveys = [
        _Survey(
            server("Prod PACS 1"), {("1.2", "1.2.10"): 20, ("1.2", "1.2.20"): 5}, elapsed_s=0.01
        ),
        _Survey(
            server("Test PACS 1"), {("1.2", "1.2.10"): 15, ("1.2", "1.2.20"): 5}, elapsed_s=0.5
        ),
        _Survey(server("Old PACS"), {("1.2", "1.2.30"): 2}),  # inactive, but the only holder of C
    ]
    identifier = study_request("1.2")
    plan = RetrievePlan("STUDY", "1.2")
    _assign(plan, config, surveys, identifier, STUDY_ROOT_MOVE)
    assert [(s.name, s.series, s.instances) for s in plan.sources] == [
        ("Test PACS 1", {"1.2": ["1.2.20"]}, 5),  # the primary, for the series its copy is whole
        ("Prod PACS 1", {"1.2": ["1.2.10"]}, 20),  # A: 20 beats the primary's 15
        ("Old PACS", {"1.2": ["1.2.30"]}, 2),
    ]
    assert plan.copies_differ == {"1.2.10": {"Prod PACS 1": 20, "Test PACS 1": 15}}
    assert plan.instances == 27
    # A source holding more than it gives is asked for its series by UID; one holding only
    # what it gives gets the caller's own identifier.
    first, second, third = (source.requests for source in plan.sources)
    assert [
        (r.identifier.QueryRetrieveLevel, r.identifier.SeriesInstanceUID) for r in first + second
    ] == [
        ("SERIES", "1.2.20"),
        ("SERIES", "1.2.10"),
    ]
    assert third[0].identifier is identifier and third[0].query_model == STUDY_ROOT_MOVE


def test_whole_copies_on_two_servers_one_source_the_primary(tmp_path):
    config = make_config(tmp_path)
    server = config.server
    holdings = {("1.2", "1.2.10"): 4, ("1.2", "1.2.20"): 2}
    surveys = [
        _Survey(server("Prod PACS 1"), dict(holdings)),
        _Survey(server("Test PACS 1"), dict(holdings)),
    ]
    plan = RetrievePlan("STUDY", "1.2")
    _assign(plan, config, surveys, study_request("1.2"), STUDY_ROOT_MOVE)
    assert [(s.name, s.instances) for s in plan.sources] == [("Test PACS 1", 6)]
    assert plan.copies_differ == {}


def test_patient_level_studies_split_and_shared(tmp_path):
    config = make_config(tmp_path)
    server = config.server
    surveys = [
        _Survey(server("Test PACS 1"), {("1.1", "1.2.10"): 3, ("1.2", "1.2.20"): 1}),
        _Survey(server("Prod PACS 1"), {("1.2", "1.2.20"): 2, ("1.3", "1.2.30"): 4}),
    ]
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "PATIENT"
    identifier.PatientID = "P1"
    plan = RetrievePlan("PATIENT", None)
    _assign(plan, config, surveys, identifier, PATIENT_ROOT_MOVE)
    primary, prod = plan.sources
    # Test PACS 1 gives study 1.1 whole (STUDY level); Prod PACS 1 holds only what it gives.
    assert [
        (r.identifier.QueryRetrieveLevel, r.identifier.StudyInstanceUID) for r in primary.requests
    ] == [("STUDY", "1.1")]
    assert (
        prod.requests[0].identifier is identifier
        and prod.requests[0].query_model == PATIENT_ROOT_MOVE
    )
    assert plan.instances == 3 + 2 + 4
