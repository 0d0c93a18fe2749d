"""Catalog housekeeping by `serve`: pruning finished jobs and old audit rows; a flood of rejections summed.

Real `dicomrouter serve` processes, real Orthanc, DCMTK storescu, pynetdicom as an independent caller.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.models import AuditEvent, ForwardJob, utcnow
from dicomrouter.config import load_config
from tests.front.test_echo_scp import log_events, write_router_config
from tests.support.orthanc_fixtures import make_test_instance, write_instance
from tests.support.pdus import A_ASSOCIATE_RJ, associate_rq
from tests.support.raw_peer import RawPeer
from tests.support.router_process import RouterProcess
from tests.support.store_helpers import storescu

pytestmark = pytest.mark.slow


def _wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def test_serve_prunes_finished_jobs_and_old_audit_rows(
    farm_config, clean_orthanc_farm, tmp_path, router_port
):
    study_uid, series_uid = generate_uid(), generate_uid()
    files = [
        str(
            write_instance(
                tmp_path / f"{i}.dcm",
                make_test_instance(study_uid, series_uid, instance_number=i + 1),
            )
        )
        for i in range(3)
    ]
    router = RouterProcess(farm_config, router_port).start()
    try:
        assert storescu(router_port, files).returncode == 0
        assert clean_orthanc_farm[0].wait_for_instance_count(3) == 3
        assert _wait_for(lambda: "queue: done 3" in router.cli("queue", "list").stdout)
    finally:
        router.stop()

    # Two jobs finished 8 days ago, one today; audit rows of 400 and 300 days ago (defaults: 7 days, 365 days).
    engine = make_engine(load_config(farm_config).router.catalog)
    sessions = session_factory(engine)
    now = utcnow()
    with sessions.begin() as session:
        old_ids = session.scalars(sa.select(ForwardJob.id).order_by(ForwardJob.id).limit(2)).all()
        session.execute(
            sa.update(ForwardJob)
            .where(ForwardJob.id.in_(old_ids))
            .values(updated_at=now - timedelta(days=8))
        )
        session.add(
            AuditEvent(
                at=now - timedelta(days=400),
                operation="echo",
                outcome="success",
                calling_ae="OLDEST",
            )
        )
        session.add(
            AuditEvent(
                at=now - timedelta(days=300),
                operation="echo",
                outcome="success",
                calling_ae="OLDER",
            )
        )
    router = RouterProcess(farm_config, router_port).start()
    try:
        pruned = _wait_for(lambda: log_events(router, "catalog_pruned"))
        assert pruned, router.log_tail()
        assert (pruned[0]["done_jobs"], pruned[0]["audit_rows"]) == (2, 1)
        assert "queue: done 1" in router.cli("queue", "list").stdout
    finally:
        router.stop()
    with sessions() as session:
        remaining = session.scalars(sa.select(ForwardJob.id)).all()
        callers = set(session.scalars(sa.select(AuditEvent.calling_ae)))
    engine.dispose()
    assert len(remaining) == 1 and remaining[0] not in old_ids
    assert "OLDER" in callers and "OLDEST" not in callers
    events = json.loads(router.cli("audit", "--operation", "audit", "--json").stdout)
    assert [(e["outcome"], e["counts"]) for e in events] == [("pruned", {"rows": 1})]


def test_a_flood_of_rejections_is_one_line_and_row_then_a_summary(tmp_path):
    path, port = write_router_config(tmp_path)
    router = RouterProcess(path, port).start()
    attempts = 300
    try:
        # Raw requests, not pynetdicom's requestor: it now and then takes a rejection that arrives before its
        # own thread looks for it for an abort (the RJ is in its log, the association says aborted).
        for _ in range(attempts):
            with RawPeer(port) as peer:
                peer.send(associate_rq("SCANNER", "DICOMROUTER"))
                answer = peer.read_pdu(timeout=10)
            assert answer is not None and answer[0] == A_ASSOCIATE_RJ, answer
        first = _wait_for(
            lambda: [
                e
                for e in log_events(router, "association_rejected")
                if e["calling_ae"] == "SCANNER"
            ]
        )
        time.sleep(0.5)  # any further line would be written by now
        assert (
            len(
                [
                    e
                    for e in log_events(router, "association_rejected")
                    if e["calling_ae"] == "SCANNER"
                ]
            )
            == 1
        ), first
    finally:
        router.stop()
    assert len([line for line in router.log_text().splitlines() if "SCANNER" in line]) == 2, (
        "one line, one summary"
    )
    (summary,) = log_events(router, "association_rejections_repeated")
    assert summary["associations"] == attempts - 1 and summary["calling_aes"] == ["SCANNER"]
    rows = json.loads(router.cli("audit", "--ae", "SCANNER", "--json").stdout)
    assert [(r["operation"], r["outcome"]) for r in rows] == [("association", "rejected")] * 2
    assert sum(r["counts"]["associations"] for r in rows) == attempts
    assert rows[1]["address"] == "127.0.0.1" and "more rejection" in rows[1]["detail"]
