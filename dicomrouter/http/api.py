"""The admin JSON API (role `admin`): the same facts as the CLI and the status page."""

from __future__ import annotations

import asyncio

from aiohttp import web

from dicomrouter.http.auth import require_role
from dicomrouter.http.deps import HttpDeps
from dicomrouter.status import event_dict, parse_since, servers_facts
from dicomrouter.store.queue import CLAIMED, DEAD, PENDING
from dicomrouter.store.queue_gauges import read_queue_gauges

MAX_AUDIT_LIMIT = 5000


def _health(deps: HttpDeps) -> dict:
    return deps.metrics.destinations.all() if deps.metrics is not None else {}


def read_servers(deps: HttpDeps) -> list[dict]:
    """Blocking: the registry with last health and studies held."""
    try:
        studies = deps.catalog.studies_per_server()
    except Exception:  # the catalog is down: the registry and health still help
        studies = None
    return servers_facts(deps.holder.current, studies, _health(deps))


def read_queue(deps: HttpDeps) -> list[dict]:
    """Blocking: per destination, what waits, since when, why, and whether it answers."""
    config = deps.holder.current
    gauges = read_queue_gauges(deps.queue.sessions)
    health = _health(deps)
    names = [s.name for s in config.live_servers()]
    names += sorted(gauges.destinations() - set(names))
    rows = []
    for name in names:
        state = health.get(name)
        oldest = gauges.oldest_waiting.get(name)
        rows.append(
            {
                "destination": name,
                "pending": gauges.jobs.get((name, PENDING), 0),
                "sending": gauges.jobs.get((name, CLAIMED), 0),
                "dead": gauges.jobs.get((name, DEAD), 0),
                "oldest": oldest.isoformat() if oldest else None,
                "unreachable_since": state.since.isoformat()
                if state is not None and not state.up
                else None,
                "last_error": state.last_error if state is not None else None,
                "suspended": None,
            }
        )
    return rows


def add_routes(app: web.Application, deps: HttpDeps) -> None:
    async def servers(request: web.Request) -> web.Response:
        require_role(request, "admin")
        return web.json_response(await asyncio.to_thread(read_servers, deps))

    async def audit(request: web.Request) -> web.Response:
        require_role(request, "admin")
        query = request.query
        try:
            since = parse_since(query["since"]) if query.get("since") else None
            limit = int(query.get("limit", "200"))
            if not 1 <= limit <= MAX_AUDIT_LIMIT:
                raise ValueError(f"limit must be from 1 to {MAX_AUDIT_LIMIT}")
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        events = await asyncio.to_thread(
            deps.catalog.audit_events,
            since=since,
            calling_ae=query.get("ae") or None,
            study_uid=query.get("study") or None,
            operation=query.get("operation") or None,
            limit=limit,
        )
        return web.json_response([event_dict(e) for e in events])

    async def queue(request: web.Request) -> web.Response:
        require_role(request, "admin")
        return web.json_response(await asyncio.to_thread(read_queue, deps))

    app.router.add_get("/api/servers", servers)
    app.router.add_get("/api/queue", queue)
    app.router.add_get("/api/audit", audit)
