"""Who an HTTP request acts as: a configured client, by its token (Basic or Bearer)."""

from __future__ import annotations

import base64
import binascii
import hmac

from aiohttp import web

from dicomrouter.config import Config
from dicomrouter.http.deps import DEPS
from dicomrouter.http.tokens import new_token as new_token  # tests and older imports
from dicomrouter.http.tokens import token_sha256
from dicomrouter.logging import get_logger
from dicomrouter.routing.access import Caller

log = get_logger(__name__)

REALM = "dicomrouter"

# Resolved once per request: the client (or None) and why there is none.
_CALLER = web.RequestKey("dicomrouter.caller", Caller | None)
_PROBLEM = web.RequestKey("dicomrouter.auth_problem", str)


def _matches(token: str, expected_sha256: str | None) -> bool:
    return expected_sha256 is not None and hmac.compare_digest(token_sha256(token), expected_sha256)


def authenticate(
    config: Config, authorization: str | None, address: str
) -> tuple[Caller | None, str]:
    """The client an Authorization header names, or None and why not."""
    if not authorization:
        return None, "no credentials"
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        for client in config.clients:
            if _matches(value, client.http_token_sha256):
                return Caller(
                    client.ae_title, address, "client", client.roles, client=client
                ), "token"
        return None, "unknown token"
    if scheme.lower() == "basic" and value:
        try:
            user, sep, password = (
                base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return None, "malformed Basic credentials"
        if not sep:
            return None, "malformed Basic credentials"
        client = config.client(user.strip())
        if client is None or not _matches(password, client.http_token_sha256):
            return None, f"wrong AE title or token for {user.strip()[:16]!r}"
        return Caller(client.ae_title, address, "client", client.roles, client=client), "basic"
    return None, f"unsupported authorization scheme {scheme[:20]!r}"


def client_of(request: web.Request) -> Caller | None:
    """The authenticated client, or None (no refusal); authenticates once per request."""
    if _CALLER not in request:
        config = request.app[DEPS].holder.current
        caller, problem = authenticate(
            config, request.headers.get("Authorization"), request.remote or ""
        )
        request[_CALLER] = caller
        request[_PROBLEM] = problem
    return request[_CALLER]


def _audit(request: web.Request, outcome: str, detail: str, calling_ae: str | None = None) -> None:
    request.app[DEPS].audit.record(
        "http",
        outcome,
        calling_ae=calling_ae,
        address=request.remote,
        detail=f"{request.method} {request.path}: {detail}",
    )
    log.info(
        "http_refused",
        outcome=outcome,
        calling_ae=calling_ae,
        address=request.remote,
        method=request.method,
        path=request.path,
        reason=detail,
    )


def require_client(request: web.Request) -> Caller:
    """The authenticated client; otherwise 401 with WWW-Authenticate (audited)."""
    caller = client_of(request)
    if caller is None:
        reason = request[_PROBLEM]
        _audit(request, "unauthorized", reason)
        raise web.HTTPUnauthorized(
            headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
            text="credentials required: Basic (AE title, token) or Bearer token\n",
        )
    return caller


def require_role(request: web.Request, *roles: str) -> Caller:
    """The authenticated client holding one of `roles`; 401 without credentials, 403 without the role."""
    caller = require_client(request)
    if not caller.roles.intersection(roles):
        _audit(request, "forbidden", f"needs role {' or '.join(roles)}", calling_ae=caller.ae_title)
        raise web.HTTPForbidden(
            text=f"client {caller.ae_title} lacks the role {' or '.join(roles)}\n"
        )
    return caller
