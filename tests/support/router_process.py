"""Run the real `dicomrouter serve` as a subprocess for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DCMTK = Path("/usr/bin")


def dcmtk(tool: str) -> str:
    """DCMTK's tool, never pynetdicom's console script of the same name."""
    return str(DCMTK / tool)


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def run_dcmtk(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk(tool), *args], capture_output=True, text=True, errors="replace", env=dcmtk_env(), timeout=timeout
    )


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def default_workers() -> int:
    """Worker processes of the routers tests start: one (fast to start, today's single process) unless
    DICOMROUTER_TEST_WORKERS says otherwise; tests about workers ask for several themselves."""
    return int(os.environ.get("DICOMROUTER_TEST_WORKERS", "1"))


class RouterProcess:
    """`dicomrouter --config FILE serve` in the background (its own process group), its log kept in a file."""

    def __init__(self, config_path: Path, port: int, log_path: Path | None = None, workers: int | None = None):
        self.config_path = Path(config_path)
        self.port = port
        self.log_path = log_path or self.config_path.with_suffix(".log")
        self.workers = workers or default_workers()
        self.process: subprocess.Popen | None = None

    def cli(self, *args: str, timeout: float = 120, input_text: str | None = None) -> subprocess.CompletedProcess:
        """Run another `dicomrouter` command against the same config."""
        return subprocess.run(
            [sys.executable, "-m", "dicomrouter", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
        )

    def audit_until(self, done, *filters: str, timeout_s: float = 20.0) -> list[dict]:
        """`audit --json` rows (with `filters`) once `done(rows)` holds: the router writes its audit
        rows in the background, a moment after what they record."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = json.loads(self.cli("audit", "--json", *filters).stdout or "[]")
            if done(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)

    def start(self, timeout: float = 30.0) -> RouterProcess:
        log = open(self.log_path, "ab")
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicomrouter", "--config", str(self.config_path), "serve", "--log-format", "json",
             "--workers", str(self.workers)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
            start_new_session=True,  # kill() ends the supervisor and its workers together
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"router exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                wait_for_port(self.port, timeout=0.2)
            except TimeoutError:
                continue
            # Several workers: the port answers when the first listens; wait for all of them.
            if self.workers == 1 or '"workers_ready"' in self.log_text()[log_offset:]:
                return self
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"router did not listen on {self.port}:\n{self.log_tail()}")

    def worker_pids(self) -> list[int]:
        """The worker processes of a supervisor (none for a single-process router)."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()] if children.exists() else []

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the router's whole process group (supervisor and workers)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)

    def reload(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
