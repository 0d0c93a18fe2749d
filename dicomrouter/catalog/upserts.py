"""Idempotent, concurrency-safe writes behind Catalog: INSERT .. ON CONFLICT on both databases."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from itertools import groupby
from typing import Any

from sqlalchemy import ColumnElement, Connection, bindparam, case, func, select, update
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from dicomrouter.catalog.models import (
    LEARNED_BY,
    Base,
    Instance,
    InstanceLocation,
    Patient,
    Series,
    Server,
    Study,
    StudyLocation,
    utcnow,
)
from dicomrouter.catalog.values import dicom_date, integer, join_modalities, modality_set, text
from dicomrouter.config import Config

_SERVER_FIELDS = ("ae_title", "host", "port", "environment", "active", "primary", "deleted")


class UnknownServer(LookupError):
    """A server name the catalog has never seen (sync_servers was not run for it)."""


@dataclass(frozen=True)
class StoredInstance:
    """One instance a server acknowledged; `attrs` maps DICOM keywords to values."""

    attrs: Mapping[str, Any]
    sop_class_uid: str | None
    transfer_syntax_uid: str | None
    size: int | None
    sha256: str | None


@dataclass(frozen=True)
class ServerSync:
    """Names of the servers that sync_servers added, changed and marked deleted."""

    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()


def required(attrs: Mapping[str, Any], keyword: str) -> str:
    """The attribute as text; ValueError when it is missing or empty."""
    value = text(attrs.get(keyword))
    if value is None:
        raise ValueError(f"{keyword} is missing or empty")
    return value


def dialect_insert(session: Session, model: type[Base]) -> PgInsert | SqliteInsert:
    """INSERT with ON CONFLICT support for the session's database."""
    return _insert_for(_dialect_name(session), model)


def server_id_of(session: Session, name: str) -> int:
    """The servers key for `name`; UnknownServer when it was never synced."""
    server_id = session.scalar(_SERVER_ID, {"name": name})
    if server_id is None:
        raise UnknownServer(f"server {name!r} is not in the catalog; sync_servers(config) first")
    return server_id


_SERVER_ID = select(Server.__table__.c.id).where(Server.__table__.c.name == bindparam("name"))


def _dialect_name(session: Session | Connection) -> str:
    if isinstance(session, Connection):
        return session.dialect.name
    return session.get_bind().dialect.name


def get_or_create(
    session: Session, model: type[Base], key: dict[str, Any], values: dict[str, Any]
) -> Any:
    """The row for the unique `key` (created from `values` if missing), empty columns filled.

    Returns the row as read before filling. Concurrent creators are safe: the loser's
    INSERT does nothing and its SELECT sees the winner's row; filling uses COALESCE, so
    the first non-empty value stays.
    """
    dialect = _dialect_name(session)
    query, insert = _get_or_create_statements(dialect, model, tuple(key), tuple(values))
    row = session.execute(query, key).one_or_none()
    if row is None:
        session.execute(insert, {**key, **values})
        row = session.execute(query, key).one()
    missing = {
        name: func.coalesce(getattr(model, name), value)
        for name, value in values.items()
        if value is not None and getattr(row, name) is None
    }
    if missing:
        session.execute(update(model).where(model.id == row.id).values(**missing))  # type: ignore[attr-defined]
    return row


@cache
def _get_or_create_statements(
    dialect: str, model: type[Base], key: tuple[str, ...], values: tuple[str, ...]
):
    """get_or_create's SELECT and INSERT for one shape of key and values, built once."""
    table = model.__table__.c  # Core columns: the statements skip the ORM's bulk-insert machinery
    condition = (table[k] == bindparam(k) for k in key)
    query = select(table.id, *(table[name] for name in values)).where(*condition)
    insert = _insert_for(dialect, model).values({name: bindparam(name) for name in (*key, *values)})
    return query, insert.on_conflict_do_nothing(index_elements=list(key))


