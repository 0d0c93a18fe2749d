"""The HTTP port of a real `dicomrouter serve`: tokens made by the CLI, health endpoints, clean stop."""

from __future__ import annotations

import hashlib
import re

import pytest

from dicomrouter.config import load_config
from dicomrouter.pacsfarm import free_ports
from tests.conftest import upgrade_catalog
from tests.support.configs import base_document, write_document
from tests.support.http_support import http_request
from tests.support.router_process import RouterProcess, wait_for_port


@pytest.fixture
def http_router(tmp_path):
    dicom_port, http_port = free_ports(2)
    document = base_document(dicom_port)
    document["router"]["http"] = {"host": "127.0.0.1", "port": http_port}
    document["clients"].append({"ae_title": "ADMIN_DESK", "roles": ["admin"]})
    path = write_document(tmp_path / "dicomrouter.yaml", document)
    upgrade_catalog(path)
    router = RouterProcess(path, dicom_port)
    try:
        yield router, f"http://127.0.0.1:{http_port}"
    finally:
        router.stop()


def test_clients_token_prints_once_and_stores_only_the_hash(http_router):
    router, _url = http_router
    result = router.cli("clients", "token", "ADMIN_DESK")
    assert result.returncode == 0, result.stderr
    token = re.search(r"store it now\): (\S+)", result.stdout).group(1)
    text = router.config_path.read_text()
    assert token not in text
    assert (
        load_config(router.config_path).client("ADMIN_DESK").http_token_sha256
        == hashlib.sha256(token.encode()).hexdigest()
    )
    assert router.cli("clients", "token", "NOBODY").returncode == 1
    audit = router.cli("audit", "--json")
    assert "new HTTP token for client 'ADMIN_DESK'" in audit.stdout and token not in audit.stdout


def test_health_endpoints_of_a_running_router(http_router):
    router, url = http_router
    router.start()
    wait_for_port(int(url.rsplit(":", 1)[1]))
    reply = http_request(url + "/healthz")
    assert reply.status == 200 and reply.json()["pid"] == router.process.pid
    reply = http_request(url + "/readyz")
    assert reply.status == 200, reply.text
    assert router.stop() == 0
    assert '"http_stopped"' in router.log_text()
