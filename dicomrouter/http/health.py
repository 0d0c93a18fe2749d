"""`/healthz` (the process serves) and `/readyz` (catalog answers, spool writable, DICOM port listens)."""

from __future__ import annotations

import asyncio
import os
import uuid

from aiohttp import web
from sqlalchemy import text

from dicomrouter.catalog.db import SQLITE_BEGIN, engine_of
from dicomrouter.http.deps import HttpDeps


def readiness_problems(deps: HttpDeps) -> dict[str, str]:
    """What keeps the router from being ready, by component (empty: ready). Blocking."""
    problems: dict[str, str] = {}
    if deps.catalog is not None:
        try:
            with engine_of(deps.catalog.sessions).connect() as connection:
                # DEFERRED: a probe must never wait for (or hold) SQLite's write lock.
                connection.execution_options(**{SQLITE_BEGIN: "DEFERRED"}).execute(text("SELECT 1"))
        except Exception as exc:
            problems["catalog"] = f"does not answer: {exc.__class__.__name__}: {str(exc)[:200]}"
    if deps.spool is not None:
        probe = deps.spool.tmp / f".readyz-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            problems["spool"] = f"{deps.spool.tmp} is not writable: {exc.strerror or exc}"
    if deps.front is not None and not deps.front.running:
        problems["dicom"] = "the DICOM port is not listening"
    return problems


def add_routes(app: web.Application, deps: HttpDeps) -> None:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pid": os.getpid()})

    async def readyz(_request: web.Request) -> web.Response:
        problems = await asyncio.to_thread(readiness_problems, deps)
        if problems:
            return web.json_response({"status": "not ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
