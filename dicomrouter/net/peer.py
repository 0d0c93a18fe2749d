"""Outgoing associations to one PACS peer: connect, report why not, C-ECHO."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.sop_class import Verification

from dicomrouter.config import RouterSettings, ServerConfig, calling_ae_for
from dicomrouter.net.sockets import OUTGOING_SOCKET_HANDLERS
from dicomrouter.net.tls import (
    PeerTLSContext,
    TLSSetupError,
    connecting_context,
    describe_peer_tls_error,
)
from dicomrouter.net.upper_layer import describe_reject


class PeerUnavailable(Exception):
    """The association could not be established; `status` is 'unreachable' or 'rejected'."""

    def __init__(self, status: str, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(reason)


def reject_reason(assoc: Association) -> str:
    """Readable reason of an A-ASSOCIATE-RJ."""
    primitive = assoc.acceptor.primitive
    if primitive is None:
        return "association rejected"
    return describe_reject(primitive.result, primitive.result_source, primitive.diagnostic)


def make_ae(
    calling_ae: str, router: RouterSettings, contexts: Sequence[tuple[str, Sequence[str]]] = ()
) -> AE:
    """An SCU application entity with the router's timeouts."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = router.acse_timeout_s
    ae.dimse_timeout = router.dimse_timeout_s
    ae.network_timeout = router.network_timeout_s
    ae.connection_timeout = router.connect_timeout_s
    ae.maximum_pdu_size = router.max_pdu_size
    for abstract_syntax, transfer_syntaxes in contexts:
        ae.add_requested_context(abstract_syntax, list(transfer_syntaxes) or None)
    return ae


def peer_tls_context(server: ServerConfig) -> PeerTLSContext | None:
    """A fresh TLS context for one association with `server`, or None without a `tls:` block."""
    if server.tls is None:
        return None
    try:
        return connecting_context(server.tls)
    except TLSSetupError as exc:  # the files changed since the config was checked
        raise PeerUnavailable("unreachable", f"TLS setup for {server.name} failed: {exc}") from None


def open_association(ae: AE, server: ServerConfig, **kwargs) -> Association:
    """Associate with `server` (over TLS when it has a `tls:` block) or raise PeerUnavailable saying why."""
    tls_context = peer_tls_context(server)
    if tls_context is not None:
        kwargs["tls_args"] = (tls_context, server.host)
    connected = []
    peer_aborted = []

    def note_abort(event) -> None:
        if isinstance(event.primitive, (A_ABORT, A_P_ABORT)):
            peer_aborted.append(True)

    handlers = [
        *OUTGOING_SOCKET_HANDLERS,
        (evt.EVT_CONN_OPEN, lambda _event: connected.append(True)),
        (evt.EVT_ACSE_RECV, note_abort),
    ]
    handlers += kwargs.pop("evt_handlers", [])
    assoc = ae.associate(server.host, server.port, ae_title=server.ae_title, evt_handlers=handlers, **kwargs)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise PeerUnavailable("rejected", reject_reason(assoc))
    if tls_context is not None and tls_context.last_error is not None:
        raise PeerUnavailable(
            "unreachable", f"TLS with {server.address} failed: {describe_peer_tls_error(tls_context.last_error)}"
        )
    if not connected:
        raise PeerUnavailable("unreachable", f"cannot connect to {server.address} (refused or timed out)")
    if assoc.is_aborted and peer_aborted:
        raise PeerUnavailable("unreachable", "association aborted by the peer")
    if assoc.is_aborted:  # pynetdicom aborts itself when the ACSE timeout passes
        raise PeerUnavailable(
            "unreachable", f"no answer to the association request from {server.address} in {ae.acse_timeout:g} s"
        )
    raise PeerUnavailable("unreachable", f"no answer to the association request from {server.address}")


@contextmanager
def associated(ae: AE, server: ServerConfig, **kwargs) -> Iterator[Association]:
    """An association released on exit (aborted if the body failed)."""
    assoc = open_association(ae, server, **kwargs)
    try:
        yield assoc
    except BaseException:
        assoc.abort()
        raise
    else:
        if assoc.is_established:
            assoc.release()


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


def echo_peer(server: ServerConfig, router: RouterSettings, timeout_s: float | None = None) -> EchoResult:
    """C-ECHO `server` with its echo calling AE; never raises for network trouble."""
    calling_ae = calling_ae_for(server, "echo", router)
    timeout = timeout_s or router.echo_timeout_s
    ae = make_ae(calling_ae, router, [(Verification, [])])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    started = time.perf_counter()
    try:
        with associated(ae, server) as assoc:
            status = assoc.send_c_echo()
            elapsed_ms = (time.perf_counter() - started) * 1000
            if not status:
                return EchoResult(server, calling_ae, "unreachable", None, "no C-ECHO response (timeout or abort)")
            code = int(status.Status)
            if code != 0x0000:
                return EchoResult(server, calling_ae, "rejected", round(elapsed_ms, 1), f"C-ECHO status 0x{code:04X}")
            return EchoResult(server, calling_ae, "healthy", round(elapsed_ms, 1))
    except PeerUnavailable as exc:
        return EchoResult(server, calling_ae, exc.status, None, exc.reason)
    except OSError as exc:
        return EchoResult(server, calling_ae, "unreachable", None, str(exc))
