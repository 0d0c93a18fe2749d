"""What each destination accepts, learned from its own negotiation: probes and forwarding against
real Orthanc (which refuses recent standard classes and private ones), kept in the catalog."""

from __future__ import annotations

import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from dicomrouter.app import build_app
from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.schema import upgrade
from dicomrouter.config import ConfigError, load_config
from dicomrouter.scp.registry import storage_class_allowed
from dicomrouter.store.capabilities import DestinationCapabilities
from dicomrouter.store.importer import IMPORT_CALLER
from tests.support.configs import base_document, write_document
from tests.support.find_peers import dead_port
from tests.support.orthanc_fixtures import instance_bytes, make_test_instance

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
PHOTOACOUSTIC = "1.2.840.10008.5.1.4.1.1.6.3"  # standard since 2023: Orthanc 1.10 refuses it
SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"  # private
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def capabilities_for(config_path: Path) -> DestinationCapabilities:
    config = load_config(config_path)
    sessions = session_factory(make_engine(config.router.catalog))
    return DestinationCapabilities(sessions, lambda: config)


# --------------------------------------------------------------------------- without a PACS


@pytest.fixture
def local_config(tmp_path: Path) -> Path:
    path = write_document(tmp_path / "dicomrouter.yaml", base_document())
    upgrade(load_config(path).router.catalog)
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def any_catalog_config(request, tmp_path: Path) -> Path:
    """A config whose catalog is SQLite, or PostgreSQL (a database of its own, dropped after)."""
    document = base_document()
    if request.param == "postgresql":
        server_url = request.getfixturevalue("pg_database")
        name = f"caps_{uuid.uuid4().hex[:10]}"
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


def _drop_database(admin: sa.Engine, name: str) -> None:
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_verdicts_from_records_are_kept_in_the_catalog_and_forgotten_when_the_address_changes(
    any_catalog_config,
):
    local_config = any_catalog_config
    capabilities = capabilities_for(local_config)
    config = load_config(local_config)
    pacs = config.server("Test PACS 1")
    assert capabilities.verdict("Test PACS 1", CT, [EXPLICIT]).state == "unknown"
    capabilities.record(
        pacs,
        accepted=[(CT, EXPLICIT)],
        refused=[(PHOTOACOUSTIC, EXPLICIT), (CT, "1.2.840.10008.1.2.5")],
    )
    verdict = capabilities.verdict("Test PACS 1", CT, [EXPLICIT, IMPLICIT, "1.2.840.10008.1.2.5"])
    assert (verdict.accepted, verdict.refused, verdict.unknown) == (
        (EXPLICIT,),
        ("1.2.840.10008.1.2.5",),
        (IMPLICIT,),
    )
    assert verdict.state == "accepted"
    assert capabilities.verdict("Test PACS 1", PHOTOACOUSTIC, [EXPLICIT]).state == "refused"
    assert capabilities.verdict("Test PACS 1", PHOTOACOUSTIC, [EXPLICIT]).class_accepted is False
    assert capabilities.verdict("Test PACS 1", CT, [IMPLICIT]).class_accepted is True
    assert capabilities.verdict("Prod PACS 1", CT, [EXPLICIT]).state == "unknown"
    capabilities.flush()

    again = capabilities_for(local_config)
    assert again.verdict("Test PACS 1", PHOTOACOUSTIC, [EXPLICIT]).state == "refused"
    assert again.verdict("Test PACS 1", CT, [EXPLICIT]).state == "accepted"
    # Another node learns the opposite later: the newest answer wins, in memory and in the catalog.
    again.record(pacs, accepted=[(PHOTOACOUSTIC, EXPLICIT)], refused=[])
    again.flush()
    assert (
        capabilities_for(local_config).verdict("Test PACS 1", PHOTOACOUSTIC, [EXPLICIT]).state
        == "accepted"
    )

    # A reload that moves the server: what it said at its old address no longer counts.
    moved = replace(
        config,
        servers=tuple(
            replace(s, port=4299) if s.name == "Test PACS 1" else s for s in config.servers
        ),
    )
    again.config_changed(config, moved)
    assert again.verdict("Test PACS 1", CT, [EXPLICIT]).state == "unknown"
    again.flush()
    assert capabilities_for(local_config).verdict("Test PACS 1", CT, [EXPLICIT]).state == "unknown"


