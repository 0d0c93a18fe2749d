"""Health of every live server: parallel C-ECHOs, each with a short timeout."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from dicomrouter.config import Config, ServerConfig
from dicomrouter.logging import get_logger
from dicomrouter.net.peer import EchoResult, echo_peer

log = get_logger(__name__)


@dataclass(frozen=True)
class ServerHealth:
    server: ServerConfig
    echo: EchoResult
    studies: int | None

    def as_dict(self) -> dict:
        return {
            "name": self.server.name,
            "ae_title": self.server.ae_title,
            "host": self.server.host,
            "port": self.server.port,
            "environment": self.server.environment,
            "status": self.echo.status,
            "reason": self.echo.detail or None,
            "response_ms": self.echo.response_ms,
            "active": self.server.active,
            "primary": self.server.primary,
            "studies": self.studies,
        }


def echo_servers(config: Config, servers: list[ServerConfig], timeout_s: float | None = None) -> list[EchoResult]:
    """C-ECHO each server in parallel; results in the order given."""
    if not servers:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(servers))) as pool:
        return list(pool.map(lambda s: echo_peer(s, config.router, timeout_s), servers))


def check_health(config: Config, studies_per_server: dict[str, int] | None, timeout_s: float | None = None) -> list[ServerHealth]:
    servers = config.live_servers()
    results = echo_servers(config, servers, timeout_s)
    counts = studies_per_server
    return [
        ServerHealth(server, result, (counts.get(server.name, 0) if counts is not None else None))
        for server, result in zip(servers, results, strict=True)
    ]


class HealthWatch:
    """C-ECHOs, in the background, each live server nobody has talked to for `interval_s`.

    The forwarder's own sends say whether a busy destination answers; the watch covers the idle
    ones, so `/metrics`, `/api/servers` and the status page know about every server. It runs on
    its own thread and never touches the DICOM front.
    """

    def __init__(self, holder, states, interval_s: Callable[[], float]):
        self.holder = holder
        self.states = states  # metrics.DestinationStates
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def check_now(self) -> None:
        """Echo the servers whose last contact is older than the interval."""
        config = self.holder.current
        cutoff = datetime.now(UTC) - timedelta(seconds=self.interval_s())
        due = [s for s in config.live_servers() if (self.states.last_contact(s.name) or cutoff) <= cutoff]
        for server, result in zip(due, echo_servers(config, due), strict=True):
            if result.healthy:
                self.states.answered(server.name, "echo", result.response_ms)
            else:
                self.states.unreachable(server.name, "echo", f"{result.status}: {result.detail}".strip(": "))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_now()
            except Exception:
                log.exception("health_watch_failed")
            self._stop.wait(min(5.0, self.interval_s()))
