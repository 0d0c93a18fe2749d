#!/usr/bin/env python3
"""Store throughput: DCMTK storescu -> Orthanc directly, against storescu -> router -> Orthanc.

Starts its own Orthanc servers and router on free ports, in one run, on this machine, and prints
instances/s, MB/s, the router/direct ratio, and the router's CPU per instance and peak RSS, both
over all its processes (the supervisor and every worker).

    .venv/bin/python scripts/bench_store.py --count 500 --size large
    .venv/bin/python scripts/bench_store.py --senders 4 --count 300   # four modalities at once, 75 each

With --catalog-instances N it compares the router storing into an empty catalog with the same
router storing into a catalog pre-filled with N instances (scripts/catalog_fill.py), rounds
alternating, and times "where is study X" in the filled one; --catalog postgresql does it on a
fresh database of the PostgreSQL at BENCH_POSTGRES (dropped at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicomrouter.pacsfarm import OrthancFarm, free_ports  # noqa: E402
from tests.support.router_process import RouterProcess, dcmtk, dcmtk_env, wait_for_port  # noqa: E402

SIZES = {"large": 512, "small": 64, "huge": 4096}  # huge: 32 MiB, spooled while it arrives


def make_instances(folder: Path, count: int, side: int) -> list[str]:
    """`count` CT instances of side x side 16-bit pixels in one study (512x512: ~512 KiB)."""
    study, series = generate_uid(), generate_uid()
    pixels = (np.arange(side * side, dtype=np.uint16) % 4096).reshape(side, side).tobytes()
    files = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality = "BENCH", "Bench^Store", "CT"
        ds.InstanceNumber = index + 1
        ds.Rows = ds.Columns = side
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = pixels
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(str(path))
    return files


def run_storescu(port: int, called_ae: str, files: list[str]) -> None:
    # One association for the whole batch, as a modality sends a study.
    result = subprocess.run(
        [dcmtk("storescu"), "-aet", "WORKSTATION", "-aec", called_ae, "127.0.0.1", str(port), *files],
        capture_output=True, text=True, env=dcmtk_env(),
    )
    if result.returncode != 0:
        raise SystemExit(f"storescu failed: {result.stderr[-2000:]}")


def run_senders(port: int, called_ae: str, batches: list[list[str]]) -> None:
    """One storescu per batch, all at once (modalities sending together); returns when all are done."""
    with ThreadPoolExecutor(len(batches)) as pool:
        list(pool.map(lambda files: run_storescu(port, called_ae, files), batches))


def wait_count(server, count: int, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.instance_count() >= count:
            return time.monotonic()
        time.sleep(0.05)
    raise SystemExit(f"{server.spec.name} holds {server.instance_count()} of {count} after {timeout}s")


def peak_rss_mb(pid: int) -> float:
    """One process's peak RSS (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor and its workers), from /proc."""
    pids, index = [pid], 0
    while index < len(pids):
        try:
            for task in Path(f"/proc/{pids[index]}/task").iterdir():
                pids += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
        index += 1
    return pids


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU of one process so far ((0, 0) once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RouterUsage:
    """CPU and resident memory of every process of the router (supervisor and workers) together,
    sampled every SAMPLE_S: the peak of the summed RSS (shared pages count once per process, as `ps`
    shows them), and the CPU each process used since `start` (a worker that ended counts until its
    last sample)."""

    SAMPLE_S = 0.1

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_rss_kib = 0
        self.processes = 0
        self._cpu_start: dict[int, tuple[float, float]] = {}
        self._cpu_last: dict[int, tuple[float, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def start(self) -> RouterUsage:
        for pid in process_tree(self.pid):
            self._cpu_start[pid] = self._cpu_last[pid] = cpu_seconds(pid)
        self._thread.start()
        return self

    def _sample(self) -> None:
        pids = process_tree(self.pid)
        self.processes = max(self.processes, len(pids))
        self.peak_rss_kib = max(self.peak_rss_kib, sum(rss_kib(pid) for pid in pids))
        for pid in pids:
            self._cpu_start.setdefault(pid, (0.0, 0.0))  # started during the run: all its CPU counts
            self._cpu_last[pid] = max(self._cpu_last.get(pid, (0.0, 0.0)), cpu_seconds(pid))

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.SAMPLE_S):
            self._sample()

    def stop(self) -> tuple[float, float]:
        """(CPU seconds, peak RSS MB) of all the router's processes during the run; `system_s` the
        kernel's part of that CPU."""
        self._sample()
        self._stop.set()
        self._thread.join(timeout=5)
        self.system_s = sum(self._cpu_last[pid][1] - self._cpu_start[pid][1] for pid in self._cpu_last)
        cpu = sum(sum(self._cpu_last[pid]) - sum(self._cpu_start[pid]) for pid in self._cpu_last)
        return cpu, self.peak_rss_kib / 1024


def write_config(folder: Path, router_port: int, orthanc, http_port: int | None = None,
                 catalog_url: str = "sqlite:///var/catalog.db") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    http = f"\n  http: {{host: 127.0.0.1, port: {http_port}}}" if http_port else ""
    # The router's default associations per destination, unless BENCH_WORKERS says otherwise.
    lanes = os.environ.get("BENCH_WORKERS")
    forwarding = f"\n  forwarding:\n    workers_per_destination: {lanes}" if lanes else ""
    text = f"""router:
  ae_title: DICOMROUTER
  host: 127.0.0.1
  port: {router_port}
  catalog: {catalog_url}
  spool: var/spool
  max_pdu_size: {os.environ.get("BENCH_MAX_PDU", 262144)}{forwarding}{http}
servers:
  - name: Bench PACS
    ae_title: {orthanc.spec.ae_title}
    host: 127.0.0.1
    port: {orthanc.spec.dicom_port}
    environment: test
    active: true
    primary: true
clients:
  - ae_title: WORKSTATION
    roles: [test_write]
"""
    path = folder / "bench.yaml"
    path.write_text(text)
    subprocess.run([sys.executable, "-m", "dicomrouter", "--config", str(path), "db", "upgrade"], check=True,
                   capture_output=True)
    return path


def scrape_every_second(url: str, stop: threading.Event, counter: list[int]) -> None:
    """A Prometheus stand-in: GET /metrics once a second until `stop`."""
    while not stop.wait(1.0):
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
        counter[0] += 1


def associations_per_worker(log_text: str) -> dict[str, int]:
    """How the associations were spread over the workers."""
    spread: dict[str, int] = {}
    for line in log_text.splitlines():
        if line.startswith("{") and '"association_accepted"' in line:
            worker = str(json.loads(line).get("worker", "-"))
            spread[worker] = spread.get(worker, 0) + 1
    return dict(sorted(spread.items()))


def split(files: list[str], senders: int) -> list[list[str]]:
    """`files` in `senders` batches of (nearly) equal size, in order (one study each from make_batches)."""
    sizes = [len(files) // senders + (index < len(files) % senders) for index in range(senders)]
    starts = [sum(sizes[:index]) for index in range(senders)]
    return [files[start:start + size] for start, size in zip(starts, sizes, strict=True)]


def routed_run(folder: Path, files: list[str], target, router_port: int, http_port: int | None = None,
               profile: str | None = None, catalog_url: str = "sqlite:///var/catalog.db",
               already_held: int = 0, senders: int = 1, workers: int | None = None,
               details: dict | None = None) -> tuple[float, float, float, float, int]:
    """storescu (`senders` at once, `files` split among them) -> a fresh router of `workers` processes
    -> `target`: (seconds to all stored, seconds to all acknowledged, router CPU s and peak RSS MB over all
    its processes, scrapes made). `already_held`: instances `target` held before. `details` gets the number
    of router processes and the associations each worker took."""
    router = RouterProcess(write_config(folder, router_port, target, http_port, catalog_url), router_port,
                           workers=workers)
    router.start()
    profiler = None
    if profile:
        profiler = subprocess.Popen(["py-spy", "record", "--gil", "--threads", "--subprocesses", "--format", "raw",
                                     "-r", "200", "-o", profile, "-p", str(router.process.pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
    stop, scrapes = threading.Event(), [0]
    scraper = None
    try:
        if http_port:
            wait_for_port(http_port)
            scraper = threading.Thread(
                target=scrape_every_second, args=(f"http://127.0.0.1:{http_port}/metrics", stop, scrapes), daemon=True
            )
            scraper.start()
        usage = RouterUsage(router.process.pid).start()
        started = time.monotonic()
        run_senders(router_port, "DICOMROUTER", split(files, senders))
        acknowledged_s = time.monotonic() - started
        routed_s = wait_count(target, already_held + len(files)) - started
        router_cpu_s, rss = usage.stop()
    finally:
        stop.set()
        if scraper:
            scraper.join(timeout=15)
        if profiler:
            profiler.send_signal(2)
            profiler.wait(timeout=30)
        router.stop()
    if details is not None:
        details.update(processes=usage.processes, system_s=usage.system_s, spread=associations_per_worker(router.log_text()))
    return routed_s, acknowledged_s, router_cpu_s, rss, scrapes[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="instances in all (split among the senders)")
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--senders", type=int, default=1,
                        help="storescu associations at once, each its own study (direct and through the router)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="the router's worker processes (default: one per CPU, as serve; 1: a single process)")
    parser.add_argument("--profile", metavar="FILE", help="py-spy the router into FILE (collapsed stacks)")
    parser.add_argument(
        "--scrape", action="store_true",
        help="also run a router with its HTTP port scraped at /metrics every second, and compare",
    )
    parser.add_argument("--catalog-instances", type=int, default=0, metavar="N",
                        help="compare an empty catalog with one pre-filled with N instances")
    parser.add_argument("--catalog", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the catalog database for --catalog-instances")
    parser.add_argument("--rounds", type=int, default=3, help="empty/filled pairs for --catalog-instances")
    args = parser.parse_args()
    os.environ["TCP_NODELAY"] = "1"
    if args.catalog_instances:
        from bench_catalog import compare_catalogs

        compare_catalogs(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        folder = Path(tmp)
        files = []
        for index, count in enumerate(len(batch) for batch in split([""] * args.count, args.senders)):
            (folder / f"in{index}").mkdir()
            files += make_instances(folder / f"in{index}", count, SIZES[args.size])  # a study per sender
        megabytes = sum(os.path.getsize(f) for f in files) / 1e6
        router_port = free_ports(1)[0]
        farm = OrthancFarm.on_free_ports(folder / "orthanc", ("test",) * (3 if args.scrape else 2),
                                         extra_peers=[("DICOMROUTER", "127.0.0.1", router_port)])
        with farm:
            farm.start_all()
            direct_target, routed_target = farm[0], farm[1]
            started = time.monotonic()
            run_senders(direct_target.spec.dicom_port, direct_target.spec.ae_title, split(files, args.senders))
            direct_s = wait_count(direct_target, len(files)) - started

            details: dict = {}
            routed = routed_run(folder / "router", files, routed_target, router_port, profile=args.profile,
                                senders=args.senders, workers=args.workers, details=details)
            scraped = None
            if args.scrape:
                http_port, scraped_port = free_ports(2)
                scraped = routed_run(folder / "scraped", files, farm[2], scraped_port, http_port=http_port,
                                     senders=args.senders, workers=args.workers)
    routed_s, acknowledged_s, router_cpu_s, rss, _ = routed
    print(f"instances: {len(files)} x {args.size} ({megabytes / len(files) * 1000:.0f} KB each, {megabytes:.0f} MB)"
          f" from {args.senders} storescu at once; router: {args.workers} worker(s), {details['processes']} process(es),"
          f" associations per worker {details['spread']}")
    print(f"direct  storescu -> Orthanc          : {direct_s:6.2f} s  {len(files) / direct_s:7.1f} inst/s  {megabytes / direct_s:6.1f} MB/s")
    print(f"router  storescu -> router -> Orthanc: {routed_s:6.2f} s  {len(files) / routed_s:7.1f} inst/s  {megabytes / routed_s:6.1f} MB/s")
    print(f"        (storescu done, all acknowledged after {acknowledged_s:.2f} s)")
    print(f"ratio router/direct throughput       : {direct_s / routed_s:.2f}x")
    print(f"router CPU, all processes            : {router_cpu_s:6.2f} s  ({router_cpu_s / len(files) * 1000:.2f} ms per instance,"
          f" of which kernel {details['system_s'] / len(files) * 1000:.2f} ms)")
    print(f"router peak RSS, all processes       : {rss:.0f} MB")
    print(f"load average (1, 5, 15 min)          : {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if scraped is not None:
        scraped_s, _, scraped_cpu_s, _, scrapes = scraped
        print(f"router, /metrics scraped every second: {scraped_s:6.2f} s  {len(files) / scraped_s:7.1f} inst/s"
              f"  ({scrapes} scrapes, CPU {scraped_cpu_s:.2f} s)")
        print(f"ratio scraped/unscraped throughput   : {routed_s / scraped_s:.3f}x")


if __name__ == "__main__":
    main()
