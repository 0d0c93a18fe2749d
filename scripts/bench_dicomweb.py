#!/usr/bin/env python3
"""DICOMweb benchmark: the router's QIDO-RS, WADO-RS and STOW-RS against the DIMSE tools through it.

- QIDO-RS study search vs the same STUDY query by DCMTK findscu through the router (goal: within 10 ms).
- WADO-RS retrieval of a `--count`-instance study (about 512 KiB each) vs movescu of it through the
  router to a DCMTK storescp (goal: at least 0.8x the throughput).
- STOW-RS of `--count` new instances vs storescu of as many through the router (goal: at least 0.8x).
- Then WADO-RS of the same study with the PACS set to `retrieve: move` (C-MOVE to the router, the
  PACS calling back) against the same movescu figure (no goal of its own; `--no-move` skips it).

One Orthanc, `python3 -m dicomrouter serve` with `router.http` and storescp run on free ports in a
temporary folder and are stopped at the end.

    .venv/bin/python scripts/bench_dicomweb.py [--count 300] [--runs 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_move import Workstation, check_received, run_movescu  # noqa: E402
from bench_store import make_instances, peak_rss_mb, run_storescu  # noqa: E402

from dicomrouter.pacsfarm import OrthancFarm, free_ports  # noqa: E402
from tests.support.router_process import RouterProcess, dcmtk, dcmtk_env, wait_for_port  # noqa: E402

ROUTER_AE, WORKSTATION_AE = "DICOMROUTER", "WORKSTATION"
TOKEN = "bench-token"
QIDO_BAR_MS, WADO_BAR, STOW_BAR = 10.0, 0.8, 0.8
BOUNDARY = "bench-dicomweb-boundary"


def write_config(
    folder: Path, router_port: int, http_port: int, orthanc, workstation_port: int
) -> Path:
    token_sha = hashlib.sha256(TOKEN.encode()).hexdigest()
    text = f"""router:
  ae_title: {ROUTER_AE}
  host: 127.0.0.1
  port: {router_port}
  catalog: sqlite:///var/catalog.db
  spool: var/spool
  http:
    host: 127.0.0.1
    port: {http_port}
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
    http_token_sha256: {token_sha}
"""
    path = folder / "bench-dicomweb.yaml"
    path.write_text(text)
    subprocess.run(
        [sys.executable, "-m", "dicomrouter", "--config", str(path), "db", "upgrade"],
        check=True,
        capture_output=True,
    )
    return path


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def run_findscu(port: int) -> None:
    result = subprocess.run(
        [
            dcmtk("findscu"),
            "-S",
            "-aet",
            WORKSTATION_AE,
            "-aec",
            ROUTER_AE,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientID=BENCH",
            "-k",
            "StudyInstanceUID",
            "-k",
            "PatientName",
            "-k",
            "StudyDate",
            "127.0.0.1",
            str(port),
        ],
        capture_output=True,
        text=True,
        errors="replace",
        env=dcmtk_env(),
        timeout=60,
    )
    if result.returncode != 0:
        raise SystemExit(f"findscu failed:\n{result.stderr[-2000:]}")


def run_qido(session: requests.Session, url: str) -> None:
    reply = session.get(f"{url}/studies", params={"PatientID": "BENCH"}, timeout=60)
    if reply.status_code != 200 or not reply.json():
        raise SystemExit(f"QIDO-RS failed: {reply.status_code} {reply.text[:500]}")


def run_wado(url: str, study_uid: str, expected_bytes: int) -> None:
    """curl as the client, writing to /dev/null: a Python client would be the bottleneck on 2 cores."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            "-u",
            f"{WORKSTATION_AE}:{TOKEN}",
            "-H",
            'Accept: multipart/related; type="application/dicom"',
            f"{url}/studies/{study_uid}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    status, _, size = result.stdout.partition(" ")
    if result.returncode != 0 or status != "200":
        raise SystemExit(f"WADO-RS failed: {result.stdout} {result.stderr[-500:]}")
    if int(size) < expected_bytes:
        raise SystemExit(f"WADO-RS sent {size} bytes, fewer than the study's {expected_bytes}")


def write_stow_body(files: list[str], path: Path) -> Path:
    """The multipart/related body of a STOW-RS request for `files`, written once to `path`."""
    with open(path, "wb") as body:
        for file in files:
            body.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            with open(file, "rb") as handle:
                shutil.copyfileobj(handle, body)
            body.write(b"\r\n")
        body.write(f"--{BOUNDARY}--\r\n".encode())
    return path


