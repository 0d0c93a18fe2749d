#!/usr/bin/env python3
"""Federated C-FIND benchmark: four Orthancs with overlapping studies and one slow peer, queried
directly with DCMTK findscu, then through the router; prints latencies, ratios and the issue's bars.

    .venv/bin/python scripts/bench_find.py [--studies 200] [--shared 50] [--slow-delay 0.3] [--runs 7]

Everything runs on free ports in a temporary folder and is stopped at the end. Bars (issue 4):
router latency <= 1.25 x slowest direct + 30 ms; first answer <= fastest direct + 30 ms; with
one server hung, the answer within its timeout + 10 %. Issue 10: router latency <= slowest direct
+ 10 ms.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from ruamel.yaml import YAML  # noqa: E402

from dicomrouter.pacsfarm import free_ports, start_free_farm  # noqa: E402
from tests.support.find_peers import SilentPeer, SlowFindPeer, server_entry  # noqa: E402
from tests.support.orthanc_fixtures import instance_bytes, make_test_instance, write_router_config  # noqa: E402
from tests.support.router_process import wait_for_port  # noqa: E402

ROUTER_AE = "DICOMROUTER"
WORKSTATION_AE = "WORKSTATION"
FINDSCU = "/usr/bin/findscu"  # DCMTK's, not pynetdicom's console script
QUERY_KEYS = ("QueryRetrieveLevel=STUDY", "PatientID", "PatientName", "StudyDate", "StudyInstanceUID",
              "NumberOfStudyRelatedInstances")


# --------------------------------------------------------------------------- measuring


def timed_findscu(port: int, called_ae: str) -> tuple[float, float | None, int]:
    """(total seconds, seconds to the first answer or None, answers) for one findscu run."""
    args = [FINDSCU, "-v", "-S", "-aet", WORKSTATION_AE, "-aec", called_ae]
    for key in QUERY_KEYS:
        args += ["-k", key]
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*args, "127.0.0.1", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    first, answers = None, 0
    assert proc.stdout is not None
    for line in proc.stdout:
        if b"(Pending)" in line:
            answers += 1
            if first is None:
                first = time.perf_counter() - started
    proc.wait()
    return time.perf_counter() - started, first, answers


def measure(port: int, called_ae: str, runs: int) -> dict[str, float | int | None]:
    """Median total and first-answer times over `runs` (after one warm-up run)."""
    timed_findscu(port, called_ae)
    results = [timed_findscu(port, called_ae) for _ in range(runs)]
    firsts = [r[1] for r in results if r[1] is not None]
    return {
        "total": statistics.median(r[0] for r in results),
        "first": statistics.median(firsts) if firsts else None,
        "answers": results[-1][2],
    }


# --------------------------------------------------------------------------- setup


def study_instance(study_uid: str, index: int) -> bytes:
    ds = make_test_instance(
        study_uid=study_uid,
        patient_id=f"BENCH{index % 97:03d}",
        patient_name=f"Bench^Patient{index % 97}",
        study_date=f"2024{1 + index % 12:02d}{1 + index % 28:02d}",
        rows=8,
        cols=8,
    )
    return instance_bytes(ds)


def populate(farm, studies: int, shared: int) -> list[str]:
    """`studies` per server, of which `shared` are the same on every server; returns the shared UIDs."""
    shared_uids = [generate_uid() for _ in range(shared)]
    shared_files = [study_instance(uid, i) for i, uid in enumerate(shared_uids)]

    def fill(server) -> None:
        for data in shared_files:
            server.upload(data)
        for i in range(studies - shared):
            server.upload(study_instance(generate_uid(), shared + i))

    with ThreadPoolExecutor(len(farm)) as pool:
        list(pool.map(fill, farm))
    return shared_uids


def slow_answers(shared_uids: list[str], count: int = 20) -> list[Dataset]:
    answers = []
    for i in range(count):
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = shared_uids[i] if i < min(10, len(shared_uids)) else generate_uid()
        ds.PatientID = f"SLOW{i:03d}"
        ds.PatientName = f"Slow^Patient{i}"
        ds.StudyDate = "20240101"
        answers.append(ds)
    return answers


def write_config(path: Path, farm, router_port: int, extra_servers: list[dict], timeout: float) -> Path:
    write_router_config(path, farm, router_port, free_ports(1)[0], catalog="sqlite:///catalog.db")
    yaml = YAML(typ="rt")
    document = yaml.load(path.read_text())
    document["router"]["host"] = "127.0.0.1"
    document["router"]["find_timeout"] = timeout
    document["servers"].extend(extra_servers)
    with open(path, "w") as handle:
        yaml.dump(document, handle)
    subprocess.run([sys.executable, "-m", "dicomrouter", "--config", str(path), "db", "upgrade"],
                   check=True, capture_output=True)
    return path


class Router:
    """The router in its own process (as in production), with the find bindings."""

    def __init__(self, config: Path, port: int):
        self.port = port
        self.log = config.with_suffix(".log")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(config), str(port)],
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        wait_for_port(port, timeout=30)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def serve(config_path: str, port: int) -> None:
    """Child mode: the router as `build_app` wires it."""
    from dicomrouter.app import build_app
    from dicomrouter.config import load_config
    from dicomrouter.logging import configure_logging

    configure_logging("json", "warning")
    app = build_app(load_config(config_path), host="127.0.0.1", port=port, watch_file=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    app.start()
    stop.wait()
    app.stop(drain_timeout_s=2)


# --------------------------------------------------------------------------- report


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:7.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=200, help="studies per Orthanc")
    parser.add_argument("--shared", type=int, default=50, help="studies on every Orthanc")
    parser.add_argument("--slow-delay", type=float, default=0.3, help="seconds the slow peer waits")
    parser.add_argument("--timeout", type=float, default=2.0, help="router.find_timeout for the hung-server run")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--serve", nargs=2, metavar=("CONFIG", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-find-") as folder:
        base = Path(folder)
        router_port, dead_router_port = free_ports(2)
        print(f"starting four Orthancs and populating {args.studies} studies each ({args.shared} shared) ...")
        farm = start_free_farm(base / "farm", extra_peers=[(ROUTER_AE, "127.0.0.1", router_port)])
        slow = hung = None
        routers: list[Router] = []
        try:
            started = time.perf_counter()
            shared = populate(farm, args.studies, args.shared)
            print(f"populated in {time.perf_counter() - started:.1f} s")
            slow = SlowFindPeer("SLOW_PACS", slow_answers(shared), delay_s=args.slow_delay).start()
            hung = SilentPeer().start()
            slow_entry = server_entry("Slow PACS", "SLOW_PACS", slow.port)
            hung_entry = server_entry("Hung PACS", "HUNG_PACS", hung.port)
            normal = write_config(base / "normal.yaml", farm, router_port, [slow_entry], args.timeout)
            with_hung = write_config(base / "hung.yaml", farm, dead_router_port, [slow_entry, hung_entry], args.timeout)
            routers = [Router(normal, router_port), Router(with_hung, dead_router_port)]

            print(f"\n{'target':<22} {'answers':>7} {'total ms':>9} {'first ms':>9}")
            direct = {}
            for server in farm:
                direct[server.spec.name] = measure(server.spec.dicom_port, server.spec.ae_title, args.runs)
            direct["Slow PACS (pynetdicom)"] = measure(slow.port, "SLOW_PACS", args.runs)
            for name, m in direct.items():
                print(f"{name:<22} {m['answers']:>7} {ms(m['total']):>9} {ms(m['first']):>9}")
            via_router = measure(router_port, ROUTER_AE, args.runs)
            print(f"{'router (5 servers)':<22} {via_router['answers']:>7} {ms(via_router['total']):>9} {ms(via_router['first']):>9}")
            hung_runs = max(2, args.runs // 3)
            with_dead = measure(dead_router_port, ROUTER_AE, hung_runs)
            print(f"{'router + hung server':<22} {with_dead['answers']:>7} {ms(with_dead['total']):>9} {ms(with_dead['first']):>9}")

            slowest = max(m["total"] for m in direct.values())
            fastest = min(m["total"] for m in direct.values())
            expected = args.studies * len(farm) - args.shared * (len(farm) - 1) + 10
            latency_bar = 1.25 * slowest + 0.030
            first_bar = fastest + 0.030
            hung_bar = args.timeout * 1.10
            print("")
            print(f"distinct studies expected {expected}, router answered {via_router['answers']}: "
                  f"{verdict(via_router['answers'] == expected)}")
            print(f"router / slowest direct = {via_router['total'] / slowest:.2f} "
                  f"({ms(via_router['total']).strip()} ms vs {ms(slowest).strip()} ms; "
                  f"bar {ms(latency_bar).strip()} ms): {verdict(via_router['total'] <= latency_bar)}")
            network_bar = slowest + 0.010  # issue 10: the router's own cost on top of the slowest server
            print(f"router - slowest direct = {ms(via_router['total'] - slowest).strip()} ms "
                  f"(issue 10 bar: at most 10 ms over the slowest, {ms(network_bar).strip()} ms): "
                  f"{verdict(via_router['total'] <= network_bar)}")
            print(f"router first answer {ms(via_router['first']).strip()} ms vs fastest direct query "
                  f"{ms(fastest).strip()} ms (bar {ms(first_bar).strip()} ms): "
                  f"{verdict(via_router['first'] is not None and via_router['first'] <= first_bar)}")
            print(f"with one server hung: {ms(with_dead['total']).strip()} ms, timeout {args.timeout:g} s "
                  f"(bar {ms(hung_bar).strip()} ms): {verdict(with_dead['total'] <= hung_bar)}")
        finally:
            for router in routers:
                router.stop()
            for peer in (slow, hung):
                if peer is not None:
                    peer.stop()
            farm.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
