"""DICOM TLS: DCMTK's echoscu (+tls) against the router's port, the router over TLS to a real Orthanc."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomrouter.app import RouterApp, build_app
from dicomrouter.cli.main import cli
from dicomrouter.config import load_config
from dicomrouter.pacsfarm import ORTHANC_BINARY, OrthancServer, OrthancSpec, free_ports
from tests.front.test_echo_scp import dead_port_servers, log_events, wait_for_event
from tests.support.configs import base_document, write_document
from tests.support.find_support import edit_config
from tests.support.move_support import received_sop_uids, workstation
from tests.support.orthanc_fixtures import instance_bytes, make_test_instance, write_instance
from tests.support.router_process import RouterProcess, run_dcmtk
from tests.support.scu_sockets import OUTGOING_SOCKET_HANDLERS
from tests.support.store_helpers import storescu
from tests.support.tls_certs import Identity, Pki, make_pki

ROUTER_AE = "DICOMROUTER"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def router_tls(pki: Pki, folder: Path, server: Identity | None = None, require_client_certificate: bool = True) -> dict:
    """A `router.tls` block with paths relative to the config file in `folder`."""
    server = server or pki.server
    for path in (server.certificate, server.private_key, pki.ca):
        shutil.copy(path, folder / path.name)
    return {
        "certificate": server.certificate.name,
        "private_key": server.private_key.name,
        "ca_certificates": pki.ca.name,
        "require_client_certificate": require_client_certificate,
    }


def write_config(folder: Path, servers: list[dict], tls: dict | None = None, **router) -> tuple[Path, int]:
    """A router config in `folder` with its catalog created; returns (path, router port)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_ports(1)[0]
    document = base_document(port, servers)
    document["router"].update(router)
    if tls is not None:
        document["router"]["tls"] = tls
    path = write_document(folder / "dicomrouter.yaml", document)
    result = CliRunner().invoke(cli, ["--config", str(path), "db", "upgrade"])
    assert result.exit_code == 0, result.output
    return path, port


def echoscu(port: int, identity: Identity | None, ca: Path | None, anonymous: bool = False, calling_ae: str = "WORKSTATION"):
    """DCMTK echoscu: `+tls KEY CERT`, `+tla` without a certificate, plain TCP when neither."""
    tls_args: list[str] = []
    if identity is not None:
        tls_args = ["+tls", str(identity.private_key), str(identity.certificate)]
    elif anonymous:
        tls_args = ["+tla"]
    if ca is not None:
        tls_args += ["+cf", str(ca)]
    result = run_dcmtk("echoscu", *tls_args, "-aet", calling_ae, "-aec", ROUTER_AE, "127.0.0.1", str(port), timeout=60)
    return result.returncode, result.stdout + result.stderr


def handshake_failure(router: RouterProcess, text: str, timeout: float = 30.0) -> dict:
    """The router's `tls_handshake_failed` log record whose reason contains `text`."""
    deadline = time.monotonic() + timeout
    while True:
        for record in log_events(router, "tls_handshake_failed"):
            if text in record.get("reason", ""):
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no tls_handshake_failed with {text!r}:\n{router.log_tail()}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- the router's port


@pytest.fixture(scope="module")
def tls_router(tmp_path_factory, pki) -> Iterator[RouterProcess]:
    """`dicomrouter serve` requiring client certificates; a 2 s handshake limit (acse_timeout)."""
    folder = tmp_path_factory.mktemp("tls-router")
    path, port = write_config(folder, dead_port_servers(), router_tls(pki, folder), acse_timeout=2)
    with RouterProcess(path, port) as router:
        yield router


@pytest.mark.slow
def test_dcmtk_tls_echo_succeeds(tls_router, pki):
    code, output = echoscu(tls_router.port, pki.client, pki.ca)
    assert code == 0, output
    wait_for_event(tls_router, "association_accepted", calling_ae="WORKSTATION")


@pytest.mark.slow
def test_plain_tcp_to_the_tls_port_fails_and_the_router_keeps_serving(tls_router, pki):
    code, output = echoscu(tls_router.port, None, None)
    assert code != 0, output
    record = handshake_failure(tls_router, "does not speak TLS")
    assert record["address"] == "127.0.0.1"
    code, output = echoscu(tls_router.port, pki.client, pki.ca)
    assert code == 0, output


