"""The DICOM front: one port, every association served by our own upper layer (dicomrouter/dul).

For each connection: the TLS handshake (when `router.tls` is set), the A-ASSOCIATE-RQ read
within `acse_timeout`, admission (calling AE, host, called AE, the association limits), the
presentation contexts negotiated by the service registry, then the association is served on
the connection's thread until it ends. Every refusal here is an A-ASSOCIATE-RJ or A-ABORT with
the standard reason, one log line and one audit row.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field

from dicomrouter.audit import AssociationAudit, AuditTrail, NoAudit, RejectionAggregator
from dicomrouter.dul.association import Association, AssociationLimits
from dicomrouter.dul.connection import Connection, PduReader, ProtocolViolation, SessionEnded
from dicomrouter.dul.listener import ConnectionLimits, ConnectionTable, Listener
from dicomrouter.dul.pdu import (
    A_ASSOCIATE_RQ,
    ABORT_INVALID_PARAMETER,
    ABORT_UNEXPECTED_PDU,
    REJECT_CALLING_AE,
    REJECT_LOCAL_LIMIT,
    REJECT_NO_REASON,
    MalformedRequest,
    RequestRejected,
    associate_ac,
    associate_rj,
    parse_associate_rq,
)
from dicomrouter.dul.shared_counts import SharedCounts
from dicomrouter.logging import get_logger
from dicomrouter.net.tls import (
    TLSSetupError,
    complete_handshake,
    describe_tls_error,
    listening_context,
    peer_subject,
)
from dicomrouter.net.upper_layer import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from dicomrouter.printable import printable
from dicomrouter.reload import ConfigHolder
from dicomrouter.routing.access import AssociationDecision, decide_association, host_matches
from dicomrouter.scp.registry import ServiceRegistry

log = get_logger(__name__)

REFUSAL_READ_S = 2.0  # a connection over every limit gets this long to send its request before its RJ
REJECT_LINGER_S = 2.0  # after A-ASSOCIATE-RJ the requestor closes first (Sta13)


@dataclass
class DicomFront:
    """Listens for associations and serves them with the services in `registry`."""

    holder: ConfigHolder
    registry: ServiceRegistry
    host: str | None = None  # override config (tests bind 127.0.0.1:0)
    port: int | None = None
    audit: AuditTrail | NoAudit = field(default_factory=NoAudit)
    # A worker of several: the listening socket its supervisor bound for all, and their association counts.
    shared_counts: SharedCounts | None = None
    listen_socket: socket.socket | None = None
    _listener: Listener | None = field(default=None, init=False)
    _tls: ssl.SSLContext | None = field(default=None, init=False)
    rejections: RejectionAggregator | None = field(default=None, init=False)
    table: ConnectionTable = field(init=False)

    def __post_init__(self) -> None:
        self.table = ConnectionTable(self._limits, self._known_address, self.shared_counts)

    def _limits(self) -> ConnectionLimits:
        router = self.holder.current.router
        return ConnectionLimits.for_associations(router.max_associations, router.max_pending_per_address)

    def _known_address(self, address: str) -> bool:
        config = self.holder.current
        hosts = [c.host for c in config.clients if c.host] + [s.host for s in config.live_servers()]
        return any(host_matches(host, address) for host in hosts)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> tuple[str, int]:
        """Bind and serve in a background thread; return the bound (host, port)."""
        router = self.holder.current.router
        host = self.host if self.host is not None else router.host
        port = self.port if self.port is not None else router.port
        self._tls = listening_context(router.tls) if router.tls else None
        # A flood from one address is one line and row, then a summary per interval.
        self.rejections = RejectionAggregator(self.audit, router.audit.rejection_summary_interval_s).start()
        self._listener = Listener(
            host, port, self.table, self._serve_connection, lambda: self._tls, self._connection_refused,
            shared_socket=self.listen_socket,
        )
        self._listener.start()
        bound = self._listener.address
        log.info("listening", ae_title=router.ae_title, host=bound[0], port=bound[1], tls=router.tls is not None)
        return bound

    @property
    def bound_port(self) -> int:
        assert self._listener is not None
        return self._listener.address[1]

    @property
    def running(self) -> bool:
        return self._listener is not None

    def apply_limits(self) -> None:
        """Take new TLS files from a reloaded config; limits and timeouts are read per connection."""
        router = self.holder.current.router
        try:
            self._tls = listening_context(router.tls) if router.tls else None
        except TLSSetupError as exc:  # the files changed again since the config was checked
            log.error("tls_reload_failed", reason=str(exc), kept="the previous TLS setting")

    def active_associations(self) -> int:
        return self.table.counts()["associated"]

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting, let in-flight associations finish, then abort what is left."""
        if self._listener is None:
            return
        self._listener.stop_accepting()
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline:
            for connection in self.table.everyone():
                if not connection.is_established:  # nothing in flight to finish
                    connection.close()
            if not self.table.everyone():
                break
            time.sleep(0.05)
        leftover = self.table.everyone()
        for connection in leftover:
            connection.abort()
        log.info("stopped_listening", aborted_associations=len(leftover))
        self._listener = None
        self.registry.stopped()
        if self.rejections is not None:
            self.rejections.stop()  # the last summaries, before the audit trail stops

    # ------------------------------------------------------------------ one connection

    def _serve_connection(self, connection: Connection, admitted: bool) -> None:
        router = self.holder.current.router
        sock = connection.sock
        if isinstance(sock, ssl.SSLSocket) and not self._handshake(connection, router.acse_timeout_s):
            return
        wait_s = router.acse_timeout_s if admitted else min(router.acse_timeout_s, REFUSAL_READ_S)
        reader = PduReader(connection, router.max_pdu_size, wait_s)
        try:
            pdu_type, body = reader.read(f"no A-ASSOCIATE-RQ within {wait_s:g} s")
            if pdu_type != A_ASSOCIATE_RQ:
                raise ProtocolViolation(f"PDU type 0x{pdu_type:02X} before any association", ABORT_UNEXPECTED_PDU)
        except SessionEnded as ended:
            if ended.warn:
                log.info("connection_dropped", address=connection.address, reason=ended.reason)
            else:
                log.debug("connection_closed", address=connection.address, reason=ended.reason)
            return
        except ProtocolViolation as violation:
            log.warning("association_dropped", address=connection.address, reason=violation.reason)
            connection.abort_and_drain(violation.abort_pdu)
            return
        if not admitted:
            self._reject(connection, "", "", REJECT_LOCAL_LIMIT, "local limit exceeded (connections waiting to associate)")
            return
        self._associate(connection, reader, bytes(body))

    def _handshake(self, connection: Connection, timeout_s: float) -> bool:
        """Finish the TLS handshake of an accepted connection, in its own thread; log why not."""
        error = complete_handshake(connection.sock, timeout_s)  # type: ignore[arg-type]
        if error is None:
            log.debug("tls_established", address=connection.address, client_certificate=peer_subject(connection.sock))
            return True
        reason = describe_tls_error(error)
        if isinstance(error, ssl.SSLEOFError | ConnectionError) or "UNEXPECTED_EOF" in str(error):
            log.info("tls_handshake_failed", address=connection.address, reason=reason)  # port probes
        else:
            log.warning("tls_handshake_failed", address=connection.address, reason=reason)
        return False

    def _connection_refused(self, address: str) -> None:
        """A connection closed at once: every slot, even those that answer refusals, was taken."""
        self._note_rejection(address, "too many connections (closed without an answer)", "", "")

    def _note_rejection(self, address: str, reason: str, calling_ae: str, called_ae: str) -> None:
        if self.rejections is not None:
            self.rejections.record(address, printable(reason), printable(calling_ae), printable(called_ae))
        else:
            log.warning("association_rejected", calling_ae=printable(calling_ae), address=address, reason=printable(reason))

    def _reject(self, connection: Connection, calling_ae: str, called_ae: str, reject: tuple[int, int, int], reason: str) -> None:
        self._note_rejection(connection.address, reason, calling_ae, called_ae)
        may_linger = self.table.refusing_now(connection)
        try:
            connection.sock.settimeout(1.0)
            connection.send(associate_rj(reject))
        except OSError:
            return
        if may_linger:  # as after any A-ASSOCIATE-RJ (Sta13), the requestor closes first
            connection.read_until_closed(REJECT_LINGER_S)

    def _associate(self, connection: Connection, reader: PduReader, body: bytes) -> None:
        config = self.holder.current
        router = config.router
        try:
            request = parse_associate_rq(body)
        except RequestRejected as exc:
            self._reject(connection, "", "", exc.reject, str(exc))
            return
        except MalformedRequest as exc:
            log.warning("association_dropped", address=connection.address, reason=f"malformed A-ASSOCIATE-RQ: {exc}")
            connection.abort_and_drain(ABORT_INVALID_PARAMETER)
            return
        if request.bad_ae_title:
            self._reject(connection, "", "", REJECT_CALLING_AE, request.bad_ae_title)
            return
        calling_ae, called_ae = request.calling_ae, request.called_ae
        try:
            decision = decide_association(config, calling_ae, called_ae, connection.address)
        except Exception:
            log.exception("association_gate_failed", calling_ae=calling_ae, address=connection.address)
            decision = AssociationDecision(False, "internal error in admission", reject=REJECT_NO_REASON)
        if not decision.accepted or decision.caller is None:
            self._reject(connection, calling_ae, called_ae, decision.reject or REJECT_NO_REASON, decision.reason)
            return
        caller = decision.caller
        if not self.table.associate(connection, known_caller=caller.kind != "unknown"):
            self._reject(
                connection, calling_ae, called_ae, REJECT_LOCAL_LIMIT,
                f"local limit exceeded (router.max_associations {router.max_associations})",
            )
            return
        try:
            results, services = self.registry.negotiate(request, caller, config)
        except MalformedRequest as exc:
            log.warning("association_dropped", address=connection.address, reason=f"malformed A-ASSOCIATE-RQ: {exc}")
            connection.abort_and_drain(ABORT_INVALID_PARAMETER)
            return
        limits = AssociationLimits(
            max_pdu_size=router.max_pdu_size,
            max_dataset_size=router.max_dataset_size,
            max_in_memory_dataset=router.max_in_memory_dataset,
            network_timeout_s=router.network_timeout_s,
            dimse_timeout_s=router.dimse_timeout_s,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version=IMPLEMENTATION_VERSION,
        )
        audit = AssociationAudit(self.audit, calling_ae, called_ae, connection.address)
        try:
            connection.is_established = True  # before the AC goes out: stop() must not take it for a silent one
            connection.kind = caller.kind
            try:
                connection.sock.settimeout(router.acse_timeout_s)
                connection.send(
                    associate_ac(request, results, limits.max_pdu_size, limits.implementation_class_uid,
                                 limits.implementation_version)
                )
            except OSError as exc:
                log.info("association_ended", address=connection.address, reason=f"connection lost ({exc})")
                return
            refused = [
                f"{r.abstract_syntax}: {r.reason}" for r in results if not r.accepted and r.reason
            ]
            log.info(
                "association_accepted", calling_ae=calling_ae, called_ae=called_ae, address=connection.address,
                caller_kind=caller.kind, contexts_accepted=sum(1 for r in results if r.accepted),
                contexts_refused=len(results) - sum(1 for r in results if r.accepted),
            )
            if refused:
                log.info("contexts_refused", calling_ae=calling_ae, address=connection.address, refused=refused[:20])
            audit.record("association", "accepted", detail=f"{decision.reason} ({caller.kind})")
            Association(connection, request, results, services, caller, audit, limits, reader).serve()
        finally:
            audit.close()

