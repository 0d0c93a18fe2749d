"""Association-time admission: reject unknown callers with A-ASSOCIATE-RJ before any DIMSE."""

from __future__ import annotations

import ssl
from collections.abc import Callable

from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler

from dicomrouter.audit import (
    AssociationAudit,
    AuditTrail,
    NoAudit,
    RejectionAggregator,
    association_audit,
)
from dicomrouter.logging import get_logger
from dicomrouter.net.acceptor_pdus import (
    ACCEPTED,
    NotForLeanPath,
    associate_ac,
    negotiate,
    parse_associate_rq,
)
from dicomrouter.net.sockets import set_nodelay
from dicomrouter.net.tls import complete_handshake, describe_tls_error, peer_subject
from dicomrouter.routing.access import AssociationDecision
from dicomrouter.scp.limits import (
    PDU_HEADER_LENGTH,
    REJECT_LOCAL_LIMIT,
    Admission,
    GuardedAssociationSocket,
    guard_state_machine,
    refuse_connection,
)
from dicomrouter.scp.store_session import (
    LeanConnection,
    LeanStorePath,
    SessionLimits,
    StoreSession,
    read_first_pdu,
)

log = get_logger(__name__)

# (calling AE, called AE, peer address) -> decision
Gate = Callable[[str, str, str], AssociationDecision]


class GatedACSE(ACSE):
    """pynetdicom's ACSE, asking our gate before it negotiates anything.

    pynetdicom only offers a fixed list of calling AE titles; we also check the caller's host,
    accept configured servers and answer under several called AE titles.
    """

    def __init__(
        self,
        assoc: Association,
        gate: Gate,
        admission: Admission,
        audit: AuditTrail | NoAudit,
        rejections: RejectionAggregator | None = None,
    ):
        super().__init__(assoc)
        self._gate = gate
        self._admission = admission
        self._audit = audit
        self._rejections = rejections or RejectionAggregator(audit)

    def _negotiate_as_acceptor(self) -> None:
        request = self.requestor.primitive
        calling_ae = (request.calling_ae_title or "").strip()
        called_ae = (request.called_ae_title or "").strip()
        address = self.assoc.requestor.address
        try:
            decision = self._gate(calling_ae, called_ae, address)
        except Exception:
            log.exception("association_gate_failed", calling_ae=calling_ae, address=address)
            decision = AssociationDecision(False, "internal error in admission", reject=(0x02, 0x01, 0x01))
        if decision.accepted and not self._admission.admit(self.assoc, lambda: self.assoc._server.active_associations):
            decision = AssociationDecision(
                False, f"local limit exceeded ({self._admission.limit} associations)", reject=REJECT_LOCAL_LIMIT
            )
        if not decision.accepted:
            # A flood from one address is one line and row, then a summary per interval.
            self._rejections.record(address, decision.reason, calling_ae, called_ae)
            self.requestor.ae_title = calling_ae
            self.send_reject(*decision.reject)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        # Answer under the AE title that was called (the router's own or a virtual server AE).
        self.acceptor.ae_title = called_ae
        self.assoc.router_caller = decision.caller  # read by the DIMSE handlers
        self.assoc.router_called_ae = called_ae
        audit = AssociationAudit(self._audit, calling_ae, called_ae, address)
        self.assoc.router_audit = audit
        caller_kind = decision.caller.kind if decision.caller else None
        log.info("association_accepted", calling_ae=calling_ae, called_ae=called_ae, address=address, caller_kind=caller_kind)
        super()._negotiate_as_acceptor()
        if self.assoc.is_established:
            audit.record("association", "accepted", detail=f"{decision.reason} ({caller_kind})")
        else:
            # pynetdicom's own checks after ours: the association limit.
            reason = f"local limit exceeded (router.max_associations {self.assoc.ae.maximum_associations})"
            self._rejections.record(address, reason, calling_ae, called_ae)


def tls_handshake_ok(sock: ssl.SSLSocket, timeout_s: float, address: str) -> bool:
    """Finish the TLS handshake of an accepted connection, in its own thread; log why not."""
    error = complete_handshake(sock, timeout_s)
    if error is None:
        log.debug("tls_established", address=address, version=sock.version(), client_certificate=peer_subject(sock))
        return True
    reason = describe_tls_error(error)
    if isinstance(error, ssl.SSLEOFError | ConnectionError) or "UNEXPECTED_EOF" in str(error):
        # Port probes and load balancer checks connect and hang up; not worth a warning.
        log.info("tls_handshake_failed", address=address, reason=reason)
    else:
        log.warning("tls_handshake_failed", address=address, reason=reason)
    return False