@pytest.mark.slow
def test_a_silent_connection_neither_blocks_the_port_nor_stays_open(tls_router, pki):
    with socket.create_connection(("127.0.0.1", tls_router.port)) as silent:
        # While it says nothing, others get through: the handshake is not in the accept loop.
        code, output = echoscu(tls_router.port, pki.client, pki.ca)
        assert code == 0, output
        silent.settimeout(60)
        assert silent.recv(16) == b""  # closed by the router after acse_timeout
    handshake_failure(tls_router, "no TLS handshake in time")


@pytest.mark.slow
def test_client_certificate_from_another_ca_fails(tls_router, pki):
    code, output = echoscu(tls_router.port, pki.other_client, pki.ca)
    assert code != 0, output
    handshake_failure(tls_router, "unable to get local issuer certificate")


@pytest.mark.slow
def test_expired_client_certificate_fails(tls_router, pki):
    code, output = echoscu(tls_router.port, pki.expired_client, pki.ca)
    assert code != 0, output
    handshake_failure(tls_router, "certificate has expired")


@pytest.mark.slow
def test_no_client_certificate_fails_when_required(tls_router, pki):
    code, output = echoscu(tls_router.port, None, pki.ca, anonymous=True)
    assert code != 0, output
    handshake_failure(tls_router, "no client certificate")


@pytest.mark.slow
def test_client_that_does_not_trust_the_router_fails(tls_router, pki):
    code, output = echoscu(tls_router.port, pki.client, pki.other_ca)
    assert code != 0
    assert "certificate verify failed" in output


def start_in_process(folder: Path, tls: dict) -> RouterApp:
    path, _port = write_config(folder, dead_port_servers(), tls)
    app = build_app(load_config(path), host="127.0.0.1", port=0, watch_file=False)
    app.start()
    return app


@pytest.mark.slow
def test_expired_router_certificate_fails(tmp_path, pki):
    app = start_in_process(tmp_path, router_tls(pki, tmp_path, server=pki.expired_server))
    try:
        code, output = echoscu(app.front.bound_port, pki.client, pki.ca)
        assert code != 0
        assert "certificate verify failed" in output
    finally:
        app.stop(drain_timeout_s=5)


@pytest.mark.slow
def test_optional_client_certificate(tmp_path, pki):
    """Without require_client_certificate: no certificate is fine, a certificate must still verify."""
    app = start_in_process(tmp_path, router_tls(pki, tmp_path, require_client_certificate=False))
    try:
        port = app.front.bound_port
        code, output = echoscu(port, None, pki.ca, anonymous=True)
        assert code == 0, output
        code, output = echoscu(port, pki.client, pki.ca)
        assert code == 0, output
        code, output = echoscu(port, pki.other_client, pki.ca)
        assert code != 0, output
    finally:
        app.stop(drain_timeout_s=5)


def client_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.client.certificate, pki.client.private_key)
    return context


def test_tls_sockets_have_tcp_nodelay(tmp_path, pki):
    """pynetdicom client over TLS: both ends are TLS sockets with Nagle off, and echoes work."""
    app = start_in_process(tmp_path, router_tls(pki, tmp_path))
    try:
        client = AE(ae_title="WORKSTATION")
        client.add_requested_context(Verification)
        assoc = client.associate(
            "127.0.0.1",
            app.front.bound_port,
            ae_title=ROUTER_AE,
            tls_args=(client_context(pki), "127.0.0.1"),
            evt_handlers=OUTGOING_SOCKET_HANDLERS,
        )
        assert assoc.is_established
        try:
            (accepted,) = app.front.table.everyone()
            for sock in (accepted.sock, assoc.dul.socket.socket):
                assert isinstance(sock, ssl.SSLSocket)
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            for _ in range(3):
                status = assoc.send_c_echo()
                assert status and status.Status == 0x0000
        finally:
            assoc.release()
    finally:
        app.stop(drain_timeout_s=5)


