"""Storage Commitment Push Model through the router, with real peers: an Orthanc modality storing with
`"StorageCommitment": true`, the Orthanc farm as destinations (one of them a commitment SCP itself),
pynetdicom as an independent SCU that takes its report on a new association."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicomrouter.pacsfarm import OrthancServer, OrthancSpec, free_ports
from tests.support.orthanc_fixtures import ROUTER_AE, instance_bytes, make_test_instance
from tests.support.router_process import RouterProcess
from tests.support.store_helpers import edit_config, fast_retries

pytestmark = pytest.mark.slow

CT = "1.2.840.10008.5.1.4.1.1.2"


def _reported_how(router) -> str:
    """How the router's last report went out. The peer has the report before the router logs it (once the
    report's response is in): wait for the line."""
    events = _wait_for(lambda: _log_events(router, "commitment_reported"), 30)
    return events[-1]["how"]


def _wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="module")
def modality(tmp_path_factory, router_port) -> Iterator[OrthancServer]:
    """An Orthanc acting as the modality: the router is in its DicomModalities."""
    dicom_port, http_port = free_ports(2)
    server = OrthancServer(
        OrthancSpec("Modality", "MODALITY", dicom_port, http_port),
        tmp_path_factory.mktemp("modality"),
        peers=[(ROUTER_AE, "127.0.0.1", router_port)],
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pynetdicom_port() -> int:
    return free_ports(1)[0]


def commitment_config(
    farm_config: Path, modality: OrthancServer, pynetdicom_port: int, **settings
) -> Path:
    def change(data):
        fast_retries(data)
        data["router"]["storage_commitment"] = {
            "poll_interval": 0.2,
            "report_retry_initial": 0.5,
            "report_retry_max": 2,
            **settings,
        }
        data["clients"] += [
            {
                "ae_title": "MODALITY",
                "host": "127.0.0.1",
                "port": modality.spec.dicom_port,
                "roles": ["test_write"],
            },
            {"ae_title": "READER", "host": "127.0.0.1", "roles": ["test_read"]},
            {
                "ae_title": "PYSCU",
                "host": "127.0.0.1",
                "port": pynetdicom_port,
                "roles": ["test_write"],
            },
        ]
        data["routes"] = [
            {
                "name": "CT to Test PACS 1",
                "match": {"Modality": "CT"},
                "destinations": ["Test PACS 1"],
            }
        ]

    return edit_config(farm_config, change)


def _upload(modality: OrthancServer, count: int = 2) -> tuple[list[str], list[str]]:
    """Instances in the modality Orthanc: their Orthanc IDs and SOP Instance UIDs."""
    study_uid, series_uid = generate_uid(), generate_uid()
    ids, uids = [], []
    for index in range(count):
        ds = make_test_instance(
            study_uid=study_uid, series_uid=series_uid, instance_number=index + 1
        )
        ids.append(modality.upload(instance_bytes(ds))["ID"])
        uids.append(str(ds.SOPInstanceUID))
    return ids, uids


def _store_with_commitment(modality: OrthancServer, ids: list[str]) -> str:
    answer = modality.post_json(
        f"/modalities/{ROUTER_AE}/store",
        {"Resources": ids, "StorageCommitment": True, "Synchronous": True},
    )
    return answer["StorageCommitmentTransactionUID"]


def _commitment(modality: OrthancServer, transaction_uid: str) -> dict:
    return modality.get_json(f"/storage-commitment/{transaction_uid}")


def _final(modality: OrthancServer, transaction_uid: str, timeout: float = 60.0) -> dict:
    return _wait_for(
        lambda: (lambda c: c if c.get("Status") != "Pending" else None)(
            _commitment(modality, transaction_uid)
        ),
        timeout,
    )


@pytest.fixture
def commitment_router(
    farm_config, modality, pynetdicom_port, router_port, request
) -> Iterator[RouterProcess]:
    settings = getattr(request, "param", {})
    router = RouterProcess(
        commitment_config(farm_config, modality, pynetdicom_port, **settings), router_port
    )
    router.start()
    try:
        yield router
    finally:
        router.stop()


def test_orthanc_modality_gets_success_once_the_destination_holds_everything(
    commitment_router, modality, clean_orthanc_farm
):
    ids, uids = _upload(modality, 3)
    transaction_uid = _store_with_commitment(modality, ids)
    result = _final(modality, transaction_uid)
    print("Orthanc modality, destination up:", json.dumps(result))
    assert result["Status"] == "Success", result
    destination = clean_orthanc_farm["Test PACS 1"]
    assert set(uids) <= set(destination.instance_sop_uids())
    listing = json.loads(commitment_router.cli("commitments", "list", "--json").stdout)
    assert [row["transaction_uid"] for row in listing] == [transaction_uid]
    assert listing[0]["state"] == "reported" and listing[0]["event_type"] == 1
    print("reported on the", listing[0]["reported_how"])
    audit = commitment_router.audit_until(lambda rows: len(rows) >= 2, "--operation", "commitment")
    assert sorted(e["outcome"] for e in audit) == ["committed", "requested"]


def _log_events(router: RouterProcess, event: str) -> list[dict]:
    events = []
    for line in router.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            events.append(record)
    return events


def test_destination_down_no_success_until_it_is_back(
    commitment_router, modality, clean_orthanc_farm
):
    destination = clean_orthanc_farm["Test PACS 1"]
    destination.stop()
    try:
        ids, uids = _upload(modality, 2)
        transaction_uid = _store_with_commitment(modality, ids)
        # The router keeps trying the destination: the commitment stays pending meanwhile.
        assert _wait_for(
            lambda: len(_log_events(commitment_router, "destination_unavailable")) >= 2, 30
        )
        pending = json.loads(
            commitment_router.cli("commitments", "list", "--pending", "--json").stdout
        )
        assert [row["transaction_uid"] for row in pending] == [transaction_uid]
        assert _commitment(modality, transaction_uid)["Status"] == "Pending"
        commitment_router.stop()  # the pending request survives a restart of the router
    finally:
        destination.start()
    commitment_router.start()
    result = _final(modality, transaction_uid)
    print("Orthanc modality, destination down then back:", json.dumps(result))
    assert result["Status"] == "Success", result
    assert set(uids) <= set(destination.instance_sop_uids())
    assert _reported_how(commitment_router) == "new association"


@pytest.mark.parametrize("commitment_router", [{"max_wait": 2}], indirect=True)
def test_short_max_wait_reports_the_undelivered_instances_failed(
    commitment_router, modality, clean_orthanc_farm
):
    destination = clean_orthanc_farm["Test PACS 1"]
    destination.stop()
    try:
        ids, uids = _upload(modality, 2)
        transaction_uid = _store_with_commitment(modality, ids)
        result = _final(modality, transaction_uid)
    finally:
        destination.start()
    print("Orthanc modality, destination down past max_wait:", json.dumps(result))
    assert result["Status"] == "Failure", result
    assert {f["SOPInstanceUID"] for f in result["Failures"]} == set(uids)
    assert {f["FailureReason"] for f in result["Failures"]} == {0x0110}
    failed = _log_events(commitment_router, "commitment_failed")
    assert {e["sop_instance_uid"] for e in failed} == set(uids)
    assert all(
        "still waiting at max_wait for delivery to Test PACS 1" in e["reason"] for e in failed
    )
    audit = commitment_router.audit_until(
        lambda rows: any(e["outcome"] == "failed" for e in rows), "--operation", "commitment"
    )
    assert any(e["outcome"] == "failed" and uids[0] in (e["detail"] or "") for e in audit), audit


def _referenced(uids: list[str]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    items = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID = CT
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def _n_action(router_port: int, calling_ae: str, request: Dataset) -> int:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", router_port, ae_title=ROUTER_AE)
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(
            request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
        )
        return int(status.Status)
    finally:
        assoc.release()


def test_pynetdicom_scu_takes_its_report_on_a_new_association(
    commitment_router, modality, clean_orthanc_farm, router_port, pynetdicom_port
):
    ids, uids = _upload(modality, 1)
    modality.post_json(f"/modalities/{ROUTER_AE}/store", {"Resources": ids, "Synchronous": True})
    clean_orthanc_farm["Test PACS 1"].wait_for_instance_count(1)
    reports: list[tuple[int, Dataset]] = []

    def on_report(event):
        reports.append((event.event_type, event.event_information))
        return 0x0000, None

    scp = AE(ae_title="PYSCU")
    scp.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    server = scp.start_server(
        ("127.0.0.1", pynetdicom_port),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    try:
        never_sent = generate_uid()
        request = _referenced([uids[0], never_sent])
        assert _n_action(router_port, "PYSCU", request) == 0x0000
        assert _wait_for(lambda: reports, 30)
    finally:
        server.shutdown()
    event_type, report = reports[0]
    assert event_type == 2
    assert report.TransactionUID == request.TransactionUID
    assert [item.ReferencedSOPInstanceUID for item in report.ReferencedSOPSequence] == [uids[0]]
    assert [
        (item.ReferencedSOPInstanceUID, item.FailureReason) for item in report.FailedSOPSequence
    ] == [(never_sent, 0x0112)]
    assert _reported_how(commitment_router) == "new association"


def test_read_only_client_is_refused(commitment_router, router_port):
    assert _n_action(router_port, "READER", _referenced([generate_uid()])) == 0x0124
    refused = _log_events(commitment_router, "commitment_refused")
    assert refused and "READER has no write role" in refused[-1]["reason"]
    listing = json.loads(commitment_router.cli("commitments", "list", "--json").stdout)
    assert listing == []


def test_report_waits_for_the_destinations_own_commitment(
    farm_config, modality, pynetdicom_port, router_port, clean_orthanc_farm
):
    def committing(data):
        data["servers"][0]["storage_commitment"] = True  # Test PACS 1

    path = commitment_config(farm_config, modality, pynetdicom_port)
    edit_config(path, committing)
    with RouterProcess(path, router_port) as router:
        ids, uids = _upload(modality, 2)
        transaction_uid = _store_with_commitment(modality, ids)
        result = _final(modality, transaction_uid)
        print("Orthanc modality, destination Orthanc committing itself:", json.dumps(result))
        assert result["Status"] == "Success", result
        _reported_how(router)  # logged once the report's response is in
        events = [
            json.loads(line).get("event")
            for line in router.log_text().splitlines()
            if line.startswith("{")
        ]
        asked, received, reported = (
            events.index("commitment_asked"),
            events.index("commitment_report_received"),
            events.index("commitment_reported"),
        )
        assert asked < received < reported
        server_report = _log_events(router, "commitment_report_received")[0]
        assert server_report["server"] == "Test PACS 1" and server_report["committed"] == 2


def test_report_on_the_requests_own_association_while_it_is_open(
    commitment_router, modality, clean_orthanc_farm, router_port
):
    ids, uids = _upload(modality, 1)
    modality.post_json(f"/modalities/{ROUTER_AE}/store", {"Resources": ids, "Synchronous": True})
    clean_orthanc_farm["Test PACS 1"].wait_for_instance_count(1)
    reports: list[tuple[int, Dataset]] = []

    def on_report(event):
        reports.append((event.event_type, event.event_information))
        return 0x0000, None

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        "127.0.0.1",
        router_port,
        ae_title=ROUTER_AE,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    assert assoc.is_established
    try:
        request = _referenced(uids)
        status, _ = assoc.send_n_action(
            request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
        )
        assert status.Status == 0x0000
        assert _wait_for(lambda: reports, 30)
    finally:
        assoc.release()
    event_type, report = reports[0]
    assert event_type == 1 and report.TransactionUID == request.TransactionUID
    assert [item.ReferencedSOPInstanceUID for item in report.ReferencedSOPSequence] == uids
    assert _reported_how(commitment_router) == "same association"
