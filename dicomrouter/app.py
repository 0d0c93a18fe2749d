"""The one place that wires config, catalog, spool, forwarder, peers and the SCP together."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dicomrouter.audit import AuditTrail
from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.queries import Catalog
from dicomrouter.catalog.schema import require_current_schema
from dicomrouter.config import Config
from dicomrouter.health import HealthWatch
from dicomrouter.housekeeping import CatalogPruner
from dicomrouter.http import api as http_api
from dicomrouter.http import cors as http_cors
from dicomrouter.http import health as http_health
from dicomrouter.http import metrics as http_metrics
from dicomrouter.http import page as http_page
from dicomrouter.http.deps import HttpDeps
from dicomrouter.http.dicomweb.routes import dicomweb_routes
from dicomrouter.http.server import HttpFront, make_http_app
from dicomrouter.logging import get_logger
from dicomrouter.metrics import Metrics
from dicomrouter.query.federation import Federation
from dicomrouter.reload import ConfigFileWatcher, ConfigHolder
from dicomrouter.retrieve.pending import PendingRetrievals
from dicomrouter.routing.store_rules import unusable_rules
from dicomrouter.scp.commitment import CommitmentService, ReportChannels
from dicomrouter.scp.echo import VERIFICATION, EchoService
from dicomrouter.scp.find import FindService
from dicomrouter.scp.front import DicomFront
from dicomrouter.scp.get import GetService
from dicomrouter.scp.move import MoveService
from dicomrouter.scp.move_delivery import MoveDeliveryService
from dicomrouter.scp.registry import ServiceRegistry
from dicomrouter.scp.store import StoreService
from dicomrouter.store.acks import AckRecorder
from dicomrouter.store.capabilities import DestinationCapabilities
from dicomrouter.store.commitments import CommitmentStore
from dicomrouter.store.committer import Committer
from dicomrouter.store.forwarder import Forwarder
from dicomrouter.store.queue import ForwardQueue
from dicomrouter.store.receive import ReceiveService
from dicomrouter.store.scratch import clean_scratch
from dicomrouter.store.spool import FREE_FILES_MAX, Spool

if TYPE_CHECKING:
    from dicomrouter.supervisor import WorkerRole

log = get_logger(__name__)

# A thread waiting for the GIL gets it after at most this long (Python's default: 5 ms). The
# router is many I/O threads (peer queries, the caller's association); a federated C-FIND's
# first answer waited whole intervals behind the threads decoding the other servers' answers.
GIL_SWITCH_INTERVAL_S = 0.001


def node_id() -> str:
    """Who claims forwarding jobs: unique per process, readable in `queue list`."""
    # The random part keeps two containers that are both PID 1 on one hostname apart.
    return f"{node_id_prefix(os.getpid())}{secrets.token_hex(3)}"


def node_id_prefix(pid: int) -> str:
    """How the node ids of process `pid` on this host begin (a supervisor releases a dead worker's claims)."""
    return f"{socket.gethostname()}:{pid}:"


def service_registry(
    holder: ConfigHolder,
    catalog: Catalog | None,
    receive: ReceiveService | None,
    capabilities: DestinationCapabilities | None = None,
    commitment: CommitmentService | None = None,
    pending: PendingRetrievals | None = None,
) -> ServiceRegistry:
    """Every service the front offers, by SOP class; storage takes the classes nobody else claims
    (none without `receive`: tests of query and retrieval serve no stores). With `capabilities`,
    storage contexts every possible destination would refuse are refused at negotiation."""
    find = FindService(holder, Federation(catalog))
    move = MoveService(holder, catalog)
    get = GetService(holder, catalog)
    registry = ServiceRegistry.of(
        StoreService(holder, receive) if receive is not None else None,
        ((VERIFICATION,), EchoService(holder)),
        (find.sop_classes, find),
        (move.sop_classes, move),
        (get.sop_classes, get),
        *([(commitment.sop_classes, commitment)] if commitment is not None else []),
    )
    if capabilities is not None:
        registry.capabilities = capabilities
        registry.destination_verdict = capabilities.accepted_syntaxes
    if commitment is not None:  # a PACS reporting its commitment to the router is SCP of the class
        registry.either_role = frozenset(commitment.sop_classes)
    if pending is not None and receive is not None:  # a PACS delivering a move the router asked for
        registry.delivery = MoveDeliveryService(pending, receive.spool)
    return registry


# Each registers its routes on the HTTP app given HttpDeps (see dicomrouter/http/__init__.py).
HTTP_ROUTE_MODULES = [http_health.add_routes, http_metrics.add_routes, http_api.add_routes, http_page.add_routes]


@dataclass
class RouterApp:
    holder: ConfigHolder
    catalog: Catalog
    spool: Spool
    queue: ForwardQueue
    forwarder: Forwarder
    receive: ReceiveService
    front: DicomFront
    audit: AuditTrail
    committer: Committer | None = None
    http: HttpFront | None = None
    metrics: Metrics | None = None
    watch_file: bool = True
    _health_watch: HealthWatch | None = field(default=None, init=False)
    _pruner: CatalogPruner | None = field(default=None, init=False)
    _watcher: ConfigFileWatcher | None = field(default=None, init=False)
    _stopped: threading.Event = field(default_factory=threading.Event, init=False)

    @property
    def config(self) -> Config:
        return self.holder.current

    def start_forwarding(self) -> None:
        """Everything but the DICOM front (the import command forwards without listening)."""
        self.audit.start()
        self.catalog.sync_servers(self.config)
        removed = self.spool.clean_partial_writes()
        if removed:
            log.warning("spool_partial_writes_removed", files=removed)
        removed = clean_scratch(self.spool.root)
        if removed:
            log.warning("spool_scratch_removed", folders=removed, reason="left by a process that ended")
        self._log_unusable_rules(self.config)
        self.forwarder.start()
        if self.committer is not None:
            self.committer.start()

    def start(self) -> tuple[str, int]:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.start_forwarding()
        address = self.front.start()
        if self.http is not None:
            try:
                self.http.start()
                if self.metrics is not None:
                    self._health_watch = HealthWatch(
                        self.holder,
                        self.metrics.destinations,
                        lambda: self.config.router.http.health_interval_s if self.config.router.http else 30.0,
                    )
                    self._health_watch.start()
            except BaseException:
                self.front.stop(0)
                self.forwarder.stop()
                self.audit.stop()
                raise
        self._pruner = CatalogPruner(self.holder, self.queue, self.catalog, self.audit).start()
        if self.watch_file:
            self._watcher = ConfigFileWatcher(self.holder)
            self._watcher.start()
        return address

    def reload(self, reason: str, source: Path | None = None) -> bool:
        return self.holder.reload(reason, source)

    def _log_unusable_rules(self, config: Config) -> None:
        for rule in unusable_rules(config):
            log.warning("route_unusable", rule=rule, reason="every destination is inactive or deleted; it falls through")

    def _on_config_change(self, old: Config, new: Config) -> None:
        self.front.apply_limits()
        self.catalog.sync_servers(new)
        self.forwarder.ensure_lanes(new)
        self._log_unusable_rules(new)
        if (old.router.http is None) != (new.router.http is None) or (
            old.router.http and new.router.http and (old.router.http.host, old.router.http.port, old.router.http.tls)
            != (new.router.http.host, new.router.http.port, new.router.http.tls)
        ):
            log.warning("http_change_needs_restart", reason="router.http (host, port, tls) is taken at start only")

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting, finish in-flight associations, stop forwarding, give back claims."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._watcher:
            self._watcher.stop()
        if self.front.running:
            self.front.stop(drain_timeout_s)
        if self.http is not None:
            self.http.stop()
        self.receive.close()  # the DICOM and HTTP fronts, which receive, have stopped
        if self._health_watch is not None:
            self._health_watch.stop()
        if self._pruner is not None:
            self._pruner.stop()
        if self.committer is not None:
            self.committer.stop()
        self.forwarder.stop()
        self.spool.release_free_files()  # nothing writes to the spool any more
        self.audit.stop()
        log.info("router_stopped")


def build_app(
    config: Config,
    host: str | None = None,
    port: int | None = None,
    watch_file: bool = True,
    worker: WorkerRole | None = None,
) -> RouterApp:
    """Build (not start) the router for `config`; tests call this without the CLI. As one `worker` of
    several it shares the port and the association counts, serves HTTP only as worker 0, and leaves
    watching the file to its supervisor."""
    engine = make_engine(config.router.catalog)
    require_current_schema(engine)
    sessions = session_factory(engine)
    catalog = Catalog(sessions)
    holder = ConfigHolder(config, worker.share if worker else lambda config: config)
    config = holder.current
    spool = Spool(config.router.spool, keep_free=FREE_FILES_MAX)
    queue = ForwardQueue(sessions, node_id(), config.router.forwarding)
    # Counted only when something serves them (the HTTP port); the CLI's import counts nothing.
    metrics = Metrics(worker.metrics_dir if worker else None) if config.router.http is not None else None
    audit = AuditTrail(catalog.add_audit_rows, node=node_id(), metrics=metrics)
    capabilities = DestinationCapabilities(sessions, lambda: holder.current)
    holder.on_change(capabilities.config_changed)
    forwarder = Forwarder(
        holder, queue, spool, AckRecorder(catalog, queue), audit, metrics=metrics, capabilities=capabilities
    )
    receive = ReceiveService(
        lambda: holder.current, spool, queue, sessions, forwarder.notify, audit=audit.record, capabilities=capabilities,
        handoff=forwarder,
    )
    channels = ReportChannels()
    committer = Committer(lambda: holder.current, CommitmentStore(sessions, queue.node_id), channels, audit)
    commitment = CommitmentService(holder, committer.store, channels, committer.wake)
    # WADO-RS retrievals waiting for a PACS that only moves to call back (retrieve/pending.py); with
    # several workers, the one the PACS calls hands the instances to the one waiting (handoff.py).
    pending = PendingRetrievals(spool.tmp / "moves" / socket.gethostname() if worker else None)
    front = DicomFront(
        holder, service_registry(holder, catalog, receive, capabilities, commitment, pending), host=host, port=port,
        audit=audit, shared_counts=worker.shared_counts if worker else None,
        listen_socket=worker.listen_socket() if worker else None,
    )
    http = None
    if config.router.http is not None and (worker is None or worker.serves_http):
        deps = HttpDeps(
            holder, audit, catalog=catalog, spool=spool, queue=queue, forwarder=forwarder, front=front, metrics=metrics
        )
        # DICOMweb's QIDO-RS has its own federation (and catalog learner) beside the C-FIND SCP's.
        dicomweb = dicomweb_routes(receive, Federation(catalog), pending, capabilities)
        http = HttpFront(make_http_app(deps, [*HTTP_ROUTE_MODULES, dicomweb, http_cors.add_routes]), config.router.http)
    app = RouterApp(
        holder, catalog, spool, queue, forwarder, receive, front, audit, committer=committer, http=http,
        metrics=metrics, watch_file=watch_file and worker is None,
    )
    holder.on_change(app._on_config_change)
    return app
