"""CORS on a real `dicomrouter serve`: a viewer served from another origin may call /dicom-web.

What chromium sent and needed when OHIF v2 (served from its own port) was pointed at the router
(scripts/viewer_check.py): a preflight OPTIONS without credentials before each request carrying
Authorization, then the request itself, whose answer must name the origin."""

from __future__ import annotations

import requests

from dicomrouter.http.auth import new_token
from dicomrouter.pacsfarm import free_ports
from tests.conftest import upgrade_catalog
from tests.support.configs import base_document, write_document
from tests.support.router_process import RouterProcess, wait_for_port

VIEWER_ORIGIN = "http://viewer.example:3000"
TOKEN, TOKEN_SHA = new_token()


def _serve(tmp_path):
    dicom_port, http_port, dead_port = free_ports(3)
    servers = [
        {"name": "Test PACS 1", "ae_title": "TEST_PACS_1", "host": "127.0.0.1", "port": dead_port,
         "environment": "test", "active": True, "primary": True, "deleted": False},
    ]  # fmt: skip
    document = base_document(dicom_port, servers)
    document["router"]["http"] = {
        "host": "127.0.0.1",
        "port": http_port,
        "cors_origins": [VIEWER_ORIGIN],
    }
    document["clients"].append(
        {"ae_title": "VIEWER", "roles": ["test_read", "admin"], "http_token_sha256": TOKEN_SHA}
    )
    path = write_document(tmp_path / "dicomrouter.yaml", document)
    upgrade_catalog(path)
    router = RouterProcess(path, dicom_port).start()
    wait_for_port(http_port)
    return router, f"http://127.0.0.1:{http_port}"


def test_preflight_and_answers_carry_cors_for_the_configured_origin_only(tmp_path):
    router, url = _serve(tmp_path)
    try:
        frames = f"{url}/dicom-web/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5/frames/1"
        preflight = requests.options(
            frames,
            headers={
                "Origin": VIEWER_ORIGIN,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization,accept",
            },
            timeout=10,
        )
        # No credentials on a preflight, and none needed.
        assert preflight.status_code == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
        assert "GET" in preflight.headers["Access-Control-Allow-Methods"]
        assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
        assert "Origin" in preflight.headers["Vary"]

        elsewhere = requests.options(
            f"{url}/dicom-web/studies",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
            timeout=10,
        )
        assert elsewhere.status_code == 403
        assert "Access-Control-Allow-Origin" not in elsewhere.headers

        # A refusal reaches the viewer's script too (it can tell "log in" from "network error").
        anonymous = requests.get(
            f"{url}/dicom-web/studies", headers={"Origin": VIEWER_ORIGIN}, timeout=10
        )
        assert anonymous.status_code == 401
        assert anonymous.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
        assert "WWW-Authenticate" in anonymous.headers["Access-Control-Expose-Headers"]

        # The only PACS is down: 502 with a Warning naming it, which the script may read.
        failed = requests.get(
            f"{url}/dicom-web/studies",
            headers={"Origin": VIEWER_ORIGIN, "Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        assert failed.status_code == 502 and "Test PACS 1" in failed.headers["Warning"]
        assert failed.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
        assert "Warning" in failed.headers["Access-Control-Expose-Headers"]

        # Paths the router does not serve stay 404 for every method but OPTIONS.
        unknown = requests.get(
            f"{url}/dicom-web/studies/1.2.3/rendered", headers={"Origin": VIEWER_ORIGIN}, timeout=10
        )
        assert unknown.status_code == 404

        # The admin API stays same-origin, even for an allowed origin with an admin's token.
        api = requests.get(
            f"{url}/api/servers",
            headers={"Origin": VIEWER_ORIGIN, "Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert api.status_code == 200 and "Access-Control-Allow-Origin" not in api.headers
    finally:
        router.stop()
    assert '"cors_refused"' in router.log_text() and "http://evil.example" in router.log_text()
