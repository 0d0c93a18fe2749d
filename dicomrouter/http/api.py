"""The admin JSON API (role `admin`): the same facts as the CLI and the status page."""

from __future__ import annotations

import asyncio

from aiohttp import web

from dicomrouter.http.auth import require_role
from dicomrouter.http.deps import HttpDeps
from dicomrouter.status import event_dict, parse_since, servers_facts, study_whereabouts
from dicomrouter.store.queue_report import DestinationBacklog, destination_backlogs

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
    """Blocking: per destination, what waits, since when, why, whether it is suspended and answers."""
    backlogs = {b.destination: b for b in deps.catalog.read_plain(destination_backlogs)}
    health = _health(deps)
    names = [s.name for s in deps.holder.current.live_servers()]
    names += sorted(set(backlogs) - set(names))
    rows = []
    for name in names:
        state = health.get(name)
        row = (backlogs.get(name) or DestinationBacklog(name)).as_dict()
        row["up"] = state.up if state is not None else None
        if row["last_error"] is None and state is not None and not state.up:
            row["last_error"] = state.last_error
        rows.append(row)
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

    async def study(request: web.Request) -> web.Response:
        require_role(request, "admin")
        study_uid = request.match_info["study_uid"]
        whereabouts = await asyncio.to_thread(
            deps.catalog.read_plain, lambda reader: study_whereabouts(reader, study_uid)
        )
        if not whereabouts.found:
            raise web.HTTPNotFound(
                text=f"study {study_uid} is not in the catalog and has no deliveries\n"
            )
        return web.json_response(whereabouts.as_dict())

    app.router.add_get("/api/servers", servers)
    app.router.add_get("/api/studies/{study_uid}", study)
    app.router.add_get("/api/queue", queue)
    app.router.add_get("/api/audit", audit)
