"""Outgoing associations to one PACS peer: connect (over TLS when configured), report why not, C-ECHO."""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

from dicomrouter.config import RouterSettings, ServerConfig, calling_ae_for
from dicomrouter.dul.dimse import us
from dicomrouter.net.tls import TLSSetupError, connecting_context
from dicomrouter.net.upper_layer import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    NO_DATASET,
    Link,
    MessageLimits,
    UpperLayerError,
    command_set,
    open_link,
)

VERIFICATION = "1.2.840.10008.1.1"
ECHO_MESSAGE_ID = 1


class PeerUnavailable(Exception):
    """The association could not be established; `status` is 'unreachable' or 'rejected'."""

    def __init__(self, status: str, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(reason)


def peer_tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """A fresh TLS context for one association with `server`, or None without a `tls:` block."""
    if server.tls is None:
        return None
    try:
        return connecting_context(server.tls)
    except TLSSetupError as exc:  # the files changed since the config was checked
        raise PeerUnavailable("unreachable", f"TLS setup for {server.name} failed: {exc}") from None


def associate_with(
    server: ServerConfig,
    router: RouterSettings,
    calling_ae: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    timeout_s: float | None = None,
    limits: MessageLimits | None = None,
    scp_roles: Sequence[str] = (),
) -> Link:
    """An association with `server` proposing `contexts` (over TLS when it has a `tls:` block), or
    PeerUnavailable saying why not. `timeout_s` replaces the connect, ACSE and send timeouts."""
    try:
        return open_link(
            server.host,
            server.port,
            calling_ae,
            server.ae_title,
            contexts,
            router.max_pdu_size,
            timeout_s or router.connect_timeout_s,
            timeout_s or router.acse_timeout_s,
            scp_roles,
            peer_tls_context(server),
            limits=limits,
            send_timeout_s=timeout_s or router.network_timeout_s,
        )
    except UpperLayerError as exc:
        raise PeerUnavailable(
            "rejected" if exc.kind == "rejected" else "unreachable", exc.reason
        ) from None


@dataclass(frozen=True)
class EchoResult:
    server: ServerConfig
    calling_ae: str
    status: str  # healthy | unreachable | rejected
    response_ms: float | None
    detail: str = ""

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"


def echo_peer(
    server: ServerConfig, router: RouterSettings, timeout_s: float | None = None
) -> EchoResult:
    """C-ECHO `server` with its echo calling AE; never raises for network trouble."""
    calling_ae = calling_ae_for(server, "echo", router)
    timeout = timeout_s or router.echo_timeout_s
    started = time.perf_counter()
    try:
        link = associate_with(
            server, router, calling_ae, [(VERIFICATION, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])], timeout
        )
    except PeerUnavailable as exc:
        return EchoResult(server, calling_ae, exc.status, None, exc.reason)
    try:
        status = _send_echo(link, timeout)
    except PeerUnavailable as exc:
        link.abort()
        return EchoResult(server, calling_ae, exc.status, None, exc.reason)
    elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
    link.release(timeout)
    if status != 0x0000:
        return EchoResult(
            server, calling_ae, "rejected", elapsed_ms, f"C-ECHO status 0x{status:04X}"
        )
    return EchoResult(server, calling_ae, "healthy", elapsed_ms)


def _send_echo(link: Link, timeout_s: float) -> int:
    """The status of one C-ECHO on `link`; PeerUnavailable when none comes."""
    context_id = link.context_for(VERIFICATION)
    if context_id is None:
        raise PeerUnavailable(
            "rejected", "the peer accepted no presentation context for Verification"
        )
    request = command_set(
        [
            (0x0002, VERIFICATION.encode("ascii")),
            (0x0100, us(0x0030)),
            (0x0110, us(ECHO_MESSAGE_ID)),
            (0x0800, us(NO_DATASET)),
        ]
    )
    deadline = time.monotonic() + timeout_s
    try:
        link.send_message(context_id, request)
        while True:
            for message in link.receive_messages(deadline - time.monotonic()):
                if message.command_field == 0x8030 and message.us(0x0120) == ECHO_MESSAGE_ID:
                    return message.status
    except TimeoutError:
        raise PeerUnavailable("unreachable", "no C-ECHO response (timeout or abort)") from None
    except UpperLayerError as exc:
        raise PeerUnavailable("unreachable", f"no C-ECHO response ({exc.reason})") from None
    except OSError as exc:
        raise PeerUnavailable("unreachable", link.layer.send_failure(exc).reason) from None
