"""Background pruning of the catalog: finished forwarding jobs and old audit rows (`serve` only)."""

from __future__ import annotations

import threading
from datetime import timedelta

from dicomrouter.audit import AuditTrail, NoAudit
from dicomrouter.catalog.models import utcnow
from dicomrouter.catalog.queries import Catalog
from dicomrouter.logging import get_logger
from dicomrouter.reload import ConfigHolder
from dicomrouter.store.queue import ForwardQueue

log = get_logger(__name__)

PRUNE_INTERVAL_S = 3600.0


class CatalogPruner:
    """Once at start, then every `interval_s`: delete what `forwarding.keep_done` and `audit.keep_days` let go.

    Several nodes sharing a catalog may all prune; the deletes are idempotent.
    """

    def __init__(
        self,
        holder: ConfigHolder,
        queue: ForwardQueue,
        catalog: Catalog,
        audit: AuditTrail | NoAudit,
        interval_s: float = PRUNE_INTERVAL_S,
    ):
        self.holder = holder
        self.queue = queue
        self.catalog = catalog
        self.audit = audit
        self.interval_s = interval_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def prune_once(self) -> dict[str, int]:
        """Delete finished jobs and audit rows past their keep; returns how many of each."""
        router = self.holder.current.router
        jobs = self.queue.prune_done(timedelta(seconds=router.forwarding.keep_done_s))
        audit_rows = self.catalog.prune_audit(utcnow() - timedelta(days=router.audit.keep_days))
        if jobs or audit_rows:
            log.info(
                "catalog_pruned",
                done_jobs=jobs,
                audit_rows=audit_rows,
                keep_done_s=router.forwarding.keep_done_s,
                audit_keep_days=router.audit.keep_days,
            )
        if audit_rows:
            # The trail says that it was shortened, and by which rule.
            self.audit.record(
                "audit",
                "pruned",
                counts={"rows": audit_rows},
                detail=f"audit rows older than {router.audit.keep_days:g} days deleted (router.audit.keep_days)",
            )
        return {"done_jobs": jobs, "audit_rows": audit_rows}

    def start(self) -> CatalogPruner:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="catalog-pruner", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.prune_once()
            except Exception:  # a busy or unreachable catalog: try again next time
                log.exception("catalog_prune_failed")
            if self._stopping.wait(self.interval_s):
                return
