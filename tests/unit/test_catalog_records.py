"""The catalog recording studies and instances, on SQLite and PostgreSQL, also concurrently."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa

from dicomrouter.catalog import Catalog, UnknownServer, session_factory
from dicomrouter.catalog.models import (
    Instance,
    InstanceLocation,
    Patient,
    Series,
    Study,
    StudyLocation,
)
from tests.unit import test_catalog as shared
from tests.unit.test_catalog import attrs, count, stored

# The parametrized database fixtures (SQLite file / PostgreSQL schema) of test_catalog.
url, engine, catalog = shared.url, shared.engine, shared.catalog


def test_record_instance_stored_is_idempotent_and_where_study_answers(
    catalog: Catalog, engine: sa.Engine
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    for _ in range(2):
        catalog.record_instance_stored(
            "pacs1", attrs("7"), "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2", 100, "00" * 32
        )
    [(server, learned_by, first_seen, last_seen)] = catalog.where_study("1.2.3.7")
    assert (server, learned_by) == ("pacs1", "stored")
    assert before < first_seen <= last_seen <= datetime.now(UTC)
    assert first_seen.tzinfo == UTC
    for model, expected in [
        (Patient, 1),
        (Study, 1),
        (Series, 1),
        (Instance, 1),
        (InstanceLocation, 1),
        (StudyLocation, 1),
    ]:
        assert count(engine, model) == expected, model.__tablename__

    assert catalog.server_has_instance("pacs1", "1.2.3.7.1.1")
    assert not catalog.server_has_instance("pacs2", "1.2.3.7.1.1")
    assert not catalog.server_has_instance("pacs1", "9.9.9")

    # A re-store with new content refreshes the instance row.
    catalog.record_instance_stored("pacs2", attrs("7"), None, "1.2.840.10008.1.2.1", 200, "ff" * 32)
    assert catalog.server_has_instance("pacs2", "1.2.3.7.1.1")
    assert [row.server_name for row in catalog.where_study("1.2.3.7")] == ["pacs1", "pacs2"]
    with session_factory(engine)() as session:
        instance = session.scalars(sa.select(Instance)).one()
        study = session.scalars(sa.select(Study)).one()
        patient = session.scalars(sa.select(Patient)).one()
    assert (instance.size_bytes, instance.sha256, instance.sop_class_uid) == (
        200,
        "ff" * 32,
        "1.2.840.10008.5.1.4.1.1.2",
    )
    assert (study.study_date, study.accession_number, study.description) == (
        date(2024, 1, 31),
        "ACC7",
        "CHEST",
    )
    assert (patient.patient_id, patient.issuer_of_patient_id, patient.patient_name) == (
        "PAT1",
        "",
        "Doe^Jane",
    )
    assert patient.birth_date == date(1970, 1, 2) and study.patient_id == patient.id

    assert catalog.where_study("1.2.3.404") == []
    with pytest.raises(UnknownServer):
        catalog.record_instance_stored("nowhere", attrs("7"), None, None, None, None)


def test_batched_recording_merges_modalities(catalog: Catalog, engine: sa.Engine) -> None:
    batch = [
        stored("8", "1", "1"),
        stored("8", "1", "2"),
        stored("8", "2", "1", modality="MR"),
        stored("9"),
    ]
    catalog.record_instances_stored("pacs1", batch)
    catalog.record_instances_stored("pacs1", batch)
    catalog.record_instance_stored("pacs1", attrs("8", "3", modality="US"), None, None, None, None)
    assert count(engine, Instance) == 5 and count(engine, Series) == 4 and count(engine, Study) == 2
    with session_factory(engine)() as session:
        assert (
            session.scalar(sa.select(Study.modalities).where(Study.study_uid == "1.2.3.8"))
            == "CT\\MR\\US"
        )


def test_record_study_seen_keeps_the_strongest_evidence(
    catalog: Catalog, engine: sa.Engine
) -> None:
    catalog.record_study_seen(
        "pacs2", "1.2.3.5", "found", {"PatientID": "P5", "ModalitiesInStudy": ["CT", "SR"]}
    )
    [found] = catalog.where_study("1.2.3.5")
    assert found.learned_by == "found"
    catalog.record_instance_stored("pacs2", attrs("5", PatientID="P5"), None, None, None, None)
    catalog.record_study_seen("pacs2", "1.2.3.5", "found")
    [again] = catalog.where_study("1.2.3.5")
    assert again.learned_by == "stored"
    assert again.first_seen == found.first_seen and again.last_seen > found.last_seen
    catalog.record_studies_seen(
        "pacs3", "moved", [{"StudyInstanceUID": "1.2.3.5"}, {"StudyInstanceUID": "1.2.3.6"}]
    )
    assert [(r.server_name, r.learned_by) for r in catalog.where_study("1.2.3.5")] == [
        ("pacs2", "stored"),
        ("pacs3", "moved"),
    ]
    with session_factory(engine)() as session:
        assert (
            session.scalar(sa.select(Study.modalities).where(Study.study_uid == "1.2.3.5"))
            == "CT\\SR"
        )
    with pytest.raises(ValueError):
        catalog.record_study_seen("pacs2", "1.2.3.5", "guessed")


def test_concurrent_recording_of_the_same_new_study(catalog: Catalog, engine: sa.Engine) -> None:
    rounds, per_thread = 5, 8
    errors: list[BaseException] = []

    def record(server: str, study: str, barrier: threading.Barrier) -> None:
        try:
            barrier.wait(timeout=30)
            for sop in range(per_thread):
                catalog.record_instance_stored(
                    server, attrs(study, sop=str(sop)), None, None, 1, "00" * 32
                )
            catalog.record_study_seen(server, f"1.2.3.{study}", "found", {"PatientID": "PAT1"})
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    for round_ in range(rounds):
        barrier = threading.Barrier(2)
        threads = [
            threading.Thread(target=record, args=(server, f"c{round_}", barrier))
            for server in ("pacs1", "pacs2")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        located = catalog.where_study(f"1.2.3.c{round_}")
        assert sorted((r.server_name, r.learned_by) for r in located) == [
            ("pacs1", "stored"),
            ("pacs2", "stored"),
        ]
    assert count(engine, Patient) == 1
    assert count(engine, Study) == rounds
    assert count(engine, Instance) == rounds * per_thread
    assert count(engine, InstanceLocation) == rounds * per_thread * 2
    assert count(engine, StudyLocation) == rounds * 2


def test_each_server_keeps_the_hash_of_its_own_copy(catalog: Catalog, engine: sa.Engine) -> None:
    """A corrected re-send is judged per server: the instance row only holds the last copy."""
    from dicomrouter.catalog.direct import DirectConnections
    from dicomrouter.store.receive import delivered_copies

    old, corrected = "aa" * 32, "bb" * 32
    direct = DirectConnections(engine)
    catalog.record_instance_stored("pacs1", attrs("8"), None, "1.2.840.10008.1.2.1", 100, old)
    catalog.record_instance_stored("pacs2", attrs("8"), None, "1.2.840.10008.1.2.1", 100, corrected)
    with direct.begin() as transaction:
        assert delivered_copies(transaction, "1.2.3.8.1.1") == {"pacs1": old, "pacs2": corrected}
    catalog.record_instance_stored("pacs1", attrs("8"), None, "1.2.840.10008.1.2.1", 100, corrected)
    with direct.begin() as transaction:
        assert delivered_copies(transaction, "1.2.3.8.1.1") == {"pacs1": corrected, "pacs2": corrected}
    direct.close()
