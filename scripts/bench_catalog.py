"""`bench_store.py --catalog-instances N`: does a catalog of N instances slow stores down?

The same storescu -> router -> Orthanc run, into an empty catalog and into one pre-filled with
N instances (scripts/catalog_fill.py: their studies, series, locations, finished jobs and audit
rows), in rounds that alternate which goes first, against the same Orthanc. Prints each run, the
filled/empty throughput ratio, and how long "where is study X" takes in the filled catalog.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import bench_store
from catalog_fill import fill_catalog, random_uid
from sqlalchemy import create_engine, func, select, text

from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.direct import DirectConnections
from dicomrouter.catalog.queries import Catalog, StoredInstance, audit_values
from dicomrouter.catalog.schema import upgrade
from dicomrouter.catalog.upserts import record_stored
from dicomrouter.config import ForwardingConfig, parse_config
from dicomrouter.pacsfarm import OrthancFarm, free_ports
from dicomrouter.status import study_whereabouts
from dicomrouter.store.queue import ForwardQueue, NewJob
from dicomrouter.store.receive import delivered_copies

PRIMARY = "Bench PACS"  # the server name bench_store.write_config gives the destination
POSTGRES_ADMIN = os.environ.get(
    "BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def catalog_urls(kind: str, folder: Path) -> Iterator[tuple[str, str]]:
    """(empty catalog URL, catalog URL to fill): SQLite files, or two fresh PostgreSQL databases dropped after."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'empty.db'}", f"sqlite:///{folder / 'filled.db'}"
        return
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    names = [f"bench_catalog_{os.getpid()}_{role}" for role in ("empty", "filled")]
    try:
        with admin.connect() as connection:
            for name in names:
                connection.execute(text(f"CREATE DATABASE {name}"))
        base = POSTGRES_ADMIN.rsplit("/", 1)[0]
        yield f"{base}/{names[0]}", f"{base}/{names[1]}"
    finally:
        with admin.connect() as connection:
            for name in names:
                connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def time_where(url: str, samples: int = 300) -> dict[str, float]:
    """Milliseconds for `catalog where` (locations, instance counts, deliveries) of random studies, warm."""
    engine = make_engine(url)
    try:
        catalog = Catalog(session_factory(engine))
        with engine.connect() as connection:
            uids = list(connection.execute(text("SELECT study_uid FROM studies")).scalars())
        rng = random.Random(7)
        chosen = [rng.choice(uids) for _ in range(samples)]
        for uid in chosen[:30]:  # warm the connection pool and the statement caches
            catalog.read_plain(lambda reader, uid=uid: study_whereabouts(reader, uid))
        whereabouts, where_only = [], []
        for uid in chosen:
            started = time.perf_counter()
            found = catalog.read_plain(lambda reader, uid=uid: study_whereabouts(reader, uid))
            whereabouts.append((time.perf_counter() - started) * 1000)
            assert found.rows, f"study {uid} not found"
            started = time.perf_counter()
            catalog.where_study(uid)
            where_only.append((time.perf_counter() - started) * 1000)
    finally:
        engine.dispose()
    whereabouts.sort()
    return {
        "studies": len(uids),
        "median": statistics.median(whereabouts),
        "p95": whereabouts[int(len(whereabouts) * 0.95)],
        "max": whereabouts[-1],
        "where_study_median": statistics.median(where_only),
    }


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def catalog_path_cpu_ms(url: str, count: int = 2000, batch: int = 16) -> float:
    """CPU ms per instance (this process and its PostgreSQL backend) of the catalog's part of stores.

    What the router does in the catalog for each instance, without the network, Orthanc or the
    spool: the receive transaction (copies delivered, open jobs, the job), claims of `batch` jobs,
    the acknowledgement (hierarchy, locations, job done, spool path check) and an audit row.
    CPU time, not wall time, so that other work on the machine matters less.
    """
    postgres = "postgresql" in url
    engine = make_engine(url, pool_size=1, max_overflow=0) if postgres else make_engine(url)
    rng = random.Random(count)
    try:
        sessions = session_factory(engine)
        catalog = Catalog(sessions)
        document = {
            "router": {"ae_title": "DICOMROUTER", "port": 11112, "catalog": url, "spool": "spool"},
            "servers": [
                {
                    "name": PRIMARY,
                    "ae_title": "BENCH",
                    "host": "127.0.0.1",
                    "port": 4242,
                    "environment": "test",
                    "primary": True,
                }
            ],
        }
        catalog.sync_servers(parse_config(document, Path("bench.yaml")))
        queue = ForwardQueue(sessions, "bench", ForwardingConfig())
        direct = DirectConnections(engine)  # the receive transaction's connection, as ReceiveService's
        backends: list[int] = []  # the engine's one connection and the receive transaction's
        if postgres:
            with engine.connect() as connection:
                backends.append(connection.scalar(text("SELECT pg_backend_pid()")))
            with direct.begin() as transaction:
                [(pid,)] = transaction.execute(select(func.pg_backend_pid()), {})
                backends.append(pid)
        before = time.process_time() + sum(_cpu_s(pid) for pid in backends)
        study = series = ""
        for start in range(0, count, batch):
            items = []
            for index in range(start, min(start + batch, count)):
                study = random_uid(rng) if index % 100 == 0 else study
                series = random_uid(rng) if index % 25 == 0 else series
                sop_uid, sha256 = random_uid(rng), f"{rng.getrandbits(256):064x}"
                header = {
                    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                    "TransferSyntaxUID": "1.2.840.10008.1.2.1",
                    "StudyInstanceUID": study,
                    "SOPInstanceUID": sop_uid,
                }
                job = NewJob(
                    sop_uid,
                    f"/spool/{sop_uid}.dcm",
                    sha256,
                    526_000,
                    PRIMARY,
                    "MODALITY",
                    "DICOMROUTER",
                    header,
                )
                with direct.begin() as transaction:
                    delivered_copies(transaction, sop_uid)
                    queue.destinations_with_open_jobs(transaction, sha256, [PRIMARY])
                    queue.enqueue(transaction, [job])
                attrs = {
                    **header,
                    "SeriesInstanceUID": series,
                    "PatientID": "BENCH",
                    "Modality": "CT",
                }
                items.append(
                    StoredInstance(
                        attrs, header["SOPClassUID"], header["TransferSyntaxUID"], 526_000, sha256
                    )
                )
            items.sort(
                key=lambda i: (
                    i.attrs["StudyInstanceUID"],
                    i.attrs["SeriesInstanceUID"],
                    i.attrs["SOPInstanceUID"],
                )
            )
            jobs = queue.claim(PRIMARY, batch)

            def acknowledge(session, jobs=jobs, items=items) -> list[str]:
                record_stored(session, PRIMARY, items)
                queue.complete(session, [job.id for job in jobs])
                return queue.unreferenced_paths(session, [job.spool_path for job in jobs])

            catalog.write(acknowledge)
            catalog.add_audit_rows(
                [audit_values("store", "success", calling_ae="MODALITY", study_uid=study)]
            )
        after = time.process_time() + sum(_cpu_s(pid) for pid in backends)
        direct.close()
    finally:
        engine.dispose()
    return (after - before) / count * 1000