def ensure_patient(session: Session, attrs: Mapping[str, Any]) -> int | None:
    """The patients key for attrs' PatientID (+ issuer), or None without a PatientID."""
    patient_id = text(attrs.get("PatientID"))
    if patient_id is None:
        return None
    key = {
        "patient_id": patient_id,
        "issuer_of_patient_id": text(attrs.get("IssuerOfPatientID")) or "",
    }
    values = {
        "patient_name": text(attrs.get("PatientName")),
        "birth_date": dicom_date(attrs.get("PatientBirthDate")),
    }
    return get_or_create(session, Patient, key, values).id


def ensure_study(session: Session, attrs: Mapping[str, Any], modalities: set[str]) -> int:
    """The studies key for attrs' StudyInstanceUID; fills empty fields, merges modalities."""
    values = {
        "patient_id": ensure_patient(session, attrs),
        "study_date": dicom_date(attrs.get("StudyDate")),
        "accession_number": text(attrs.get("AccessionNumber")),
        "description": text(attrs.get("StudyDescription")),
        "modalities": join_modalities(modalities),
    }
    key = {"study_uid": required(attrs, "StudyInstanceUID")}
    row = get_or_create(session, Study, key, values)
    if not modalities <= modality_set(row.modalities):
        # Read-merge-write under a row lock (PostgreSQL) so concurrent merges add up.
        lock = select(Study.modalities).where(Study.id == row.id).with_for_update(key_share=True)
        current = session.scalar(lock)
        merged = join_modalities(modality_set(current) | modalities)
        if merged != current:
            session.execute(update(Study).where(Study.id == row.id).values(modalities=merged))
    return row.id


def touch_study_location(
    session: Session, study_id: int, server_id: int, learned_by: str, now: datetime
) -> None:
    """Upsert study_locations: keep first_seen, move last_seen on, keep the best evidence."""
    session.execute(
        _study_location_upsert(_dialect_name(session)),
        {"study_id": study_id, "server_id": server_id, "first_seen": now, "last_seen": now, "learned_by": learned_by},
    )


@cache
def _study_location_upsert(dialect: str):
    table = StudyLocation.__table__.c
    insert = _insert_for(dialect, StudyLocation)
    new = insert.excluded

    def rank(column: ColumnElement[str]) -> ColumnElement[int]:
        return case(
            {name: i for i, name in enumerate(LEARNED_BY)}, value=column, else_=len(LEARNED_BY)
        )

    return insert.on_conflict_do_update(
        index_elements=["study_id", "server_id"],
        set_={
            "last_seen": case((new.last_seen > table.last_seen, new.last_seen), else_=table.last_seen),
            "learned_by": case(
                (rank(new.learned_by) < rank(table.learned_by), new.learned_by),
                else_=table.learned_by,
            ),
        },
    )