def test_refusals_are_forgotten_on_reconnect_and_acceptances_kept(local_config):
    config = load_config(local_config)
    capabilities = capabilities_for(local_config)
    pacs = config.server("Test PACS 1")
    capabilities.record(pacs, accepted=[(CT, EXPLICIT)], refused=[(PHOTOACOUSTIC, EXPLICIT)])
    capabilities.flush()
    capabilities.forget_refusals("Test PACS 1")
    assert capabilities.verdict("Test PACS 1", PHOTOACOUSTIC, [EXPLICIT]).state == "unknown"
    assert capabilities.verdict("Test PACS 1", CT, [EXPLICIT]).state == "accepted"
    capabilities.record(
        pacs, accepted=[], refused=[(SIEMENS_CSA_NON_IMAGE, EXPLICIT)]
    )  # learned after
    capabilities.flush()
    again = capabilities_for(local_config)
    assert again.verdict("Test PACS 1", PHOTOACOUSTIC, [EXPLICIT]).state == "unknown"
    assert again.verdict("Test PACS 1", SIEMENS_CSA_NON_IMAGE, [EXPLICIT]).state == "refused"
    assert again.verdict("Test PACS 1", CT, [EXPLICIT]).state == "accepted"


def test_accepted_syntaxes_for_the_front(local_config):
    config = load_config(local_config)
    capabilities = DestinationCapabilities(None, lambda: config)
    capabilities.record(
        config.server("Test PACS 1"),
        accepted=[(CT, EXPLICIT)],
        refused=[(PHOTOACOUSTIC, EXPLICIT), (PHOTOACOUSTIC, IMPLICIT)],
    )
    assert capabilities.accepted_syntaxes("Test PACS 1", CT, (EXPLICIT, IMPLICIT)) == {
        EXPLICIT,
        IMPLICIT,
    }
    assert (
        capabilities.accepted_syntaxes("Test PACS 1", PHOTOACOUSTIC, (EXPLICIT, IMPLICIT))
        == frozenset()
    )
    assert capabilities.accepted_syntaxes("Test PACS 1", MR, (EXPLICIT,)) is None
    assert capabilities.accepted_syntaxes("Prod PACS 1", CT, (EXPLICIT,)) is None


def test_a_refusal_expires(local_config):
    config = load_config(local_config)
    capabilities = DestinationCapabilities(None, lambda: config, refused_ttl_s=0.2)
    capabilities.record(
        config.server("Test PACS 1"), accepted=[(CT, EXPLICIT)], refused=[(PHOTOACOUSTIC, EXPLICIT)]
    )
    assert capabilities.verdict("Test PACS 1", PHOTOACOUSTIC, [EXPLICIT]).state == "refused"
    time.sleep(0.3)  # the clock is what is tested here
    assert capabilities.verdict("Test PACS 1", PHOTOACOUSTIC, [EXPLICIT]).state == "unknown"
    assert (
        capabilities.verdict("Test PACS 1", CT, [EXPLICIT]).state == "accepted"
    )  # acceptances stay


def test_an_unreachable_server_stays_unknown_and_costs_the_timeout_at_most(local_config):
    config = load_config(local_config)
    config = replace(config, servers=tuple(replace(s, port=dead_port()) for s in config.servers))
    capabilities = DestinationCapabilities(None, lambda: config)
    started = time.monotonic()
    capabilities.probe(list(config.servers), [(CT, [EXPLICIT])], timeout_s=2)
    assert time.monotonic() - started < 1  # refused connections: nothing to wait for
    assert capabilities.verdict("Test PACS 1", CT, [EXPLICIT]).state == "unknown"
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, never answers
        mute = replace(config.servers[0], port=silent.getsockname()[1])
        started = time.monotonic()
        verdicts = capabilities.verdicts([mute], [(CT, [EXPLICIT])], timeout_s=1)
        assert 0.9 < time.monotonic() - started < 1.5
    assert verdicts["Test PACS 1"][CT].state == "unknown"


