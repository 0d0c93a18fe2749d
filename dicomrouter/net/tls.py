"""DICOM TLS: SSL contexts for the router's port and for servers with a `tls:` block.

Both sides use TLS 1.2 or newer. Certificates and keys are PEM files; errors name the config
field (``certificate``, ``private_key``, ``ca_certificates``) so config.py can report the key path.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicomrouter.config import TLSConfig


class TLSSetupError(Exception):
    """A TLS file that is missing or does not load; `field` is the config key inside `tls`."""

    def __init__(self, field: str, message: str, fix: str = ""):
        self.field = field
        self.message = message
        self.fix = fix
        super().__init__(f"tls.{field}: {message}")


def pending_alert(sock: ssl.SSLSocket, error: OSError) -> OSError:
    """After a failed send, the peer's TLS alert if one is still waiting: it says more than the
    broken pipe. (A reset from the peer may have taken it away.)"""
    try:
        sock.settimeout(1.0)
        ssl.SSLSocket.recv(sock, 1)
    except ssl.SSLError as alert:
        return alert
    except (OSError, ValueError):
        pass
    return error


# --------------------------------------------------------------------------- loading files


def _read_pem(path: Path, field: str, marker: str, what: str) -> str:
    if path.is_dir():
        raise TLSSetupError(field, f"{path} is a folder", f"give the {what} PEM file itself")
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise TLSSetupError(field, f"file not found: {path}", "fix the path (relative paths start at the config file's folder)") from None
    except OSError as exc:
        raise TLSSetupError(field, f"cannot read {path}: {exc.strerror or exc}", "make it readable by the router's user") from None
    if marker not in text:
        raise TLSSetupError(field, f"{path} holds no PEM {what}", f"give a PEM file with a '-----BEGIN {marker}' block")
    return text


def _load_identity(context: ssl.SSLContext, tls: TLSConfig) -> None:
    """Load the certificate chain and its private key, naming the culprit when they don't load."""
    assert tls.certificate is not None and tls.private_key is not None
    _read_pem(tls.certificate, "certificate", "CERTIFICATE-----", "certificate")
    key_text = _read_pem(tls.private_key, "private_key", "PRIVATE KEY-----", "private key")
    if "ENCRYPTED" in key_text:
        raise TLSSetupError(
            "private_key",
            f"{tls.private_key} is protected by a passphrase, which the router cannot ask for",
            "store the key unencrypted (openssl pkey -in KEY -out KEY.plain), readable only by the router's user",
        )
    try:
        # A password callback, so that OpenSSL never prompts on the terminal.
        context.load_cert_chain(tls.certificate, tls.private_key, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSSetupError(
                "private_key", f"{tls.private_key} is not the key of {tls.certificate}", "give the matching key"
            ) from None
        raise TLSSetupError(
            "certificate", f"{tls.certificate} with key {tls.private_key} does not load: {_ssl_text(exc)}", "check both PEM files"
        ) from None


def _load_ca(context: ssl.SSLContext, path: Path) -> None:
    _read_pem(path, "ca_certificates", "CERTIFICATE-----", "CA certificate")
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TLSSetupError("ca_certificates", f"{path} does not load: {_ssl_text(exc)}", "give PEM CA certificates") from None


def listening_context(tls: TLSConfig) -> ssl.SSLContext:
    """The router's port: its certificate, and the CA its callers' certificates must come from."""
    if tls.certificate is None or tls.private_key is None:
        missing = "certificate" if tls.certificate is None else "private_key"
        raise TLSSetupError(missing, "is required for TLS on the router's port", "add `certificate:` and `private_key:` (PEM files)")
    if tls.require_client_certificate and tls.ca_certificates is None:
        raise TLSSetupError(
            "ca_certificates",
            "is required when require_client_certificate is true",
            "give the CA that signs the callers' certificates",
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(context, tls)
    if tls.ca_certificates is not None:
        _load_ca(context, tls.ca_certificates)
        # Without require_client_certificate a caller may come without one, but one it presents must verify.
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def connecting_context(tls: TLSConfig) -> ssl.SSLContext:
    """Towards one server: verify it (its CA, or the system's), show our certificate if configured."""
    if (tls.certificate is None) != (tls.private_key is None):
        missing = "certificate" if tls.certificate is None else "private_key"
        raise TLSSetupError(missing, "is required with the other one", "give both `certificate:` and `private_key:`, or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_certificates is not None:
        _load_ca(context, tls.ca_certificates)
    else:
        context.load_default_certs()
    if tls.certificate is not None:
        _load_identity(context, tls)
    return context


def check_tls_files(tls: TLSConfig, listening: bool) -> None:
    """Raise TLSSetupError unless the files of `tls` load (config validation)."""
    if listening:
        listening_context(tls)
    else:
        connecting_context(tls)


# --------------------------------------------------------------------------- errors in words

_ALERTS = {
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS on this port (plain TCP?)",
    "HTTP_REQUEST": "the peer does not speak TLS on this port (plain TCP?)",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection during the TLS handshake",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no client certificate, and one is required",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA of our certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate has expired",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common (the router needs TLS 1.2 or newer)",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "no cipher or TLS version in common",
    "NO_SHARED_CIPHER": "no cipher in common",
}


def _ssl_text(exc: ssl.SSLError) -> str:
    return exc.reason or exc.strerror or str(exc)


def describe_tls_error(exc: BaseException) -> str:
    """Why a TLS handshake failed, in words an admin can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {exc.verify_message or _ssl_text(exc)}"
    if isinstance(exc, ssl.SSLError):
        words = _ALERTS.get(exc.reason or "")
        return f"{words} ({exc.reason})" if words else _ssl_text(exc)
    if isinstance(exc, TimeoutError):
        return "no TLS handshake in time (a plain TCP client, or a silent one)"
    if isinstance(exc, ConnectionError):
        return "the peer closed the connection during the TLS handshake"
    return str(exc)


def describe_peer_tls_error(exc: BaseException) -> str:
    """Why TLS towards a server failed: like describe_tls_error, with a guess for a silent hang-up."""
    reason = getattr(exc, "reason", None) or ""
    if isinstance(exc, ssl.SSLEOFError | ConnectionError) or "EOF" in reason:
        return "the peer closed the TLS connection without saying why (does it require a client certificate, or refuse ours?)"
    return describe_tls_error(exc)


def complete_handshake(sock: ssl.SSLSocket, timeout_s: float) -> BaseException | None:
    """Run the server side of the handshake on an accepted socket; the error, or None."""
    previous = sock.gettimeout()
    sock.settimeout(timeout_s)
    try:
        sock.do_handshake()
    except (OSError, ValueError) as exc:  # ssl.SSLError, timeout, reset, or closed
        return exc
    finally:
        try:
            sock.settimeout(previous)
        except OSError:
            pass
    return None


def peer_subject(sock: socket.socket) -> str | None:
    """The common name of the peer's verified certificate, if it sent one."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    certificate = sock.getpeercert()
    for rdn in (certificate or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return None
