"""Which servers one C-FIND goes to, in preference order (pure decision)."""

from __future__ import annotations

from dataclasses import dataclass

from dicomrouter.config import Config, ServerConfig
from dicomrouter.routing.access import Caller, inactive_reason, may_read


@dataclass(frozen=True)
class FindTargets:
    servers: tuple[ServerConfig, ...]  # primary first, then file order
    refused: str | None = None  # why there is none to ask
    # Inactive servers the query would otherwise have gone to: the CLI says it did not ask them.
    skipped: tuple[ServerConfig, ...] = ()


def find_targets(
    config: Config,
    caller: Caller,
    called_ae: str | None = None,
    worklist: bool = False,
    names: tuple[str, ...] | None = None,
) -> FindTargets:
    """Usable servers the caller may read, narrowed by the client's query_servers, the called
    virtual AE (a server's own AE title) and `names`; worklist queries only go to worklist servers.

    An inactive server is asked only when `names` names it (the CLI's --server: its history).
    """
    candidates = config.live_servers()
    virtual = None
    if called_ae and called_ae != config.router.ae_title:
        virtual = config.server_by_ae(called_ae)
    if virtual is not None:
        if not virtual.usable:
            return FindTargets((), inactive_reason(virtual))
        candidates = [s for s in candidates if s.name == virtual.name]
    if caller.client is not None and caller.client.query_servers is not None:
        allowed = set(caller.client.query_servers)
        candidates = [s for s in candidates if s.name in allowed]
    if names is not None:
        candidates = [s for s in candidates if s.name in names]
    if worklist:
        candidates = [s for s in candidates if s.worklist]
    skipped = tuple(s for s in candidates if not s.active and names is None and may_read(caller, s))
    candidates = [s for s in candidates if s.active or names is not None]
    readable = [s for s in candidates if may_read(caller, s)]
    if not readable:
        what = "worklist server" if worklist else "server"
        if candidates:
            envs = ", ".join(sorted({s.environment for s in candidates}))
            return FindTargets((), f"{caller.ae_title} may not read {envs} servers", skipped)
        return FindTargets((), f"no usable {what} to query for {caller.ae_title}", skipped)
    readable.sort(key=lambda s: not s.primary)  # stable: file order after the primary
    return FindTargets(tuple(readable), skipped=skipped)