@pytest.mark.parametrize(
    ("value", "allowed", "refused"),
    [
        ("all", [CT, SIEMENS_CSA_NON_IMAGE], []),
        ("standard", [CT, PHOTOACOUSTIC], [SIEMENS_CSA_NON_IMAGE]),
        ([CT, SIEMENS_CSA_NON_IMAGE], [CT, SIEMENS_CSA_NON_IMAGE], [PHOTOACOUSTIC]),
    ],
)
def test_storage_classes_setting(tmp_path, value, allowed, refused):
    document = base_document()
    document["router"]["storage_classes"] = value
    config = load_config(write_document(tmp_path / "dicomrouter.yaml", document))
    assert [storage_class_allowed(config, uid)[0] for uid in allowed] == [True] * len(allowed)
    assert [storage_class_allowed(config, uid)[0] for uid in refused] == [False] * len(refused)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("some", "router.storage_classes: 'some' is not all, standard or a list of UIDs"),
        ([CT, "1.2.x"], "router.storage_classes[1]: '1.2.x' is not a UID"),
        ([], "router.storage_classes: [] is not all"),
    ],
)
def test_storage_classes_errors_name_the_key(tmp_path, value, words):
    document = base_document()
    document["router"]["storage_classes"] = value
    with pytest.raises(ConfigError) as raised:
        load_config(write_document(tmp_path / "dicomrouter.yaml", document))
    assert words in raised.value.render()


# --------------------------------------------------------------------------- against Orthanc


@pytest.mark.slow
def test_probing_orthanc_learns_what_it_refuses_and_the_catalog_keeps_it(farm_config):
    config = load_config(farm_config)
    pacs = config.primary
    capabilities = capabilities_for(farm_config)
    contexts = [
        (CT, [EXPLICIT, IMPLICIT]),
        (PHOTOACOUSTIC, [EXPLICIT]),
        (SIEMENS_CSA_NON_IMAGE, [EXPLICIT]),
    ]
    started = time.monotonic()
    verdicts = capabilities.verdicts([pacs], contexts, timeout_s=config.router.connect_timeout_s)[
        pacs.name
    ]
    assert time.monotonic() - started < config.router.connect_timeout_s
    assert verdicts[CT].accepted == (EXPLICIT, IMPLICIT)
    assert verdicts[PHOTOACOUSTIC].state == "refused"
    assert verdicts[SIEMENS_CSA_NON_IMAGE].state == "refused"
    started = time.monotonic()
    assert (
        capabilities.verdicts([pacs], contexts, timeout_s=5)[pacs.name] == verdicts
    )  # from memory
    assert time.monotonic() - started < 0.05
    capabilities.probe([pacs], [(MR, [EXPLICIT])], timeout_s=config.router.connect_timeout_s)
    assert capabilities.verdict(pacs.name, MR, [EXPLICIT]).state == "accepted"
    capabilities.stop()

    again = capabilities_for(farm_config)
    assert again.verdict(pacs.name, PHOTOACOUSTIC, [EXPLICIT]).state == "refused"
    assert again.verdict(pacs.name, CT, [IMPLICIT]).state == "accepted"
    assert again.verdict(pacs.name, MR, [EXPLICIT]).state == "accepted"


@pytest.mark.slow
def test_the_forwarder_records_what_its_destination_negotiated(farm_config, clean_orthanc_farm):
    """Today's dead letter (Orthanc refuses the class) now also teaches the router to refuse it."""
    config = load_config(farm_config)
    app = build_app(config, watch_file=False)
    app.start_forwarding()
    try:
        ct = make_test_instance(patient_id="CAPS0001")
        photoacoustic = make_test_instance(patient_id="CAPS0002")
        photoacoustic.SOPClassUID = photoacoustic.file_meta.MediaStorageSOPClassUID = PHOTOACOUSTIC
        for instance in (ct, photoacoustic):
            result = app.receive.receive(
                IMPORT_CALLER, config.router.ae_title, None, instance_bytes(instance)
            )
            assert result.status == 0x0000, result
        assert app.forwarder.wait_until_idle(30)
        capabilities = app.forwarder.capabilities
        assert capabilities is not None
        assert capabilities.verdict(config.primary.name, CT, [EXPLICIT]).state == "accepted"
        assert (
            capabilities.verdict(config.primary.name, PHOTOACOUSTIC, [EXPLICIT]).state == "refused"
        )
    finally:
        app.stop()
    persisted = capabilities_for(farm_config)
    assert persisted.verdict(config.primary.name, CT, [EXPLICIT]).state == "accepted"
    assert persisted.verdict(config.primary.name, PHOTOACOUSTIC, [EXPLICIT]).state == "refused"
