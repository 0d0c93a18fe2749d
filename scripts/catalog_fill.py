#!/usr/bin/env python3
"""Fill a catalog with the history of a busy site, fast, for benchmarks at scale.

The shape: `instances` instances in studies of ~100 (4 series of ~25), patients with two
studies each, every instance on the primary server and half of them on a second one, one
delivered (done) forward job per instance, one audit row per store association (a series) and
some C-FINDs. UIDs are random, like real ones, so the unique indexes grow as they would; rows
of one study are neighbours, as they are when a modality sends a study at once.
Rows go in through the DBAPI: executemany on SQLite, COPY on PostgreSQL (minutes -> seconds).

    .venv/bin/python scripts/catalog_fill.py sqlite:///var/catalog.db 1000000 "Bench PACS"
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, func, select  # noqa: E402

from dicomrouter.catalog.db import make_engine  # noqa: E402
from dicomrouter.catalog.models import Base  # noqa: E402
from dicomrouter.catalog.schema import upgrade  # noqa: E402
from dicomrouter.catalog.writes import AUDIT_COLUMNS, audit_values  # noqa: E402

INSTANCES_PER_SERIES = 25
SERIES_PER_STUDY = 4
STUDIES_PER_PATIENT = 2
CHUNK = 20_000
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def random_uid(rng: random.Random) -> str:
    """A UID of a realistic length (~55 characters) under a made-up root."""
    return f"1.2.826.0.1.3680043.10.999.{rng.getrandbits(100)}.{rng.getrandbits(20)}"


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):  # as SQLAlchemy stores UTCDateTime on SQLite: naive UTC text
        return (
            value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        )
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, bool):
        return int(value)
    return value


def _write(engine: Engine, table: str, columns: tuple[str, ...], rows: Iterator[tuple]) -> int:
    """Bulk-load rows into one table; returns how many."""
    count = 0
    quoted = [f'"{column}"' for column in columns]  # "primary" is a keyword
    connection = engine.raw_connection()
    try:
        driver = connection.driver_connection
        if engine.dialect.name == "postgresql":
            with (
                driver.cursor() as cursor,
                cursor.copy(f"COPY {table} ({', '.join(quoted)}) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(tuple(json.dumps(v) if isinstance(v, dict) else v for v in row))
                    count += 1
        else:
            sql = f"INSERT INTO {table} ({', '.join(quoted)}) VALUES ({', '.join('?' * len(columns))})"
            cursor = driver.cursor()
            driver.execute("BEGIN")
            batch: list[tuple] = []
            for row in rows:
                batch.append(tuple(_sqlite_value(v) for v in row))
                if len(batch) >= CHUNK:
                    cursor.executemany(sql, batch)
                    count += len(batch)
                    batch.clear()
            cursor.executemany(sql, batch)
            count += len(batch)
        driver.commit()
    finally:
        connection.close()
    return count


def fill_catalog(
    url: str,
    instances: int,
    primary: str,
    other_servers: tuple[str, ...] = ("Old PACS", "Archive"),
    seed: int = 1,
    progress: Callable[[str], None] = lambda _line: None,
) -> dict[str, int]:
    """Fill an upgraded (empty or not) catalog; returns rows written per table."""
    rng = random.Random(seed)
    engine = make_engine(url)
    upgrade(engine)
    tables = Base.metadata.tables
    now = datetime.now(UTC)
    written: dict[str, int] = {}
    try:
        with engine.connect() as connection:
            first = {
                name: (connection.scalar(select(func.max(tables[name].c.id))) or 0) + 1
                for name in (
                    "servers",
                    "patients",
                    "studies",
                    "series",
                    "instances",
                    "instance_locations",
                    "study_locations",
                    "forward_jobs",
                    "audit_events",
                )
            }
            known = dict(
                connection.execute(select(tables["servers"].c.name, tables["servers"].c.id)).all()
            )

        def timed(table: str, columns: tuple[str, ...], rows: Iterator[tuple]) -> None:
            started = time.monotonic()
            written[table] = _write(engine, table, columns, rows)
            progress(f"{table}: {written[table]} rows in {time.monotonic() - started:.1f} s")

        names = (primary, *other_servers)
        new_servers = [n for n in names if n not in known]
        server_ids = dict(known)
        for offset, name in enumerate(new_servers):
            server_ids[name] = first["servers"] + offset
        timed(
            "servers",
            (
                "id",
                "name",
                "ae_title",
                "host",
                "port",
                "environment",
                "active",
                "primary",
                "deleted",
                "updated_at",
            ),
            (
                (
                    server_ids[name],
                    name,
                    f"AE{server_ids[name]}",
                    "127.0.0.1",
                    1,
                    "test",
                    False,
                    False,
                    True,
                    now,
                )
                for name in new_servers
            ),
        )
        series_count = max(1, instances // INSTANCES_PER_SERIES)
        study_count = max(1, series_count // SERIES_PER_STUDY)
        patient_count = max(1, study_count // STUDIES_PER_PATIENT)
        study_uids = [random_uid(rng) for _ in range(study_count)]
        timed(
            "patients",
            ("id", "patient_id", "issuer_of_patient_id", "patient_name", "birth_date"),
            (
                (first["patients"] + i, f"PID{rng.getrandbits(40)}", "", f"Doe^Patient{i}", None)
                for i in range(patient_count)
            ),
        )
        timed(
            "studies",
            (
                "id",
                "study_uid",
                "patient_id",
                "study_date",
                "accession_number",
                "description",
                "modalities",
            ),
            (
                (
                    first["studies"] + i,
                    uid,
                    first["patients"] + i % patient_count,
                    (now - timedelta(days=i % 3000)).date(),
                    f"ACC{i:08d}",
                    "CT CHEST",
                    "CT",
                )
                for i, uid in enumerate(study_uids)
            ),
        )
        timed(
            "series",
            ("id", "series_uid", "study_id", "modality", "series_number"),
            (
                (
                    first["series"] + i,
                    random_uid(rng),
                    first["studies"] + min(i // SERIES_PER_STUDY, study_count - 1),
                    "CT",
                    i % SERIES_PER_STUDY + 1,
                )
                for i in range(series_count)
            ),
        )
        sha = [
            f"{rng.getrandbits(256):064x}" for _ in range(1024)
        ]  # reused digests: content is not the point
        timed(
            "instances",
            (
                "id",
                "sop_instance_uid",
                "series_id",
                "sop_class_uid",
                "transfer_syntax_uid",
                "size_bytes",
                "sha256",
            ),
            (
                (
                    first["instances"] + i,
                    random_uid(rng),
                    first["series"] + min(i // INSTANCES_PER_SERIES, series_count - 1),
                    CT_IMAGE,
                    EXPLICIT_LE,
                    526_000,
                    sha[i % 1024],
                )
                for i in range(instances)
            ),
        )
        second = [server_ids[name] for name in other_servers] or [server_ids[primary]]

        def instance_locations() -> Iterator[tuple]:
            location_id = first["instance_locations"]
            for i in range(instances):
                yield (
                    location_id,
                    first["instances"] + i,
                    server_ids[primary],
                    now - timedelta(seconds=i % 500_000),
                    None,
                )
                location_id += 1
                if i % 2 and second[0] != server_ids[primary]:
                    yield (location_id, first["instances"] + i, second[i % len(second)], now, None)
                    location_id += 1

        timed(
            "instance_locations",
            ("id", "instance_id", "server_id", "acknowledged_at", "sha256"),
            instance_locations(),
        )

        def study_locations() -> Iterator[tuple]:
            location_id = first["study_locations"]
            for i in range(study_count):
                study_id = first["studies"] + i
                for server_id in {server_ids[primary], second[i % len(second)]}:
                    yield (location_id, study_id, server_id, now - timedelta(days=1), now, "stored")
                    location_id += 1

        timed(
            "study_locations",
            ("id", "study_id", "server_id", "first_seen", "last_seen", "learned_by"),
            study_locations(),
        )

        def done_jobs() -> Iterator[tuple]:
            # Spread over the last 6 days: within the default keep_done (7 d), as a busy site holds them.
            span_s = 6 * 86400
            for i in range(instances):
                series = min(i // INSTANCES_PER_SERIES, series_count - 1)
                at = now - timedelta(seconds=span_s - span_s * i // instances)
                study_uid = study_uids[min(series // SERIES_PER_STUDY, study_count - 1)]
                header = {
                    "SOPClassUID": CT_IMAGE,
                    "TransferSyntaxUID": EXPLICIT_LE,
                    "StudyInstanceUID": study_uid,
                    "Modality": "CT",
                }
                yield (
                    first["forward_jobs"] + i,
                    f"1.2.826.0.1.3680043.10.999.job{i}",
                    f"/var/spool/{i % 256:02x}/{i}.dcm",
                    sha[i % 1024],
                    526_000,
                    primary,
                    "done",
                    1,
                    at,
                    None,
                    None,
                    None,
                    None,
                    at,
                    at,
                    "MODALITY",
                    "DICOMROUTER",
                    header,
                    study_uid,
                )

        timed(
            "forward_jobs",
            (
                "id",
                "sop_instance_uid",
                "spool_path",
                "sha256",
                "size_bytes",
                "destination",
                "state",
                "attempts",
                "next_attempt_at",
                "claimed_by",
                "lease_until",
                "last_error",
                "last_status",
                "created_at",
                "updated_at",
                "calling_ae",
                "called_ae",
                "header",
                "study_uid",
            ),
            done_jobs(),
        )

        def audit_rows() -> Iterator[tuple]:
            # One row per store association (a series) and one C-FIND per study; as the router writes them.
            rows = series_count + study_count
            for i in range(rows):
                at = now - timedelta(seconds=6 * 86400 * (rows - i) // rows)
                if i < series_count:
                    values = audit_values(
                        "store",
                        "success",
                        calling_ae="MODALITY",
                        called_ae="DICOMROUTER",
                        address="10.0.0.5",
                        node="bench",
                        servers=primary,
                        study_uid=study_uids[min(i // SERIES_PER_STUDY, study_count - 1)],
                        counts={"success": INSTANCES_PER_SERIES},
                        at=at,
                    )
                else:
                    values = audit_values(
                        "find",
                        "success",
                        calling_ae="WORKSTATION",
                        called_ae="DICOMROUTER",
                        address="10.0.0.9",
                        node="bench",
                        servers=names,
                        detail="STUDY",
                        counts={"answers": 1},
                        at=at,
                    )
                yield (first["audit_events"] + i, *(values[column] for column in AUDIT_COLUMNS))

        timed("audit_events", ("id", *AUDIT_COLUMNS), audit_rows())
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                for table in first:  # COPY with explicit ids leaves the sequences behind
                    connection.exec_driver_sql(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"
                    )
                # What autovacuum and the checkpointer would do soon after a bulk load: done now, so
                # that the benchmark measures a catalog at rest, not their catching up.
                connection.exec_driver_sql("VACUUM (ANALYZE)")
                connection.exec_driver_sql("CHECKPOINT")
        else:  # no ANALYZE: a router never runs one, its queries must be good without statistics
            connection = engine.raw_connection()  # outside a transaction, as a checkpoint must be
            try:  # a running router's WAL is small: fold the fill's in
                connection.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                connection.close()
    finally:
        engine.dispose()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the catalog database URL (upgraded first)")
    parser.add_argument("instances", type=int)
    parser.add_argument("primary", help="the server name that holds every instance (the config's)")
    args = parser.parse_args()
    started = time.monotonic()
    fill_catalog(args.url, args.instances, args.primary, progress=print)
    print(f"filled in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
