"""A job whose spool file is gone is dead-lettered at once, and the PACS is never called for it."""

from __future__ import annotations

import socket
from pathlib import Path

from sqlalchemy import select

from dicomrouter.catalog import Catalog, make_engine, session_factory, upgrade
from dicomrouter.catalog.direct import DirectConnections
from dicomrouter.catalog.models import ForwardJob
from dicomrouter.config import parse_config
from dicomrouter.net.store_client import EncodedStoreClient
from dicomrouter.reload import ConfigHolder
from dicomrouter.store.acks import AckRecorder
from dicomrouter.store.forwarder import DestinationLane, Forwarder
from dicomrouter.store.queue import ForwardQueue, NewJob
from dicomrouter.store.spool import Spool


def test_a_missing_spool_file_dead_letters_its_job_without_an_association(tmp_path: Path) -> None:
    pacs = socket.create_server(("127.0.0.1", 0))  # stands for the PACS: nothing may connect to it
    pacs.setblocking(False)
    config = parse_config(
        {
            "router": {"catalog": f"sqlite:///{tmp_path}/catalog.db", "spool": str(tmp_path / "spool")},
            "servers": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.getsockname()[1],
                 "environment": "test", "active": True, "primary": True},
            ],
        },
        tmp_path / "dicomrouter.yaml",
    )
    engine = make_engine(config.router.catalog)
    upgrade(engine)
    sessions = session_factory(engine)
    catalog = Catalog(sessions)
    catalog.sync_servers(config)
    queue = ForwardQueue(sessions, "node-1", config.router.forwarding)
    gone = str(tmp_path / "spool" / "objects" / "ab" / "gone.dcm")
    header = {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "TransferSyntaxUID": "1.2.840.10008.1.2.1",
              "StudyInstanceUID": "1.2.3"}
    direct = DirectConnections(engine)
    with direct.begin() as transaction:
        jobs = queue.enqueue(
            transaction, [NewJob("1.2.3.4", gone, "ab" * 32, 100, "pacs", "MODALITY", "ROUTER", header)],
            claim_for={"pacs"},
        )
    direct.close()
    forwarder = Forwarder(ConfigHolder(config), queue, Spool(config.router.spool), AckRecorder(catalog, queue))
    server = config.server("pacs")
    client = EncodedStoreClient(server, config.router, forwarder.learn_capabilities)
    try:
        DestinationLane(forwarder, "pacs").send_batch(client, server, jobs)
        with sessions() as session:
            state, error = session.execute(select(ForwardJob.state, ForwardJob.last_error)).one()
        assert state == "dead"
        assert error == f"spool file {gone} is missing"
        try:
            pacs.accept()
            connected = True
        except BlockingIOError:
            connected = False
        assert not connected
    finally:
        client.close()
        pacs.close()
        engine.dispose()