def compare_catalogs(args) -> None:
    """Run the comparison bench_store.py's arguments ask for, and print it."""
    size = bench_store.SIZES[args.size]
    with (
        tempfile.TemporaryDirectory(prefix="bench-catalog-") as tmp,
        catalog_urls(args.catalog, Path(tmp)) as urls,
    ):
        folder = Path(tmp)
        empty_url, filled_url = urls
        print(
            f"filling a {args.catalog} catalog with {args.catalog_instances} instances ...",
            flush=True,
        )
        started = time.monotonic()
        fill_catalog(
            filled_url,
            args.catalog_instances,
            PRIMARY,
            progress=lambda line: print(f"  {line}", flush=True),
        )
        fill_s = time.monotonic() - started
        print(f"  filled in {fill_s:.0f} s ({os.getloadavg()[0]:.1f} load)", flush=True)
        upgrade(empty_url)
        where_before = time_where(filled_url)
        path_cpu: dict[str, list[float]] = {"empty": [], "filled": []}
        for kind in ("empty", "filled", "filled", "empty", "empty", "filled"):
            path_cpu[kind].append(catalog_path_cpu_ms(empty_url if kind == "empty" else filled_url))
            print(
                f"catalog path, {kind:6s}: {path_cpu[kind][-1]:.3f} ms CPU per instance"
                f" (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
        runs = args.rounds * 2
        batches = [
            bench_store.make_instances(_mkdir(folder / f"in{i}"), args.count, size)
            for i in range(runs + 1)
        ]
        megabytes = sum(os.path.getsize(f) for f in batches[0]) / 1e6
        router_port = free_ports(1)[0]
        farm = OrthancFarm.on_free_ports(
            folder / "orthanc",
            ("test",) * 2,
            extra_peers=[("DICOMROUTER", "127.0.0.1", router_port)],
        )
        results: dict[str, list[tuple[float, float]]] = {"empty": [], "filled": []}
        with farm:
            farm.start_all()
            direct_target, target = farm[0], farm[1]
            started = time.monotonic()
            bench_store.run_storescu(
                direct_target.spec.dicom_port, direct_target.spec.ae_title, batches[-1]
            )
            direct_s = bench_store.wait_count(direct_target, args.count) - started
            held = 0
            for round_index in range(args.rounds):
                order = ("empty", "filled") if round_index % 2 == 0 else ("filled", "empty")
                for kind in order:
                    files = batches[len(results["empty"]) + len(results["filled"])]
                    url = empty_url if kind == "empty" else filled_url
                    routed_s, _, cpu_s, _, _ = bench_store.routed_run(
                        folder / f"router-{kind}-{round_index}",
                        files,
                        target,
                        router_port,
                        catalog_url=url,
                        already_held=held,
                    )
                    held += len(files)
                    results[kind].append((routed_s, cpu_s))
                    print(
                        f"round {round_index + 1} {kind:6s}: {routed_s:6.2f} s  {args.count / routed_s:6.1f} inst/s"
                        f"  router CPU {cpu_s / args.count * 1000:.2f} ms/instance"
                        f"  (load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
        where_after = time_where(filled_url)
    empty_s = statistics.median(s for s, _ in results["empty"])
    filled_s = statistics.median(s for s, _ in results["filled"])
    pairs = [e[0] / f[0] for e, f in zip(results["empty"], results["filled"], strict=True)]
    print(
        f"instances per run: {args.count} x {args.size} ({megabytes / args.count * 1000:.0f} KB each); "
        f"catalog {args.catalog}, filled with {args.catalog_instances} instances in {fill_s:.0f} s"
    )
    print(
        f"direct  storescu -> Orthanc               : {direct_s:6.2f} s  {args.count / direct_s:6.1f} inst/s"
    )
    for kind, median_s in (("empty", empty_s), ("filled", filled_s)):
        cpu = statistics.median(c for _, c in results[kind]) / args.count * 1000
        print(
            f"router, {kind:6s} catalog (median of {len(results[kind])}): {median_s:6.2f} s"
            f"  {args.count / median_s:6.1f} inst/s  router CPU {cpu:.2f} ms/instance"
        )
    print(
        f"ratio filled/empty throughput             : {empty_s / filled_s:.3f}x"
        f"  (per round: {', '.join(f'{p:.3f}' for p in pairs)})"
    )
    empty_cpu, filled_cpu = min(path_cpu["empty"]), min(path_cpu["filled"])
    print(
        f"catalog path CPU per instance (best of 3): empty {empty_cpu:.3f} ms, filled {filled_cpu:.3f} ms,"
        f" ratio empty/filled {empty_cpu / filled_cpu:.3f}x"
    )
    for label, where in (("before the runs", where_before), ("after the runs", where_after)):
        print(
            f"catalog where ({where['studies']} studies, {label}): median {where['median']:.2f} ms,"
            f" p95 {where['p95']:.2f} ms, max {where['max']:.2f} ms"
            f" (where_study alone: median {where['where_study_median']:.2f} ms)"
        )
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
