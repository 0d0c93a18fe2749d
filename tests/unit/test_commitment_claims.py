"""Storage commitment requests in the catalog: each claimed by one node at a time (SQLite and PostgreSQL),
and the verdict per instance from forwarding jobs, instance locations and the deadline."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.models import ForwardJob
from dicomrouter.catalog.schema import upgrade
from dicomrouter.config import load_config
from dicomrouter.net.commitment_client import Referenced
from dicomrouter.store.commitments import CommitmentStore
from tests.support.configs import base_document, write_document

CT = "1.2.840.10008.5.1.4.1.1.2"


def _drop_database(admin: sa.Engine, name: str) -> None:
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def config_path(request, tmp_path: Path) -> Path:
    document = base_document()
    document["servers"][1]["storage_commitment"] = True  # Prod PACS 1
    if request.param == "postgresql":
        server_url = request.getfixturevalue("pg_database")
        name = f"commit_{uuid.uuid4().hex[:10]}"
        admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        request.addfinalizer(lambda: _drop_database(admin, name))
        document["router"]["catalog"] = server_url.set(database=name).render_as_string(
            hide_password=False
        )
    path = write_document(tmp_path / "dicomrouter.yaml", document)
    upgrade(load_config(path).router.catalog)
    return path


def _store(config_path: Path, node: str) -> CommitmentStore:
    config = load_config(config_path)
    return CommitmentStore(session_factory(make_engine(config.router.catalog)), node)


def test_two_nodes_claim_each_request_once(config_path):
    first, second = _store(config_path, "node-a"), _store(config_path, "node-b")
    uids = [generate_uid() for _ in range(40)]
    for uid in uids:
        assert first.add_request(
            uid, "MODALITY", "DICOMROUTER", "127.0.0.1", [Referenced(CT, generate_uid())], 3600
        )
    assert not first.add_request(
        uids[0], "MODALITY", "DICOMROUTER", "127.0.0.1", [Referenced(CT, "1.2")], 3600
    )
    claimed: dict[str, list[str]] = {"node-a": [], "node-b": []}

    def work(store: CommitmentStore) -> None:
        while batch := store.claim(lease_s=60, limit=3):
            claimed[store.node_id] += [request.transaction_uid for request in batch]

    threads = [threading.Thread(target=work, args=(store,)) for store in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    everything = claimed["node-a"] + claimed["node-b"]
    assert sorted(everything) == sorted(uids)  # each once, none lost
    # A claim is a lease: given back, the request is due again (a node that died gives it back by expiry).
    request = first.list_requests(pending_only=True, limit=1)[0]
    first.check_later(request.id, 0)
    assert [r.transaction_uid for r in second.claim(60)] == [request.transaction_uid]


def _job(sop_uid: str, destination: str, state: str, error: str | None = None) -> ForwardJob:
    return ForwardJob(
        sop_instance_uid=sop_uid,
        spool_path=f"x/{sop_uid}",
        sha256="0" * 64,
        size_bytes=1,
        destination=destination,
        state=state,
        last_error=error,
        header={},
    )


def test_verdict_per_instance(config_path):
    store = _store(config_path, "node-a")
    config = load_config(config_path)
    delivered, waiting, dead, committing, never = (Referenced(CT, generate_uid()) for _ in range(5))
    with store.sessions.begin() as session:
        session.add_all(
            [
                _job(delivered.sop_instance_uid, "Test PACS 1", "done"),
                _job(waiting.sop_instance_uid, "Test PACS 1", "done"),
                _job(waiting.sop_instance_uid, "Prod PACS 1", "pending"),
                _job(dead.sop_instance_uid, "Test PACS 1", "dead", "C-STORE status 0xA700"),
                _job(committing.sop_instance_uid, "Prod PACS 1", "done"),
            ]
        )
    later = datetime.now(UTC) + timedelta(hours=1)
    verdict = store.evaluate([delivered, waiting, dead, committing, never], config, later)
    assert verdict.committed == [delivered]
    assert verdict.pending == {
        waiting: "delivery to Prod PACS 1",
        committing: "Prod PACS 1's own commitment",
    }
    assert verdict.to_request == {"Prod PACS 1": [committing]}
    assert verdict.failed[dead].reason == 0x0110 and "0xA700" in verdict.failed[dead].why
    assert verdict.failed[never].reason == 0x0112

    transaction_uid = generate_uid()
    store.add_destination_requests("Prod PACS 1", transaction_uid, [committing])
    assert store.evaluate([committing], config, later).to_request == {}
    assert store.destination_report(transaction_uid, [committing], {}) == "Prod PACS 1"
    assert store.evaluate([committing], config, later).committed == [committing]

    overdue = store.evaluate([waiting], config, datetime.now(UTC) - timedelta(seconds=1))
    assert overdue.failed[waiting].reason == 0x0110
    assert "still waiting at max_wait for delivery to Prod PACS 1" in overdue.failed[waiting].why


def test_storage_commitment_settings_are_typed_and_errors_name_the_key(tmp_path):
    from dicomrouter.config import ConfigError

    document = base_document()
    document["router"]["storage_commitment"] = {"max_wait": "30m", "poll_interval": 0.5}
    document["servers"][0]["storage_commitment"] = True
    config = load_config(write_document(tmp_path / "good.yaml", document))
    assert config.router.storage_commitment.max_wait_s == 1800
    assert config.router.storage_commitment.poll_interval_s == 0.5
    assert [s.storage_commitment for s in config.servers] == [True, False]
    document["router"]["storage_commitment"] = {"max_wait": "soon", "report_retry_max": 1}
    document["servers"][0]["storage_commitment"] = "yes"
    with pytest.raises(ConfigError) as error:
        load_config(write_document(tmp_path / "bad.yaml", document))
    text = str(error.value)
    for key in (
        "router.storage_commitment.max_wait",
        "router.storage_commitment.report_retry_max",
        "servers[0].storage_commitment",
    ):
        assert key in text