# --------------------------------------------------------------------------- config validation


def config_check(folder: Path, tls: dict, server_tls: dict | None = None):
    servers = dead_port_servers()
    if server_tls is not None:
        servers[0]["tls"] = server_tls
    document = base_document(free_ports(1)[0], servers)
    document["router"]["tls"] = tls
    path = write_document(folder / "dicomrouter.yaml", document)
    return CliRunner().invoke(cli, ["--config", str(path), "config", "check"])


def test_config_relative_tls_paths_load(tmp_path, pki):
    result = config_check(tmp_path, router_tls(pki, tmp_path), {"ca_certificates": "ca.crt"})
    assert result.exit_code == 0, result.output
    config = load_config(tmp_path / "dicomrouter.yaml")
    assert config.router.tls.certificate == tmp_path / "server.crt"
    assert config.servers[0].tls.ca_certificates == tmp_path / "ca.crt"


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"certificate": "missing.crt"}, "router.tls.certificate", "file not found"),
        ({"private_key": "other-client.key"}, "router.tls.private_key", "is not the key of"),
        ({"certificate": "ca.key.txt"}, "router.tls.certificate", "holds no PEM certificate"),
        ({"ca_certificates": None}, "router.tls.ca_certificates", "required when require_client_certificate"),
        ({"private_key": None}, "router.tls.private_key", "is required"),
    ],
)
def test_config_tls_errors_name_the_key(tmp_path, pki, change, key, words):
    tls = router_tls(pki, tmp_path)
    shutil.copy(pki.other_client.private_key, tmp_path)
    (tmp_path / "ca.key.txt").write_text("not a certificate\n")
    tls.update(change)
    tls = {name: value for name, value in tls.items() if value is not None}
    result = config_check(tmp_path, tls)
    assert result.exit_code == 2, result.output
    assert key in result.output and words in result.output
    assert "fix:" in result.output


def test_config_server_tls_errors(tmp_path, pki):
    result = config_check(
        tmp_path,
        router_tls(pki, tmp_path),
        {"ca_certificates": "nowhere/ca.crt", "require_client_certificate": True},
    )
    assert result.exit_code == 2, result.output
    assert "servers[0].tls.ca_certificates" in result.output
    assert "servers[0].tls.require_client_certificate" in result.output


# --------------------------------------------------------------------------- the router towards a TLS PACS


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory, pki) -> Iterator[OrthancServer]:
    """A real Orthanc with DICOM TLS on, requiring a client certificate from our CA."""
    if not ORTHANC_BINARY.exists():
        pytest.skip(f"Orthanc is not installed ({ORTHANC_BINARY})")
    dicom_port, http_port = free_ports(2)
    server = OrthancServer(
        OrthancSpec("TLS PACS", "TLS_PACS", dicom_port, http_port),
        tmp_path_factory.mktemp("tls-orthanc"),
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.server.certificate),
            "DicomTlsPrivateKey": str(pki.server.private_key),
            "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def tls_pacs_config(folder: Path, orthanc: OrthancServer, tls: dict | None) -> tuple[Path, int]:
    server = {"name": "TLS PACS", "ae_title": "TLS_PACS", "host": "127.0.0.1", "port": orthanc.spec.dicom_port,
              "environment": "test", "active": True, "primary": True, "deleted": False}
    if tls is not None:
        server["tls"] = tls
    return write_config(folder, [server])


def dicomrouter(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicomrouter", "--config", str(path), *args], capture_output=True, text=True, timeout=120
    )


def our_identity(pki: Pki) -> dict:
    return {"certificate": str(pki.client.certificate), "private_key": str(pki.client.private_key),
            "ca_certificates": str(pki.ca)}


@pytest.mark.slow
def test_echo_over_tls_to_orthanc(tmp_path, pki, tls_orthanc):
    path, _port = tls_pacs_config(tmp_path, tls_orthanc, our_identity(pki))
    result = dicomrouter(path, "echo", "TLS PACS")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


