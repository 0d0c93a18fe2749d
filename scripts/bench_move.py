#!/usr/bin/env python3
"""C-MOVE benchmark: DCMTK movescu straight to Orthanc, against movescu through the router on the
direct route (Orthanc stores to the workstation) and on the relay route (the router C-GETs from
Orthanc and C-STOREs each instance on).

One study of `--count` instances of about 512 KiB on one Orthanc; DCMTK storescp is the
workstation. Everything (Orthanc, `python3 -m dicomrouter serve`, storescp) runs on free ports in a
temporary folder on this machine and is stopped at the end. Bars (issue 5): direct route within
1.2x of movescu straight to Orthanc; relay within 3x.

    .venv/bin/python scripts/bench_move.py [--count 200] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_store import make_instances, run_storescu  # noqa: E402

from dicomrouter.pacsfarm import OrthancFarm, free_ports  # noqa: E402
from tests.support.router_process import RouterProcess, dcmtk, dcmtk_env, wait_for_port  # noqa: E402

ROUTER_AE = "DICOMROUTER"
WORKSTATION_AE = "WORKSTATION"  # the source's move_routing knows it: direct route
RELAY_AE = "RELAYWS"  # the same storescp under an AE the source does not know: relay route
DIRECT_BAR, RELAY_BAR = 1.2, 3.0


def write_config(folder: Path, router_port: int, orthanc, workstation_port: int) -> Path:
    text = f"""router:
  ae_title: {ROUTER_AE}
  host: 127.0.0.1
  port: {router_port}
  catalog: sqlite:///var/catalog.db
  spool: var/spool
servers:
  - name: Bench PACS
    ae_title: {orthanc.spec.ae_title}
    host: 127.0.0.1
    port: {orthanc.spec.dicom_port}
    environment: test
    active: true
    primary: true
    move_routing:
      {WORKSTATION_AE}: {WORKSTATION_AE}
      {ROUTER_AE}: {ROUTER_AE}
clients:
  - ae_title: {WORKSTATION_AE}
    host: 127.0.0.1
    port: {workstation_port}
    roles: [test_read, test_write]
    move_destinations: [{WORKSTATION_AE}, {RELAY_AE}]
  - ae_title: {RELAY_AE}
    host: 127.0.0.1
    port: {workstation_port}
    roles: [test_read]
"""
    path = folder / "bench-move.yaml"
    path.write_text(text)
    subprocess.run([sys.executable, "-m", "dicomrouter", "--config", str(path), "db", "upgrade"],
                   check=True, capture_output=True)
    return path


def run_movescu(port: int, called_ae: str, destination: str, study_uid: str) -> tuple[float, str]:
    """(seconds until the final C-MOVE response, movescu's output)."""
    args = [dcmtk("movescu"), "-v", "-aet", WORKSTATION_AE, "-aec", called_ae, "-aem", destination, "-S",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port)]
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, errors="replace", env=dcmtk_env(), timeout=600)
    elapsed = time.perf_counter() - started
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"movescu to {called_ae} -> {destination} failed:\n{output[-2000:]}")
    return elapsed, output


def check_received(folder: Path, count: int, label: str, output: str) -> None:
    received = sum(1 for path in folder.iterdir() if path.is_file())
    if received != count:
        raise SystemExit(f"{label}: the workstation holds {received} of {count} instances\n{output[-2000:]}")


class Workstation:
    """DCMTK storescp writing to `folder` (the destination of every move)."""

    def __init__(self, port: int, folder: Path):
        self.port, self.folder = port, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [dcmtk("storescp"), "-aet", WORKSTATION_AE, "-od", str(folder), str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env(),
        )
        wait_for_port(port, timeout=10)

    def empty(self) -> None:
        for path in self.folder.iterdir():
            path.unlink()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="instances in the study")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per route (median), after one warm-up")
    args = parser.parse_args()
    os.environ["TCP_NODELAY"] = "1"
    routes = [
        ("movescu -> Orthanc (direct)", "orthanc", WORKSTATION_AE),
        ("movescu -> router, direct route", "router", WORKSTATION_AE),
        ("movescu -> router, relay route", "router", RELAY_AE),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-move-") as tmp:
        folder = Path(tmp)
        (folder / "in").mkdir()
        files = make_instances(folder / "in", args.count, 512)
        megabytes = sum(os.path.getsize(f) for f in files) / 1e6
        router_port, workstation_port = free_ports(2)
        farm = OrthancFarm.on_free_ports(
            folder / "orthanc", ("test",),
            extra_peers=[(ROUTER_AE, "127.0.0.1", router_port), (WORKSTATION_AE, "127.0.0.1", workstation_port)],
        )
        router = workstation = None
        times: dict[str, list[float]] = {label: [] for label, _, _ in routes}
        try:
            farm.start_all()
            orthanc = farm[0]
            run_storescu(orthanc.spec.dicom_port, orthanc.spec.ae_title, files)
            orthanc.wait_for_instance_count(len(files), timeout=120)
            shutil.rmtree(folder / "in")
            study_uid = orthanc.study_uids()[0]
            workstation = Workstation(workstation_port, folder / "workstation")
            router = RouterProcess(write_config(folder, router_port, orthanc, workstation_port), router_port)
            router.start()
            targets = {"orthanc": (orthanc.spec.dicom_port, orthanc.spec.ae_title), "router": (router_port, ROUTER_AE)}
            for run in range(args.runs + 1):  # run 0 warms up (router catalog, Orthanc cache)
                for label, target, destination in routes:
                    workstation.empty()
                    port, called_ae = targets[target]
                    elapsed, output = run_movescu(port, called_ae, destination, study_uid)
                    check_received(workstation.folder, len(files), label, output)
                    if run:
                        times[label].append(elapsed)
                        print(f"run {run}  {label:<34} {elapsed:6.2f} s", flush=True)
        finally:
            if router is not None:
                router.stop()
            if workstation is not None:
                workstation.stop()
            farm.stop_all()
    baseline = statistics.median(times[routes[0][0]])
    print(f"\nstudy: {len(files)} instances, {megabytes:.0f} MB ({megabytes / len(files) * 1000:.0f} KB each); "
          f"median of {args.runs} runs")
    for (label, _, _), bar in zip(routes, (None, DIRECT_BAR, RELAY_BAR), strict=True):
        median = statistics.median(times[label])
        ratio = median / baseline
        verdict = "" if bar is None else f"  bar {bar:.1f}x: {'PASS' if ratio <= bar else 'FAIL'}"
        print(f"{label:<34} {median:6.2f} s  {len(files) / median:7.1f} inst/s  {megabytes / median:6.1f} MB/s"
              f"  {ratio:5.2f}x{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