def make_request_handler(
    gate: Gate,
    admission: Admission,
    audit: AuditTrail | NoAudit | None = None,
    lean_store: LeanStorePath | None = None,
    rejections: RejectionAggregator | None = None,
) -> type[RequestHandler]:
    """A pynetdicom request handler class bound to `gate`: TCP_NODELAY, TLS, connection limit, guarded reads.

    A TLS connection is handshaken here, before any association exists, so a plain TCP or
    silent caller costs this thread at most `acse_timeout` and never an association slot.
    With `lean_store`, the A-ASSOCIATE-RQ is read here: a plain storage association from a
    client is served on this thread (scp/store_session.py); any other request is replayed to
    pynetdicom. Every admission decision goes to `audit`; what an association tallied (its
    stores) is written when it ends, however it ends (release, abort, timeout).
    """
    audit = audit or NoAudit()
    rejections = rejections or RejectionAggregator(audit)

    class GatedRequestHandler(RequestHandler):
        _replay: bytes = b""

        def handle(self) -> None:
            set_nodelay(self.request)
            acse_timeout = self.ae.acse_timeout or 10.0
            address = self.client_address[0]
            if isinstance(self.request, ssl.SSLSocket) and not tls_handshake_ok(self.request, acse_timeout, address):
                self.request.close()  # pynetdicom's server leaves closing to the association
                return
            if lean_store is None:
                # Counting and starting under one lock: a burst of connects cannot all see room.
                with admission.connection_lock():
                    live = self.server.active_associations
                    if admission.room_for_connection(live):
                        super().handle()
                        return
                refuse_connection(self.request, address, acse_timeout, len(live))
                return
            connection = LeanConnection(self.request, address)
            with admission.connection_lock():
                live = self.server.active_associations
                room = admission.room_for_connection(live)
                if room:
                    self.server.track(connection)  # counted while its request is read
            if not room:
                refuse_connection(self.request, address, acse_timeout, len(live))
                return
            try:
                self._serve(connection, acse_timeout)
            except Exception:
                log.exception("association_failed", address=address)
                connection.abort()
            finally:
                self.server.untrack(connection)

        def _serve(self, connection: LeanConnection, acse_timeout: float) -> None:
            first = read_first_pdu(self.request, acse_timeout)
            if first.ended is not None:
                if first.stalled:
                    log.warning("association_dropped", address=connection.address, reason=first.ended)
                else:
                    log.debug("connection_closed", address=connection.address, reason=first.ended)
                connection.close()
                return
            if first.complete and self._serve_lean(connection, first.data[PDU_HEADER_LENGTH:]):
                return
            self._replay = first.data
            super().handle()  # pynetdicom's association thread now counts this connection

        def _serve_lean(self, connection: LeanConnection, body: bytes) -> bool:
            """Serve a plain storage association here; False: pynetdicom should answer the request."""
            assert lean_store is not None
            try:
                request = parse_associate_rq(body)
            except NotForLeanPath:
                return False
            if not lean_store.takes(request):
                return False
            try:
                decision = gate(request.calling_ae, request.called_ae, connection.address)
            except Exception:
                return False  # pynetdicom's path logs it and rejects
            if not decision.accepted or decision.caller is None or decision.caller.kind == "server":
                return False
            results = negotiate(request, lean_store.supported)
            if not any(result.result == ACCEPTED for result in results):
                return False
            if not admission.admit(connection, lambda: self.server.active_associations):
                return False  # pynetdicom's path rejects with "local limit exceeded"
            router = self.ae
            limits = SessionLimits(
                max_pdu_size=router.maximum_pdu_size,
                max_dataset_size=admission.max_dataset_size,
                max_in_memory_dataset=lean_store.max_in_memory_dataset(),
                network_timeout_s=float(router.network_timeout or 60.0),
                implementation_class_uid=router.implementation_class_uid,
                implementation_version=router.implementation_version_name or "",
            )
            association = AssociationAudit(audit, request.calling_ae, request.called_ae, connection.address)
            try:
                try:
                    connection.sock.settimeout(self.ae.acse_timeout or 10.0)
                    connection.send(
                        associate_ac(request, results, limits.max_pdu_size, limits.implementation_class_uid,
                                     limits.implementation_version)
                    )
                except OSError as exc:
                    log.info("association_ended", address=connection.address, reason=f"connection lost ({exc})")
                    connection.close()
                    return True
                connection.is_established = True
                caller = decision.caller
                log.info(
                    "association_accepted", calling_ae=request.calling_ae, called_ae=request.called_ae,
                    address=connection.address, caller_kind=caller.kind, path="lean",
                )
                association.record("association", "accepted", detail=f"{decision.reason} ({caller.kind})")
                StoreSession(
                    connection, request, results, caller, association, lean_store.store, limits, lean_store.spool,
                    echo_refusal=lean_store.echo_refusal,
                ).serve()
            finally:
                association.close()
            return True

        def _create_association(self) -> Association:
            assoc = super()._create_association()
            GuardedAssociationSocket.guard(
                assoc.dul.socket, self.ae.maximum_pdu_size, admission.max_dataset_size, replay=self._replay
            )
            guard_state_machine(assoc)
            assoc.acse = GatedACSE(assoc, gate, admission, audit, rejections)
            run = assoc.run

            def run_then_close_audit() -> None:
                try:
                    run()
                finally:
                    association_audit(assoc).close()

            assoc.run = run_then_close_audit  # Thread.start() calls self.run
            return assoc

    return GatedRequestHandler
