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
from catalog_fill import fill_catalog
from sqlalchemy import create_engine, text

from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.queries import Catalog
from dicomrouter.catalog.schema import upgrade
from dicomrouter.pacsfarm import OrthancFarm, free_ports
from dicomrouter.status import study_whereabouts

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
            study_whereabouts(catalog, uid)
        whereabouts, where_only = [], []
        for uid in chosen:
            started = time.perf_counter()
            found = study_whereabouts(catalog, uid)
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
