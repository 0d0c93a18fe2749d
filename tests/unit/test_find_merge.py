"""Federated C-FIND without Orthanc: merge rules, keys, targets, and the streaming policy."""

from __future__ import annotations

import time

import pytest
from pydicom import Dataset

from dicomrouter.config import load_config
from dicomrouter.net.find_client import STUDY_ROOT_FIND, WORKLIST_FIND
from dicomrouter.query.federation import Federation, FindSummary, ServerReport
from dicomrouter.query.keys import BadKey, build_identifier
from dicomrouter.query.merge import (
    InvalidIdentifier,
    answer_key,
    check_identifier,
    merge_copies,
    prepare_query,
)
from dicomrouter.routing.access import Caller
from dicomrouter.routing.find_targets import find_targets
from tests.support.configs import base_document, write_document
from tests.support.find_peers import SlowFindPeer, dead_port, server_entry


def _study(uid: str, **attrs) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = uid
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def test_merge_prefers_the_first_copy_and_fills_what_it_lacks():
    primary = _study("1.2", StudyDescription="primary", AccessionNumber="", NumberOfStudyRelatedInstances="3")
    other = _study("1.2", StudyDescription="other", AccessionNumber="A1", NumberOfStudyRelatedInstances="2",
                   StudyDate="20240101")
    merged = merge_copies([primary, other], retrieve_ae="ROUTER")
    assert merged.StudyDescription == "primary"
    assert merged.AccessionNumber == "A1"
    assert merged.StudyDate == "20240101"
    assert merged.NumberOfStudyRelatedInstances == "3"  # not summed
    assert merged.RetrieveAETitle == "ROUTER"
    assert "RetrieveAETitle" not in primary  # several copies: a new answer


def test_merge_copies_names_only_between_the_same_character_set():
    latin = _study("1.2", SpecificCharacterSet="ISO_IR 100", PatientName="")
    utf8 = _study("1.2", SpecificCharacterSet="ISO_IR 192", PatientName="Иванов", StudyDate="20240101")
    merged = merge_copies([latin, utf8])
    assert merged.PatientName == ""
    assert merged.StudyDate == "20240101"


def test_keys_added_for_matching_are_stripped_from_answers():
    query, added = prepare_query(_study("", PatientName=""), "PATIENT")
    assert "PatientID" in query and "IssuerOfPatientID" in query
    assert added == {"IssuerOfPatientID"}
    answer = _study("", PatientID="P1", IssuerOfPatientID="HOSP")
    assert answer_key("PATIENT", answer) == ("P1", "HOSP")
    assert "IssuerOfPatientID" not in merge_copies([answer], added)
    assert answer_key("STUDY", _study("")) is None


def test_identifier_checks():
    assert check_identifier(_study("1.2"), STUDY_ROOT_FIND) == "STUDY"
    assert check_identifier(Dataset(), WORKLIST_FIND) == "WORKLIST"
    with pytest.raises(InvalidIdentifier, match="missing"):
        check_identifier(Dataset(), STUDY_ROOT_FIND)
    patient = Dataset()
    patient.QueryRetrieveLevel = "PATIENT"
    with pytest.raises(InvalidIdentifier, match="not one of"):
        check_identifier(patient, STUDY_ROOT_FIND)


def test_findscu_style_keys():
    identifier = build_identifier(
        "STUDY",
        ["PatientName=Mü*", "0010,0020=P1", "(0008,0061)", "StudyDate=20240101-"],
        defaults=False,
    )
    assert identifier.QueryRetrieveLevel == "STUDY"
    assert identifier.PatientName == "Mü*"
    assert identifier.PatientID == "P1"
    assert "ModalitiesInStudy" in identifier and not identifier.ModalitiesInStudy
    assert identifier.SpecificCharacterSet == "ISO_IR 192"
    worklist = build_identifier("WORKLIST", ["ScheduledProcedureStepSequence[0].Modality=CT"], defaults=False)
    assert worklist.ScheduledProcedureStepSequence[0].Modality == "CT"
    with pytest.raises(BadKey):
        build_identifier("STUDY", ["NoSuchKeyword=1"])
    with pytest.raises(BadKey, match="not a sequence"):
        build_identifier("STUDY", ["PatientName.PatientID=1"])


def test_failure_comment_fits_an_lo():
    reports = [ServerReport("Alpha", "unreachable", "refused"), ServerReport("Beta", "timeout", "5 s")]
    assert FindSummary("failed", reports, 0, 1.0).failure_comment() == "Alpha: unreachable (refused); Beta: timeout (5 s)"
    many = [ServerReport(f"Server number {i}", "unreachable", "connection refused by the host") for i in range(6)]
    comment = FindSummary("failed", many, 0, 1.0).failure_comment()
    assert len(comment) <= 64 and comment.startswith("unreachable: Server number 0")


