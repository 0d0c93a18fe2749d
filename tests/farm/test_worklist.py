"""Modality Worklist through `dicomrouter serve`: Orthanc worklist servers, DCMTK findscu -W as the modality.

Each worklist item is one scheduled procedure step: the router must pass on every item a server
gives (the PT and the CT step of one PET/CT procedure share accession, requested procedure and
study UID), and give an item served by two worklist servers once.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from pydicom import Dataset
from pydicom.uid import generate_uid

from dicomrouter.cli.main import cli
from dicomrouter.pacsfarm import free_ports
from tests.front.test_echo_scp import log_events, wait_for_event
from tests.support.configs import base_document, write_document
from tests.support.find_support import FindRun, findscu
from tests.support.router_process import RouterProcess
from tests.support.worklist_support import pet_ct_procedure, worklist_item, worklist_orthancs

pytestmark = pytest.mark.slow

STEP = "ScheduledProcedureStepSequence[0]"
QUERIES = {
    "study_uid_and_step_id": (
        "PatientName",
        "PatientID",
        "AccessionNumber",
        "RequestedProcedureID",
        "StudyInstanceUID",
        f"{STEP}.Modality",
        f"{STEP}.ScheduledProcedureStepID",
        f"{STEP}.ScheduledStationAETitle",
    ),
    "no_study_uid": (
        "PatientName",
        "PatientID",
        "AccessionNumber",
        "RequestedProcedureID",
        f"{STEP}.Modality",
        f"{STEP}.ScheduledProcedureStepStartDate",
    ),
    # PT and CT step answer alike here: one server's two alike items are still two steps
    "no_step_keys": ("PatientName", "PatientID", "AccessionNumber"),
}


@pytest.fixture(scope="module")
def ris(tmp_path_factory):
    with worklist_orthancs(tmp_path_factory.mktemp("worklist-orthancs"), 2) as servers:
        yield servers


@pytest.fixture(scope="module")
def router(tmp_path_factory, ris):
    folder = tmp_path_factory.mktemp("worklist-router")
    port = free_ports(1)[0]
    document = base_document(port, [ris[0].router_entry(primary=True), ris[1].router_entry()])
    path = write_document(folder / "dicomrouter.yaml", document)
    result = CliRunner().invoke(cli, ["--config", str(path), "db", "upgrade"])
    assert result.exit_code == 0, result.output
    with RouterProcess(path, port) as process:
        yield process


@pytest.fixture
def serve(ris):
    """Give each worklist server its items (none for those not named)."""

    def serve(*per_server: list[Dataset]) -> None:
        for index, server in enumerate(ris):
            server.serve(per_server[index] if index < len(per_server) else [])

    return serve


def mr_item() -> Dataset:
    return worklist_item(
        "ACC-MR", "RP1", generate_uid(), "MR", "SPS1", patient_id="WL0002", patient_name="Other^One"
    )


def items(run: FindRun) -> list[str]:
    """The answers as comparable text, in a stable order (servers list items in any order)."""
    assert run.final == "Success", run.output
    return sorted(json.dumps(answer.to_json_dict(), sort_keys=True) for answer in run.answers)


def query_worklist(port: int, query: str, tmp_path, aec: str = "DICOMROUTER") -> list[str]:
    return items(findscu(port, *QUERIES[query], model="-W", aec=aec, tmp=tmp_path))


@pytest.mark.parametrize("query", QUERIES)
def test_every_scheduled_step_comes_through(ris, router, serve, query, tmp_path):
    serve([*pet_ct_procedure("ACC-PETCT"), mr_item()])
    direct = query_worklist(ris[0].port, query, tmp_path, aec=ris[0].ae_title)
    assert len(direct) == 3
    assert query_worklist(router.port, query, tmp_path) == direct


@pytest.mark.parametrize("step_ids", [True, False], ids=["step_ids", "no_step_ids"])
@pytest.mark.parametrize("query", QUERIES)
def test_an_item_on_two_worklist_servers_comes_once(ris, router, serve, query, step_ids, tmp_path):
    shared = [*pet_ct_procedure("ACC-TWICE", step_ids=step_ids), mr_item()]
    serve(shared, shared)
    direct = query_worklist(ris[0].port, query, tmp_path, aec=ris[0].ae_title)
    assert query_worklist(ris[1].port, query, tmp_path, aec=ris[1].ae_title) == direct
    assert len(direct) == 3
    assert query_worklist(router.port, query, tmp_path) == direct
    done = log_events(router, "find_done")[-1]
    assert done["query_level"] == "WORKLIST"
    assert done["answers"] == 3
    assert [state.split()[:2] for state in done["servers"].values()] == [["ok", "3"], ["ok", "3"]]


def test_the_union_of_two_worklists(ris, router, serve, tmp_path):
    petct = pet_ct_procedure("ACC-BOTH")
    us_item = worklist_item("ACC-US", "RP7", generate_uid(), "US", "SPS1", patient_id="WL0003")
    serve([*petct, mr_item()], [*petct, us_item])
    query = "study_uid_and_step_id"
    first = query_worklist(ris[0].port, query, tmp_path, aec=ris[0].ae_title)
    second = query_worklist(ris[1].port, query, tmp_path, aec=ris[1].ae_title)
    assert query_worklist(router.port, query, tmp_path) == sorted(
        set(first) | set(second)
    )  # 4: PT, CT, MR, US


def test_find_done_names_the_query_level(router, serve, tmp_path):
    serve([mr_item()])
    query_worklist(router.port, "no_study_uid", tmp_path)
    done = wait_for_event(router, "find_done", query_level="WORKLIST", answers=1)
    assert done["level"] == "info"  # the log level, no longer overwritten by the query level
