"""The HTTP port's listener and client authentication, over real HTTP on a free port."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from aiohttp import web

from dicomrouter.config import HttpSettings, parse_config
from dicomrouter.http import health
from dicomrouter.http.auth import authenticate, new_token, require_role, token_sha256
from dicomrouter.http.deps import HttpDeps
from dicomrouter.http.server import HttpFront, HttpListenError, make_http_app
from dicomrouter.reload import ConfigHolder
from tests.support.configs import base_document
from tests.support.http_support import basic, bearer, http_request

ADMIN_TOKEN, ADMIN_HASH = new_token()
READER_TOKEN, READER_HASH = new_token()


class RecordedAudit:
    """Keeps the rows the handlers record, as AuditTrail.record takes them."""

    def __init__(self):
        self.rows: list[tuple[str, str, dict]] = []

    def record(self, operation: str, outcome: str, **fields) -> None:
        self.rows.append((operation, outcome, fields))


def make_config(tmp_path: Path):
    document = base_document()
    document["router"]["http"] = {"host": "127.0.0.1", "port": 18080}
    document["clients"] += [
        {"ae_title": "ADMIN_DESK", "roles": ["admin"], "http_token_sha256": ADMIN_HASH},
        {"ae_title": "READER", "roles": ["test_read"], "http_token_sha256": READER_HASH.upper()},
    ]
    return parse_config(document, tmp_path / "router.yaml")


def test_config_reads_http_block_and_token_hashes(tmp_path):
    config = make_config(tmp_path)
    assert config.router.http == HttpSettings(host="127.0.0.1", port=18080, tls=None)
    assert config.client("READER").http_token_sha256 == READER_HASH  # kept lower-case
    assert config.client("WORKSTATION").http_token_sha256 is None
    assert parse_config(base_document(), tmp_path / "r.yaml").router.http is None


def test_config_refuses_a_bad_token_hash_naming_the_key(tmp_path):
    document = base_document()
    document["clients"][0]["http_token_sha256"] = "not-a-hash"
    with pytest.raises(Exception) as info:
        parse_config(document, tmp_path / "router.yaml")
    assert "clients[0].http_token_sha256" in str(info.value)
    assert "clients token" in str(info.value)


def test_authenticate_basic_and_bearer(tmp_path):
    config = make_config(tmp_path)
    caller, how = authenticate(
        config, basic("ADMIN_DESK", ADMIN_TOKEN)["Authorization"], "10.0.0.1"
    )
    assert (caller.ae_title, caller.roles, caller.address, how) == (
        "ADMIN_DESK",
        frozenset({"admin"}),
        "10.0.0.1",
        "basic",
    )
    caller, how = authenticate(config, f"Bearer {READER_TOKEN}", "10.0.0.1")
    assert caller.ae_title == "READER" and how == "token"
    # The token of one client with another's AE title is refused.
    assert authenticate(config, basic("ADMIN_DESK", READER_TOKEN)["Authorization"], "x")[0] is None
    assert authenticate(config, basic("WORKSTATION", "")["Authorization"], "x")[0] is None
    assert authenticate(config, "Bearer nope", "x") == (None, "unknown token")
    assert authenticate(config, None, "x") == (None, "no credentials")
    garbage = "Basic " + base64.b64encode(b"no colon").decode()
    assert authenticate(config, garbage, "x")[0] is None
    assert authenticate(config, "Basic %%%", "x")[0] is None
    assert token_sha256(ADMIN_TOKEN) == ADMIN_HASH


@pytest.fixture
def served(tmp_path):
    """The HTTP app with health routes and one admin-only route, listening on a free port."""
    audit = RecordedAudit()
    deps = HttpDeps(ConfigHolder(make_config(tmp_path)), audit)

    def add_admin_route(app: web.Application, _deps: HttpDeps) -> None:
        async def secret(request: web.Request) -> web.Response:
            caller = require_role(request, "admin")
            return web.json_response({"ae_title": caller.ae_title, "roles": sorted(caller.roles)})

        app.router.add_get("/secret", secret)

    front = HttpFront(
        make_http_app(deps, [health.add_routes, add_admin_route]), HttpSettings(port=0)
    )
    host, port = front.start()
    try:
        yield f"http://{host}:{port}", audit, front
    finally:
        front.stop()


def test_401_403_and_200_over_http_each_refusal_audited(served):
    url, audit, _front = served
    reply = http_request(url + "/secret")
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"].startswith("Basic realm=")
    reply = http_request(url + "/secret", bearer("wrong"))
    assert reply.status == 401
    reply = http_request(url + "/secret", bearer(READER_TOKEN))
    assert reply.status == 403
    reply = http_request(url + "/secret", basic("ADMIN_DESK", ADMIN_TOKEN))
    assert reply.status == 200 and reply.json() == {"ae_title": "ADMIN_DESK", "roles": ["admin"]}
    assert http_request(url + "/secret", bearer(ADMIN_TOKEN)).status == 200
    outcomes = [(op, outcome, fields.get("calling_ae")) for op, outcome, fields in audit.rows]
    assert outcomes == [
        ("http", "unauthorized", None),
        ("http", "unauthorized", None),
        ("http", "forbidden", "READER"),
    ]
    assert (
        "GET /secret" in audit.rows[0][2]["detail"] and audit.rows[0][2]["address"] == "127.0.0.1"
    )
    assert "unknown token" in audit.rows[1][2]["detail"]


def test_healthz_needs_no_credentials(served):
    url, audit, _front = served
    reply = http_request(url + "/healthz")
    assert reply.status == 200 and reply.json()["status"] == "ok"
    assert http_request(url + "/readyz").status == 200  # nothing to check in this app
    assert audit.rows == []


def test_stop_closes_the_port_and_a_busy_port_is_named(served, tmp_path):
    url, _audit, front = served
    port = front.address[1]
    other = HttpFront(
        make_http_app(HttpDeps(ConfigHolder(make_config(tmp_path)), RecordedAudit()), []),
        HttpSettings(host="127.0.0.1", port=port),
    )
    with pytest.raises(HttpListenError, match=f"127.0.0.1:{port}"):
        other.start()
    front.stop()
    assert not front.running
    with pytest.raises(OSError):
        http_request(url + "/healthz", timeout=2)


def test_https_with_router_http_tls_and_config_errors_name_the_key(tmp_path):
    import ssl

    from tests.support.tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    document = base_document()
    document["router"]["http"] = {
        "port": 18443,
        "tls": {
            "certificate": str(pki.server.certificate),
            "private_key": str(pki.server.private_key),
        },
    }
    config = parse_config(document, tmp_path / "router.yaml")
    front = HttpFront(
        make_http_app(HttpDeps(ConfigHolder(config), RecordedAudit()), [health.add_routes]),
        config.router.http,
        port=0,
    )
    host, port = front.start()
    try:
        context = ssl.create_default_context(cafile=str(pki.ca))
        reply = http_request(f"https://{host}:{port}/healthz", context=context)
        assert reply.status == 200
        with pytest.raises(OSError):  # plain HTTP on the HTTPS port gets no answer
            http_request(f"http://{host}:{port}/healthz", timeout=3)
    finally:
        front.stop()
    document["router"]["http"]["tls"]["private_key"] = str(tmp_path / "missing.key")
    document["router"]["log"] = {"level": "loud"}
    with pytest.raises(Exception) as info:
        parse_config(document, tmp_path / "router.yaml")
    assert "router.http.tls.private_key" in str(info.value) and "router.log.level" in str(
        info.value
    )


def test_readyz_names_what_is_wrong(tmp_path):
    import shutil as shell

    from dicomrouter.catalog.db import make_engine, session_factory
    from dicomrouter.catalog.queries import Catalog
    from dicomrouter.store.spool import Spool

    class StoppedFront:
        running = False

        def active_associations(self) -> int:
            return 0

    spool = Spool(tmp_path / "spool")
    shell.rmtree(spool.tmp)  # nothing can be written there any more
    unreachable = Catalog(
        session_factory(make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none"))
    )
    deps = HttpDeps(
        ConfigHolder(make_config(tmp_path)),
        RecordedAudit(),
        catalog=unreachable,
        spool=spool,
        front=StoppedFront(),
    )
    front = HttpFront(make_http_app(deps, [health.add_routes]), HttpSettings(port=0))
    host, port = front.start()
    try:
        reply = http_request(f"http://{host}:{port}/readyz")
        assert reply.status == 503
        problems = reply.json()["problems"]
        assert set(problems) == {"catalog", "spool", "dicom"}, problems
        assert "does not answer" in problems["catalog"] and str(spool.tmp) in problems["spool"]
        assert http_request(f"http://{host}:{port}/healthz").status == 200
    finally:
        front.stop()