@pytest.fixture
def two_env_config(tmp_path):
    document = base_document(servers=[
        {**server_entry("T1", "T1", 1001), "primary": True},
        server_entry("T2", "T2", 1002),
        server_entry("P1", "P1", 1003, "prod", worklist=True),
        {**server_entry("T3", "T3", 1004), "active": False},
    ])
    document["clients"].append({"ae_title": "NARROW", "roles": ["test_read", "prod_read"], "query_servers": ["T2", "P1"]})
    return load_config(write_document(tmp_path / "c.yaml", document))


def test_targets_follow_roles_query_servers_virtual_ae_and_worklist(two_env_config):
    config = two_env_config
    tester = Caller("WORKSTATION", "127.0.0.1", "client", frozenset({"test_read"}), client=config.client("WORKSTATION"))
    assert [s.name for s in find_targets(config, tester).servers] == ["T1", "T2"]
    narrow = Caller("NARROW", "127.0.0.1", "client", config.client("NARROW").roles, client=config.client("NARROW"))
    assert [s.name for s in find_targets(config, narrow).servers] == ["T2", "P1"]
    assert [s.name for s in find_targets(config, tester, called_ae="T2").servers] == ["T2"]
    refused = find_targets(config, tester, worklist=True)
    assert refused.servers == () and "may not read prod" in refused.refused
    assert [s.name for s in find_targets(config, narrow, worklist=True).servers] == ["P1"]
    nobody = Caller("X", "127.0.0.1", "server", frozenset())
    assert find_targets(config, nobody).refused


def _peer_config(tmp_path, peers, timeout=2.0):
    servers = [{**server_entry(p.ae_title, p.ae_title, p.port), "primary": i == 0} for i, p in enumerate(peers)]
    document = base_document(servers=servers)
    document["router"]["find_timeout"] = timeout
    return load_config(write_document(tmp_path / "peers.yaml", document))


def _run(config, window, level="STUDY"):
    federation = Federation(None, merge_window_s=window)
    query = _study("", StudyDescription="", AccessionNumber="")
    started = time.monotonic()
    run = federation.start(config.usable_servers(), config.router, STUDY_ROOT_FIND, query, level, "ROUTER")
    arrivals = []
    for answer in run.answers():
        arrivals.append((time.monotonic() - started, answer))
    return arrivals, run.summary


@pytest.fixture
def slow_primary_fast_secondary():
    primary = SlowFindPeer("PRIMARY", [_study("1.9", StudyDescription="primary's")], delay_s=0.4).start()
    secondary = SlowFindPeer(
        "SECONDARY", [_study("1.9", StudyDescription="secondary's", AccessionNumber="ACC"), _study("1.8")]
    ).start()
    yield primary, secondary
    primary.stop()
    secondary.stop()


def test_streaming_does_not_hold_answers_behind_a_slow_primary(tmp_path, slow_primary_fast_secondary):
    config = _peer_config(tmp_path, slow_primary_fast_secondary)
    arrivals, summary = _run(config, window=0.015)
    assert summary.outcome == "complete"
    assert len(arrivals) == 2  # one per study
    assert arrivals[0][0] < 0.3  # did not wait for the primary's 0.4 s
    shared = next(a for _, a in arrivals if a.identifier.StudyInstanceUID == "1.9")
    assert shared.identifier.StudyDescription == "secondary's"  # sent before the primary answered
    assert shared.servers == ["SECONDARY", "PRIMARY"]  # the late copy still counts as a holder


def test_waiting_for_everyone_merges_with_the_primary_first(tmp_path, slow_primary_fast_secondary):
    config = _peer_config(tmp_path, slow_primary_fast_secondary)
    arrivals, summary = _run(config, window=None)
    shared = next(a for _, a in arrivals if a.identifier.StudyInstanceUID == "1.9")
    assert shared.identifier.StudyDescription == "primary's"
    assert shared.identifier.AccessionNumber == "ACC"  # filled from the other copy
    assert [r.answers for r in summary.servers] == [1, 2]


def test_a_dead_peer_fails_fast_and_alone(tmp_path):
    alive = SlowFindPeer("ALIVE", [_study("1.7")]).start()
    try:
        class Dead:
            ae_title, port = "DEAD", dead_port()

        config = _peer_config(tmp_path, [Dead, alive])
        arrivals, summary = _run(config, window=0.015)
    finally:
        alive.stop()
    assert [a.identifier.StudyInstanceUID for _, a in arrivals] == ["1.7"]
    assert summary.outcome == "partial"
    assert [r.state for r in summary.servers] == ["unreachable", "ok"]
