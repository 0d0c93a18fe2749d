"""`GET /metrics`: the router's counters plus what is read at scrape time (queue, spool, associations)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicomrouter.http.deps import HttpDeps
from dicomrouter.http.health import readiness_problems
from dicomrouter.logging import get_logger
from dicomrouter.store.queue import CLAIMED, DEAD, PENDING
from dicomrouter.store.queue_gauges import QueueGaugeReader, QueueGauges

log = get_logger(__name__)


class RouterCollector(Collector):
    """Gauges read when Prometheus scrapes: no work between scrapes, none on the DICOM path."""

    def __init__(self, deps: HttpDeps):
        self.deps = deps
        self.queue_gauges = (
            QueueGaugeReader(deps.queue.sessions) if deps.queue is not None else None
        )

    def collect(self) -> Iterator[Metric]:
        deps = self.deps
        config = deps.holder.current
        destinations = {s.name for s in config.live_servers()}
        gauges = QueueGauges()
        if self.queue_gauges is not None:
            try:
                gauges = self.queue_gauges.read()
            except Exception as exc:  # the catalog is down: /readyz and dicomrouter_ready say so
                log.warning(
                    "metrics_queue_unreadable", reason=f"{exc.__class__.__name__}: {str(exc)[:200]}"
                )
        destinations |= gauges.destinations()
        now = datetime.now(UTC)

        jobs = GaugeMetricFamily(
            "dicomrouter_queue_jobs",
            "Forwarding jobs per destination and state",
            labels=["destination", "state"],
        )
        oldest = GaugeMetricFamily(
            "dicomrouter_queue_oldest_pending_seconds",
            "Age of the oldest job still waiting for a destination (0: none)",
            labels=["destination"],
        )
        for destination in sorted(destinations):
            for state in (PENDING, CLAIMED, DEAD):
                jobs.add_metric([destination, state], gauges.jobs.get((destination, state), 0))
            since = gauges.oldest_waiting.get(destination)
            oldest.add_metric(
                [destination], max(0.0, (now - since).total_seconds()) if since else 0.0
            )
        suspended = GaugeMetricFamily(
            "dicomrouter_destination_suspended",
            "1 while the destination is in maintenance (queue suspend)",
            labels=["destination"],
        )
        for destination in sorted(destinations):
            suspended.add_metric([destination], 1.0 if destination in gauges.suspended else 0.0)
        yield jobs
        yield oldest
        yield suspended

        if deps.metrics is not None:
            up = GaugeMetricFamily(
                "dicomrouter_destination_up",
                "1 while the last send or echo to the destination worked, 0 while it is unreachable",
                labels=["destination"],
            )
            for destination, state in sorted(deps.metrics.destinations.all().items()):
                if destination in destinations:
                    up.add_metric([destination], 1.0 if state.up else 0.0)
            yield up

        if deps.front is not None:
            yield GaugeMetricFamily(
                "dicomrouter_associations_active",
                "DICOM associations open now",
                value=deps.front.active_associations(),
            )
        if deps.spool is not None:
            yield GaugeMetricFamily(
                "dicomrouter_spool_bytes",
                "Bytes of spooled instances still to be forwarded (or dead); refreshed every 30 s",
                value=gauges.spool_bytes,
            )
            try:
                stat = os.statvfs(deps.spool.root)
            except OSError:
                pass
            else:
                yield GaugeMetricFamily(
                    "dicomrouter_spool_free_bytes",
                    "Free space on the spool's file system",
                    value=stat.f_bavail * stat.f_frsize,
                )
                yield GaugeMetricFamily(
                    "dicomrouter_spool_filesystem_bytes",
                    "Size of the spool's file system",
                    value=stat.f_blocks * stat.f_frsize,
                )
        yield GaugeMetricFamily(
            "dicomrouter_ready",
            "1 when the catalog answers, the spool is writable and the DICOM port listens",
            value=0.0 if readiness_problems(deps) else 1.0,
        )


def add_routes(app: web.Application, deps: HttpDeps) -> None:
    if deps.metrics is None:
        return
    deps.metrics.add_collector(RouterCollector(deps))
    registry = deps.metrics.registry
    # One scrape at a time: a burst of scrapers must not become a burst of queries.
    scrape_lock = threading.Lock()

    def render() -> bytes:
        with scrape_lock:
            return generate_latest(registry)

    async def metrics(_request: web.Request) -> web.Response:
        body = await asyncio.to_thread(render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)
