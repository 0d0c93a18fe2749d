"""Idempotent, concurrency-safe writes behind Catalog: INSERT .. ON CONFLICT on both databases.

The hierarchy's writes run on `Statements` (catalog/statements.py): in a Session, or on the ack
writer's DB-API connections (catalog/direct.py); their Core statements are built once each.
"""

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
from dicomrouter.catalog.statements import Statements, statements_of
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


def server_id_of(statements: Statements, name: str) -> int:
    """The servers key for `name`; UnknownServer when it was never synced."""
    rows = statements.execute(_SERVER_ID, {"name": name})
    if not rows:
        raise UnknownServer(f"server {name!r} is not in the catalog; sync_servers(config) first")
    return rows[0][0]


_SERVER_ID = select(Server.__table__.c.id).where(Server.__table__.c.name == bindparam("name"))


def _dialect_name(session: Session | Connection) -> str:
    if isinstance(session, Connection):
        return session.dialect.name
    return session.get_bind().dialect.name


def get_or_create(
    statements: Statements, model: type[Base], key: dict[str, Any], values: dict[str, Any]
) -> tuple[Any, ...]:
    """The row for the unique `key` (created from `values` if missing), empty columns filled.

    Returns the row as read before filling: its id, then the columns of `values` in their order.
    Concurrent creators are safe: the loser's INSERT does nothing and its SELECT sees the
    winner's row; filling uses COALESCE, so the first non-empty value stays.
    """
    query, insert = _get_or_create_statements(statements.dialect, model, tuple(key), tuple(values))
    rows = statements.execute(query, key)
    if not rows:
        statements.execute(insert, {**key, **values})
        rows = statements.execute(query, key)
    row = rows[0]
    missing = tuple(
        name
        for (name, value), current in zip(values.items(), row[1:], strict=True)
        if value is not None and current is None
    )
    if missing:
        fill = {f"fill_{name}": values[name] for name in missing}
        statements.execute(_fill_statement(model, missing), {"row_id": row[0], **fill})
    return row


@cache
def _get_or_create_statements(
    dialect: str, model: type[Base], key: tuple[str, ...], values: tuple[str, ...]
):
    """get_or_create's SELECT and INSERT for one shape of key and values, built once."""
    table = model.__table__.c  # Core columns: the statements skip the ORM's bulk-insert machinery
    condition = (table[k] == bindparam(k) for k in key)
    query = select(table.id, *(table[name] for name in values)).where(*condition)
    insert = _insert_for(dialect, model, (*key, *values))
    return query, insert.on_conflict_do_nothing(index_elements=list(key))


@cache
def _fill_statement(model: type[Base], names: tuple[str, ...]):
    """get_or_create's UPDATE of the empty columns `names`: COALESCE keeps a value another writer put first."""
    table = model.__table__.c
    fill = {name: func.coalesce(table[name], bindparam(f"fill_{name}", type_=table[name].type)) for name in names}
    return update(model.__table__).where(table.id == bindparam("row_id")).values(fill)


def ensure_patient(statements: Statements, attrs: Mapping[str, Any]) -> int | None:
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
    return get_or_create(statements, Patient, key, values)[0]


def ensure_study(statements: Statements, attrs: Mapping[str, Any], modalities: set[str]) -> int:
    """The studies key for attrs' StudyInstanceUID; fills empty fields, merges modalities."""
    values = {
        "patient_id": ensure_patient(statements, attrs),
        "study_date": dicom_date(attrs.get("StudyDate")),
        "accession_number": text(attrs.get("AccessionNumber")),
        "description": text(attrs.get("StudyDescription")),
        "modalities": join_modalities(modalities),
    }
    key = {"study_uid": required(attrs, "StudyInstanceUID")}
    row = get_or_create(statements, Study, key, values)
    study_id, known = row[0], row[1 + list(values).index("modalities")]
    if not modalities <= modality_set(known):
        # Read-merge-write under a row lock (PostgreSQL) so concurrent merges add up.
        ((current,),) = statements.execute(_STUDY_MODALITIES_LOCKED, {"study_id": study_id})
        merged = join_modalities(modality_set(current) | modalities)
        if merged != current:
            statements.execute(_SET_STUDY_MODALITIES, {"study_id": study_id, "merged": merged})
    return study_id


