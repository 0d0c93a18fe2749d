"""Run the real `dicomrouter serve` as a subprocess for end-to-end tests."""

from __future__ import annotations

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


class RouterProcess:
    """`dicomrouter --config FILE serve` in the background, its log kept in a file."""

    def __init__(self, config_path: Path, port: int, log_path: Path | None = None):
        self.config_path = Path(config_path)
        self.port = port
        self.log_path = log_path or self.config_path.with_suffix(".log")
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

    def start(self, timeout: float = 30.0) -> RouterProcess:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicomrouter", "--config", str(self.config_path), "serve", "--log-format", "json"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"router exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                wait_for_port(self.port, timeout=0.2)
                return self
            except TimeoutError:
                continue
        self.kill()
        raise TimeoutError(f"router did not listen on {self.port}:\n{self.log_tail()}")

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
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def reload(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
