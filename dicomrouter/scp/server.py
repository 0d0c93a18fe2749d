"""The DICOM front: one pynetdicom AE listening under the router's AE title."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from dicomrouter.audit import AuditTrail, NoAudit, RejectionAggregator
from dicomrouter.logging import get_logger
from dicomrouter.net.tls import TLSSetupError, listening_context
from dicomrouter.reload import ConfigHolder
from dicomrouter.routing.access import decide_association
from dicomrouter.scp.gate import make_request_handler
from dicomrouter.scp.limits import Admission, QuickCopyContexts
from dicomrouter.scp.store_session import LeanConnection, LeanStorePath

log = get_logger(__name__)


class FrontServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a listen backlog for bursts, and TLS handshakes off the accept loop.

    socketserver's default backlog is 5: a burst of connects beyond it sees its SYNs dropped and
    retried a second later, and idle connections made in the same burst time out meanwhile.
    pynetdicom wraps accepted sockets with the handshake on, in the thread that accepts: one
    plain TCP or silent caller would stop the port for everyone. Our request handler runs
    the handshake in the connection's own thread, with a timeout.
    """

    request_queue_size = 512

    def __init__(self, *args: Any, **kwargs: Any):
        self._lean_connections: set[LeanConnection] = set()
        self._lean_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def track(self, connection: LeanConnection) -> None:
        """Count a connection served by the lean store path (or still being read) like an association."""
        with self._lean_lock:
            self._lean_connections.add(connection)

    def untrack(self, connection: LeanConnection) -> None:
        with self._lean_lock:
            self._lean_connections.discard(connection)

    @property
    def active_associations(self) -> list[Any]:
        """pynetdicom's acceptor threads and the lean path's connections."""
        with self._lean_lock:
            lean = list(self._lean_connections)
        return ThreadedAssociationServer.active_associations.fget(self) + lean

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client_socket, address = self.socket.accept()
        context = self.ssl_context
        if context is not None:
            client_socket = context.wrap_socket(client_socket, server_side=True, do_handshake_on_connect=False)
        return client_socket, address


@dataclass
class SupportedContext:
    abstract_syntax: str
    transfer_syntaxes: Sequence[str] | None = None  # None: pynetdicom's defaults
    scu_role: bool | None = None
    scp_role: bool | None = None


@dataclass
class DicomFront:
    """Listens for associations; handlers are bound per event by the app."""

    holder: ConfigHolder
    contexts: list[SupportedContext]
    handlers: list[tuple[Any, ...]]
    host: str | None = None  # override config (tests bind 127.0.0.1:0)
    port: int | None = None
    audit: AuditTrail | NoAudit = field(default_factory=NoAudit)
    lean_store: LeanStorePath | None = None  # serve plain storage associations without pynetdicom
    _server: FrontServer | None = field(default=None, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    admission: Admission = field(init=False)
    rejections: RejectionAggregator | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(
            lambda: self.holder.current.router.max_associations,
            lambda: self.holder.current.router.max_dataset_size,
        )

    def _gate(self, calling_ae: str, called_ae: str, address: str):
        return decide_association(self.holder.current, calling_ae, called_ae, address)

    def build_ae(self) -> AE:
        router = self.holder.current.router
        ae = AE(ae_title=router.ae_title)
        # The admission counts (scp/limits.py) enforce max_associations; pynetdicom's own check
        # counts connections still negotiating too, so it gets the connection bound.
        ae.maximum_associations = self.admission.max_connections
        ae.maximum_pdu_size = router.max_pdu_size
        ae.acse_timeout = router.acse_timeout_s
        ae.dimse_timeout = router.dimse_timeout_s
        ae.network_timeout = router.network_timeout_s
        for cx in self.contexts:
            ae.add_supported_context(
                cx.abstract_syntax, cx.transfer_syntaxes, scu_role=cx.scu_role, scp_role=cx.scp_role
            )
        return ae

    def start(self) -> tuple[str, int]:
        """Bind and serve in a background thread; return the bound (host, port)."""
        router = self.holder.current.router
        host = self.host if self.host is not None else router.host
        port = self.port if self.port is not None else router.port
        self.ae = self.build_ae()
        tls = self.holder.current.router.tls
        self.rejections = RejectionAggregator(self.audit, router.audit.rejection_summary_interval_s).start()
        self._server = self.ae.make_server(
            (host, port),
            evt_handlers=self.handlers,
            ssl_context=listening_context(tls) if tls else None,
            server_class=FrontServer,
            request_handler=make_request_handler(
                self._gate, self.admission, self.audit, self.lean_store, rejections=self.rejections
            ),
        )
        self._server.daemon_threads = True
        self._server.contexts = QuickCopyContexts(self._server.contexts)
        self.ae._servers.append(self._server)
        self._thread = threading.Thread(target=self._server.serve_forever, name="dicom-front", daemon=True)
        self._thread.start()
        bound = self._server.server_address[:2]
        log.info("listening", ae_title=router.ae_title, host=bound[0], port=bound[1], tls=tls is not None)
        return bound[0], bound[1]

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def apply_limits(self) -> None:
        """Take new limits, timeouts and TLS files from a reloaded config (in-flight associations keep theirs)."""
        router = self.holder.current.router
        self.ae.maximum_associations = self.admission.max_connections
        self.ae.acse_timeout = router.acse_timeout_s
        self.ae.dimse_timeout = router.dimse_timeout_s
        self.ae.network_timeout = router.network_timeout_s
        if self._server is not None:
            # New connections take the reloaded certificates (renewed, or TLS turned on or off).
            try:
                self._server.ssl_context = listening_context(router.tls) if router.tls else None
            except TLSSetupError as exc:  # the files changed again since the config was checked
                log.error("tls_reload_failed", reason=str(exc), kept="the previous TLS setting")

    @property
    def running(self) -> bool:
        return self._server is not None

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting, let in-flight associations finish, then abort what is left."""
        if self._server is None:
            return
        server = self._server
        server.shutdown()
        deadline = time.monotonic() + drain_timeout_s
        while server.active_associations and time.monotonic() < deadline:
            # Checked on every pass: a connection accepted just before shutdown() gets its
            # association thread a moment later.
            self._drop_unassociated(server.active_associations)
            time.sleep(0.05)
        leftover = server.active_associations
        for assoc in leftover:
            assoc.abort()
        log.info("stopped_listening", aborted_associations=len(leftover))
        self._server = None
        if self.rejections is not None:
            self.rejections.stop()  # the last summaries, before the audit trail stops

    @staticmethod
    def _drop_unassociated(associations) -> None:
        """Connected but never associated: nothing in flight to finish, so no reason to wait."""
        for assoc in associations:
            if isinstance(assoc, LeanConnection):
                if not assoc.is_established:
                    assoc.abort()
                continue
            if assoc.is_established or getattr(assoc, "_router_dropped", False):
                continue
            assoc._router_dropped = True
            assoc.abort()
            # When the peer already hung up (a port probe), the DUL is gone and the reactor still
            # waits up to acse_timeout for an A-ASSOCIATE-RQ; None wakes it as a timeout would.
            assoc.dul.to_user_queue.put(None)