def run_stow(url: str, body: Path) -> None:
    """curl uploads the body as it reads it from disk (like storescu, a client in C)."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-u",
            f"{WORKSTATION_AE}:{TOKEN}",
            "-X",
            "POST",
            "-H",
            f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "-T",
            str(body),
            f"{url}/studies",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 or result.stdout != "200":
        raise SystemExit(f"STOW-RS answered {result.stdout}: {result.stderr[-1000:]}")


def switch_to_move(router: RouterProcess, config: Path) -> None:
    """Reload the router with the bench PACS set to `retrieve: move`; returns once it took it."""
    text = config.read_text()
    config.write_text(
        text.replace("    primary: true\n", "    primary: true\n    retrieve: move\n", 1)
    )
    reloads = router.log_text().count('"config_reloaded"')
    router.reload()
    deadline = time.monotonic() + 30
    while router.log_text().count('"config_reloaded"') <= reloads:
        if time.monotonic() > deadline:
            raise SystemExit(f"the router did not reload:\n{router.log_tail()}")
        time.sleep(0.05)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def store_large_study(folder: Path, orthanc, megabytes: int) -> tuple[str, int]:
    """One study of 32 MiB instances (`megabytes` in all) in the PACS: (its UID, instances)."""
    count = max(1, megabytes // 32)
    (folder / "large").mkdir()
    files = make_instances(folder / "large", count, 4096)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    before_count = orthanc.instance_count()
    run_storescu(orthanc.spec.dicom_port, orthanc.spec.ae_title, files)
    shutil.rmtree(folder / "large")
    orthanc.wait_for_instance_count(before_count + count, timeout=900)
    return study_uid, count


def large_study_rss(router: RouterProcess, url: str, study_uid: str, count: int, how: str) -> str:
    """WADO-RS of the large study while sampling the router's RSS."""
    pid = router.process.pid
    before = rss_mb(pid)
    samples = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            samples.append(rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    elapsed = timed(lambda: run_wado(url, study_uid, count * 32 * 1024 * 1024))
    done.set()
    sampler.join()
    growth = max(samples) - before
    return (
        f"large study: {count} x 32 MiB ({count * 32} MiB) by WADO-RS {how} in {elapsed:.1f} s "
        f"({count * 32 / elapsed:.0f} MiB/s); router RSS {before:.0f} MB before, peak {max(samples):.0f} MB "
        f"(+{growth:.0f} MB; goal < 100 MB: {'PASS' if growth < 100 else 'FAIL'})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="instances per study")
    parser.add_argument(
        "--large-mb",
        type=int,
        default=0,
        help="then retrieve a study this large (32 MiB instances) and report the router's RSS growth "
        "(issue 14: 2048 MiB within 100 MB)",
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="timed runs (median), after one warm-up"
    )
    parser.add_argument(
        "--no-move", action="store_true", help="skip WADO-RS via C-MOVE to the router"
    )
    args = parser.parse_args()
    os.environ["TCP_NODELAY"] = "1"
    times: dict[str, list[float]] = {
        key: [] for key in ("findscu", "qido", "movescu", "wado", "storescu", "stow", "wado_move")
    }
    with tempfile.TemporaryDirectory(prefix="bench-dicomweb-") as tmp:
        folder = Path(tmp)
        (folder / "study").mkdir()
        files = make_instances(folder / "study", args.count, 512)
        megabytes = sum(os.path.getsize(f) for f in files) / 1e6
        router_port, http_port, workstation_port = free_ports(3)
        farm = OrthancFarm.on_free_ports(
            folder / "orthanc",
            ("test",),
            extra_peers=[
                (ROUTER_AE, "127.0.0.1", router_port),
                (WORKSTATION_AE, "127.0.0.1", workstation_port),
            ],
        )
        router = workstation = None
        try:
            farm.start_all()
            orthanc = farm[0]
            run_storescu(orthanc.spec.dicom_port, orthanc.spec.ae_title, files)
            orthanc.wait_for_instance_count(len(files), timeout=300)
            shutil.rmtree(folder / "study")
            study_uid = orthanc.study_uids()[0]
            workstation = Workstation(workstation_port, folder / "workstation")
            config = write_config(folder, router_port, http_port, orthanc, workstation_port)
            router = RouterProcess(config, router_port)
            router.start()
            wait_for_port(http_port)
            url = f"http://127.0.0.1:{http_port}/dicom-web"
            session = requests.Session()
            session.auth = (WORKSTATION_AE, TOKEN)
            stored_in_orthanc = len(files)
            for run in range(args.runs + 1):  # run 0 warms up
                measured = {
                    "findscu": timed(lambda: run_findscu(router_port)),
                    "qido": timed(lambda: run_qido(session, url)),
                }
                workstation.empty()
                elapsed, output = run_movescu(router_port, ROUTER_AE, WORKSTATION_AE, study_uid)
                check_received(workstation.folder, len(files), "movescu", output)
                measured["movescu"] = elapsed
                measured["wado"] = timed(lambda: run_wado(url, study_uid, int(megabytes * 1e6)))
                for key in (
                    "storescu",
                    "stow",
                ):  # new instances each time: each one is spooled and queued
                    batch = folder / f"{key}-{run}"
                    batch.mkdir()
                    new_files = make_instances(batch, args.count, 512)
                    if key == "storescu":
                        measured[key] = timed(
                            lambda files=new_files: run_storescu(router_port, ROUTER_AE, files)
                        )
                    else:
                        body = write_stow_body(new_files, folder / f"stow-{run}.body")
                        measured[key] = timed(lambda body=body: run_stow(url, body))
                        body.unlink()
                    shutil.rmtree(batch)
                    # Every step starts with the forwarding of the one before done: otherwise the next
                    # retrieval or store competes with 158 MB going to the same Orthanc.
                    stored_in_orthanc += len(new_files)
                    orthanc.wait_for_instance_count(stored_in_orthanc, timeout=300)
                    os.sync()  # and their pages written back, not flushed during the next retrieval
                if run:
                    for key, value in measured.items():
                        times[key].append(value)
                    print(
                        f"run {run}  " + "  ".join(f"{k} {v:.3f}s" for k, v in measured.items()),
                        flush=True,
                    )
            large = []
            if args.large_mb:
                large_uid, large_count = store_large_study(folder, orthanc, args.large_mb)
                large.append(large_study_rss(router, url, large_uid, large_count, "(C-GET)"))
            if not args.no_move:
                switch_to_move(router, config)
                for run in range(args.runs + 1):  # run 0 warms up
                    elapsed = timed(lambda: run_wado(url, study_uid, int(megabytes * 1e6)))
                    if run:
                        times["wado_move"].append(elapsed)
                        print(f"run {run}  wado via C-MOVE {elapsed:.3f}s", flush=True)
                if '"move_to_self_done"' not in router.log_text():
                    raise SystemExit("WADO-RS did not go through C-MOVE to the router")
                if args.large_mb:
                    large.append(large_study_rss(router, url, large_uid, large_count, "via C-MOVE"))
            rss = peak_rss_mb(router.process.pid)
        finally:
            if router is not None:
                router.stop()
            if workstation is not None:
                workstation.stop()
            farm.stop_all()
    median = {key: statistics.median(values) for key, values in times.items() if values}
    for line in large:
        print(line)
    print(
        f"\nstudy: {args.count} instances, {megabytes:.0f} MB; median of {args.runs} runs; router peak RSS {rss:.0f} MB"
    )
    gap_ms = (median["qido"] - median["findscu"]) * 1000
    print(
        f"QIDO-RS {median['qido'] * 1000:7.1f} ms  findscu {median['findscu'] * 1000:7.1f} ms  "
        f"difference {gap_ms:+.1f} ms  (goal within {QIDO_BAR_MS:.0f} ms: {'PASS' if gap_ms <= QIDO_BAR_MS else 'FAIL'})"
    )
    for label, web, dimse, bar in (
        ("WADO-RS", "wado", "movescu", WADO_BAR),
        ("STOW-RS", "stow", "storescu", STOW_BAR),
        ("WADO-RS via C-MOVE", "wado_move", "movescu", None),
    ):
        if web not in median:
            continue
        ratio = (
            median[dimse] / median[web]
        )  # throughput ratio: same bytes, so the inverse of the times
        print(
            f"{label} {median[web]:6.2f} s ({megabytes / median[web]:6.1f} MB/s)  {dimse} {median[dimse]:6.2f} s "
            f"({megabytes / median[dimse]:6.1f} MB/s)  {ratio:.2f}x"
            + (f"  (goal {bar}x: {'PASS' if ratio >= bar else 'FAIL'})" if bar else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