@pytest.mark.slow
def test_echo_fails_clearly_when_the_ca_does_not_match(tmp_path, pki, tls_orthanc):
    path, _port = tls_pacs_config(tmp_path, tls_orthanc, {**our_identity(pki), "ca_certificates": str(pki.other_ca)})
    result = dicomrouter(path, "echo", "TLS PACS")
    assert result.returncode == 1
    assert f"TLS with 127.0.0.1:{tls_orthanc.spec.dicom_port} failed" in result.stdout
    assert "certificate not accepted: " in result.stdout  # OpenSSL words it by what the peer sent


@pytest.mark.slow
def test_echo_without_our_certificate_fails_clearly(tmp_path, pki, tls_orthanc):
    path, _port = tls_pacs_config(tmp_path, tls_orthanc, {"ca_certificates": str(pki.ca)})
    result = dicomrouter(path, "echo", "TLS PACS")
    assert result.returncode == 1
    assert "TLS with" in result.stdout and "client certificate" in result.stdout, result.stdout


@pytest.mark.slow
def test_plain_echo_to_a_tls_pacs_fails(tmp_path, tls_orthanc):
    path, _port = tls_pacs_config(tmp_path, tls_orthanc, None)
    result = dicomrouter(path, "echo", "TLS PACS")
    assert result.returncode == 1
    assert "unreachable" in result.stdout


@pytest.mark.slow
def test_store_forwarding_and_find_over_tls(tmp_path, pki, tls_orthanc):
    """A plain C-STORE into the router is forwarded over TLS; the federated C-FIND goes over TLS too."""
    tls_orthanc.delete_all()
    path, port = tls_pacs_config(tmp_path, tls_orthanc, our_identity(pki))
    instance = make_test_instance(patient_id="TLS0001", patient_name="Tls^Patient")
    file = write_instance(tmp_path / "in" / "ct.dcm", instance)
    with RouterProcess(path, port) as router:
        result = storescu(port, [str(file)])
        assert result.returncode == 0, result.stdout + result.stderr
        assert tls_orthanc.wait_for_instance_count(1, timeout=60) == 1, router.log_tail()
    assert tls_orthanc.instance_sop_uids() == [str(instance.SOPInstanceUID)]
    found = dicomrouter(path, "find", "-k", "PatientID=TLS0001", "-k", "StudyInstanceUID")
    assert found.returncode == 0, found.stdout + found.stderr
    assert str(instance.StudyInstanceUID) in found.stdout
    assert "TLS PACS" in found.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tls", "words"),
    [
        ({"ca_certificates": "other"}, "certificate not accepted"),
        # The peer's alert says so, unless its reset overtook the alert: then our guess says so.
        ({"certificate": None, "private_key": None}, "client certificate"),
    ],
)
def test_federated_find_reports_tls_failures(tmp_path, pki, tls_orthanc, tls, words):
    settings = {**our_identity(pki), **tls}
    if settings["ca_certificates"] == "other":
        settings["ca_certificates"] = str(pki.other_ca)
    settings = {name: value for name, value in settings.items() if value is not None}
    path, _port = tls_pacs_config(tmp_path, tls_orthanc, settings)
    found = dicomrouter(path, "find", "-k", "PatientID=NOBODY")
    output = found.stdout + found.stderr
    assert "TLS" in output and words in output, output


@pytest.mark.slow
def test_relay_move_retrieves_from_a_tls_pacs(tmp_path, pki, tls_orthanc):
    """The relay route's C-GET (the lean upper layer) goes over TLS; the workstation gets it in plain."""
    tls_orthanc.delete_all()
    instance = make_test_instance(patient_id="TLS0002", patient_name="Tls^Relay")
    tls_orthanc.upload(instance_bytes(instance))
    path, _port = tls_pacs_config(tmp_path, tls_orthanc, our_identity(pki))
    workstation_port = free_ports(1)[0]
    edit_config(path, lambda document: document["clients"][0].update(port=workstation_port))
    with workstation(workstation_port, tmp_path / "ws") as folder:
        result = dicomrouter(path, "move", str(instance.StudyInstanceUID), "--to", "WORKSTATION", "--from", "TLS PACS")
    assert result.returncode == 0, result.stdout + result.stderr
    assert received_sop_uids(folder) == {str(instance.SOPInstanceUID)}
