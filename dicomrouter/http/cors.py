"""CORS (the Fetch standard) for DICOMweb: a viewer served from another origin may call /dicom-web.

Only the origins in ``router.http.cors_origins`` get the Access-Control headers, and only under
/dicom-web (the admin API and the status page stay same-origin). A preflight (OPTIONS) carries no
credentials, so it is answered without authentication; the request that follows is authenticated
as any other (Basic or Bearer in its Authorization header, which the preflight allows).
"""

from __future__ import annotations

import re

from aiohttp import web

from dicomrouter.http.deps import DEPS, HttpDeps
from dicomrouter.http.dicomweb import PREFIX
from dicomrouter.logging import get_logger

log = get_logger(__name__)

METHODS = "GET, POST, OPTIONS"
# Headers a script may read beyond the safelisted ones: partial results are a Warning.
EXPOSED_HEADERS = "Warning, Content-Location, Location, WWW-Authenticate"
# Header names a preflight may ask for that we grant: whatever the client names, if it is a name.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
DEFAULT_ALLOWED_HEADERS = "Authorization, Accept, Content-Type"
PREFLIGHT_MAX_AGE_S = 600


def allowed_origin(request: web.Request) -> str | None:
    """The request's Origin if the configuration lets it call /dicom-web, else None."""
    origin = request.headers.get("Origin")
    http = request.app[DEPS].holder.current.router.http
    if not origin or http is None or not http.cors_origins:
        return None
    if "*" in http.cors_origins or origin.lower() in http.cors_origins:
        return origin
    return None


def _is_dicomweb(request: web.Request) -> bool:
    return request.path == PREFIX or request.path.startswith(PREFIX + "/")


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every /dicom-web answer to an allowed origin (errors and streams too)."""
    if not _is_dicomweb(request):
        return
    origin = allowed_origin(request)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    response.headers.add("Vary", "Origin")


async def preflight(request: web.Request) -> web.Response:
    """OPTIONS under /dicom-web: the methods, and for an allowed origin's preflight, the grant."""
    headers = {"Allow": METHODS}
    if "Access-Control-Request-Method" not in request.headers:
        return web.Response(status=204, headers=headers)
    if allowed_origin(request) is None:
        log.info(
            "cors_refused",
            origin=request.headers.get("Origin"),
            path=request.path,
            address=request.remote,
            fix="add the origin to router.http.cors_origins",
        )
        return web.Response(
            status=403,
            headers=headers,
            text="this origin may not call the router's DICOMweb (router.http.cors_origins)\n",
        )
    asked = [
        name.strip()
        for name in request.headers.get("Access-Control-Request-Headers", "").split(",")
        if name.strip()
    ]
    granted = ", ".join(n for n in asked if _HEADER_NAME.match(n)) or DEFAULT_ALLOWED_HEADERS
    headers.update(
        {
            "Access-Control-Allow-Methods": METHODS,
            "Access-Control-Allow-Headers": granted,
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
        }
    )
    return web.Response(status=204, headers=headers)


@web.middleware
async def answer_preflight(request: web.Request, handler) -> web.StreamResponse:
    """OPTIONS under /dicom-web is answered here (a route for it would turn every unknown GET
    path there into 405 instead of 404)."""
    if request.method == "OPTIONS" and _is_dicomweb(request):
        return await preflight(request)
    return await handler(request)


def add_routes(app: web.Application, deps: HttpDeps) -> None:
    app.middlewares.append(answer_preflight)
    app.on_response_prepare.append(add_cors_headers)