def record_stored(session: Session | Connection, server_name: str, items: list[StoredInstance]) -> None:
    """Upsert the hierarchy and locations for instances `server_name` acknowledged.

    `items` must be sorted by study, series and SOP instance UID: every writer then takes
    its row locks study by study in one global order, which keeps PostgreSQL deadlocks rare.
    Instances and their locations go in one executemany per study, from statements built once.
    """
    server_id = server_id_of(session, server_name)
    now = utcnow()
    dialect = _dialect_name(session)
    for _, group in groupby(items, key=lambda item: required(item.attrs, "StudyInstanceUID")):
        in_study = list(group)
        modalities = set().union(*(modality_set(i.attrs.get("Modality")) for i in in_study))
        study_id = ensure_study(session, in_study[0].attrs, modalities)
        series: dict[str, int] = {}
        instances: dict[str, dict[str, Any]] = {}  # by SOP Instance UID: a batch may hold one twice
        for item in in_study:
            series_uid = required(item.attrs, "SeriesInstanceUID")
            if series_uid not in series:
                values = {
                    "study_id": study_id,
                    "modality": text(item.attrs.get("Modality")),
                    "series_number": integer(item.attrs.get("SeriesNumber")),
                }
                key = {"series_uid": series_uid}
                series[series_uid] = get_or_create(session, Series, key, values).id
            sop_uid = required(item.attrs, "SOPInstanceUID")
            instances[sop_uid] = {
                "sop_instance_uid": sop_uid,
                "series_id": series[series_uid],
                "sop_class_uid": text(item.sop_class_uid),
                "transfer_syntax_uid": text(item.transfer_syntax_uid),
                "size_bytes": item.size,
                "sha256": item.sha256,
            }
        session.execute(_instance_upsert(dialect), list(instances.values()))
        ids = dict(session.execute(_INSTANCE_IDS, {"uids": list(instances)}).all())  # SOP UID -> id
        locations = sorted(
            (ids[uid], values["sha256"]) for uid, values in instances.items() if uid in ids
        )
        session.execute(
            _location_upsert(dialect),
            [
                {"instance_id": i, "server_id": server_id, "acknowledged_at": now, "sha256": sha}
                for i, sha in locations
            ],
        )
        touch_study_location(session, study_id, server_id, "stored", now)


_INSTANCE_IDS = select(Instance.sop_instance_uid, Instance.id).where(Instance.sop_instance_uid.in_(bindparam("uids", expanding=True)))
_REFRESHED = ("series_id", "sop_class_uid", "transfer_syntax_uid", "size_bytes", "sha256")


def _insert_for(dialect: str, model: type[Base]) -> PgInsert | SqliteInsert:
    # On the table, not the mapped class: Session.execute then runs it as a plain Core executemany.
    if dialect == "postgresql":
        return pg_insert(model.__table__)
    if dialect == "sqlite":
        return sqlite_insert(model.__table__)
    raise NotImplementedError(f"the catalog supports SQLite and PostgreSQL, not {dialect}")


@cache
def _instance_upsert(dialect: str):
    """Insert or refresh an instance (a re-store may change its content); empty values keep the old."""
    insert = _insert_for(dialect, Instance)
    table = Instance.__table__.c
    return insert.on_conflict_do_update(
        index_elements=["sop_instance_uid"],
        set_={name: func.coalesce(insert.excluded[name], table[name]) for name in _REFRESHED},
    )


@cache
def _location_upsert(dialect: str):
    insert = _insert_for(dialect, InstanceLocation)
    return insert.on_conflict_do_update(
        index_elements=["instance_id", "server_id"],
        set_={
            "acknowledged_at": insert.excluded.acknowledged_at,
            "sha256": func.coalesce(insert.excluded.sha256, InstanceLocation.__table__.c.sha256),
        },
    )


def sync_servers(session: Session, config: Config) -> ServerSync:
    """Insert new servers, update changed ones, mark the ones gone from config deleted."""
    now = utcnow()
    existing = {server.name: server for server in session.scalars(select(Server))}
    added: list[str] = []
    updated: list[str] = []
    for server in config.servers:
        fields = {name: getattr(server, name) for name in _SERVER_FIELDS}
        row = existing.get(server.name)
        if row is None:
            insert = dialect_insert(session, Server).values(
                name=server.name, updated_at=now, **fields
            )
            session.execute(insert.on_conflict_do_nothing(index_elements=["name"]))
            added.append(server.name)
        elif any(getattr(row, k) != v for k, v in fields.items()):
            for name, value in fields.items():
                setattr(row, name, value)
            row.updated_at = now
            updated.append(server.name)
    configured = {server.name for server in config.servers}
    deleted: list[str] = []
    for name, row in existing.items():
        if name not in configured and not row.deleted:
            row.deleted, row.active, row.primary, row.updated_at = True, False, False, now
            deleted.append(name)
    return ServerSync(tuple(added), tuple(updated), tuple(sorted(deleted)))
