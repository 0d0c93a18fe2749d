"""Health of every live server: parallel C-ECHOs, each with a short timeout."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dicomrouter.config import Config, ServerConfig
from dicomrouter.net.peer import EchoResult, echo_peer


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