_studies = Study.__table__.c
_STUDY_MODALITIES_LOCKED = (
    select(_studies.modalities).where(_studies.id == bindparam("study_id")).with_for_update(key_share=True)
)
_SET_STUDY_MODALITIES = (
    update(Study.__table__).where(_studies.id == bindparam("study_id")).values(modalities=bindparam("merged"))
)


def touch_study_location(
    statements: Statements, study_id: int, server_id: int, learned_by: str, now: datetime
) -> None:
    """Upsert study_locations: keep first_seen, move last_seen on, keep the best evidence."""
    statements.execute(
        _study_location_upsert(statements.dialect),
        {"study_id": study_id, "server_id": server_id, "first_seen": now, "last_seen": now, "learned_by": learned_by},
    )


@cache
def _study_location_upsert(dialect: str):
    table = StudyLocation.__table__.c
    insert = _insert_for(dialect, StudyLocation, ("study_id", "server_id", "first_seen", "last_seen", "learned_by"))
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


def record_stored(
    bind: Session | Connection | Statements, server_name: str, items: list[StoredInstance]
) -> None:
    """Upsert the hierarchy and locations for instances `server_name` acknowledged.

    `items` must be sorted by study, series and SOP instance UID: every writer then takes
    its row locks study by study in one global order, which keeps PostgreSQL deadlocks rare.
    Instances and their locations go in one executemany per study, from statements built once.
    """
    statements = statements_of(bind)
    server_id = server_id_of(statements, server_name)
    now = utcnow()
    dialect = statements.dialect
    for _, group in groupby(items, key=lambda item: required(item.attrs, "StudyInstanceUID")):
        in_study = list(group)
        modalities = set().union(*(modality_set(i.attrs.get("Modality")) for i in in_study))
        study_id = ensure_study(statements, in_study[0].attrs, modalities)
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
                series[series_uid] = get_or_create(statements, Series, key, values)[0]
            sop_uid = required(item.attrs, "SOPInstanceUID")
            instances[sop_uid] = {
                "sop_instance_uid": sop_uid,
                "series_id": series[series_uid],
                "sop_class_uid": text(item.sop_class_uid),
                "transfer_syntax_uid": text(item.transfer_syntax_uid),
                "size_bytes": item.size,
                "sha256": item.sha256,
            }
        statements.execute_many(_instance_upsert(dialect), list(instances.values()))
        ids = dict(statements.execute(_INSTANCE_IDS, {"uids": list(instances)}))  # SOP UID -> id
        locations = sorted(
            (ids[uid], values["sha256"]) for uid, values in instances.items() if uid in ids
        )
        statements.execute_many(
            _location_upsert(dialect),
            [
                {"instance_id": i, "server_id": server_id, "acknowledged_at": now, "sha256": sha}
                for i, sha in locations
            ],
        )
        touch_study_location(statements, study_id, server_id, "stored", now)


_INSTANCE_IDS = select(Instance.sop_instance_uid, Instance.id).where(Instance.sop_instance_uid.in_(bindparam("uids", expanding=True)))
_REFRESHED = ("series_id", "sop_class_uid", "transfer_syntax_uid", "size_bytes", "sha256")


def _insert_for(dialect: str, model: type[Base], columns: tuple[str, ...] = ()) -> PgInsert | SqliteInsert:
    # On the table, not the mapped class: Session.execute then runs it as a plain Core executemany.
    if dialect == "postgresql":
        insert = pg_insert(model.__table__)
    elif dialect == "sqlite":
        insert = sqlite_insert(model.__table__)
    else:
        raise NotImplementedError(f"the catalog supports SQLite and PostgreSQL, not {dialect}")
    # Columns named, not taken from each execution's parameters: the direct path compiles it once.
    return insert.values({name: bindparam(name) for name in columns}) if columns else insert


@cache
def _instance_upsert(dialect: str):
    """Insert or refresh an instance (a re-store may change its content); empty values keep the old."""
    insert = _insert_for(dialect, Instance, ("sop_instance_uid", *_REFRESHED))
    table = Instance.__table__.c
    return insert.on_conflict_do_update(
        index_elements=["sop_instance_uid"],
        set_={name: func.coalesce(insert.excluded[name], table[name]) for name in _REFRESHED},
    )


@cache
def _location_upsert(dialect: str):
    insert = _insert_for(dialect, InstanceLocation, ("instance_id", "server_id", "acknowledged_at", "sha256"))
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
