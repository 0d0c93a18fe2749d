"""What the HTTP handlers are given: the router's services, shared with the CLI and the DICOM front."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dicomrouter.reload import ConfigHolder


@dataclass
class HttpDeps:
    """The router's services; fields a test does not need may stay None."""

    holder: ConfigHolder
    audit: Any  # AuditTrail (record(operation, outcome, **fields))
    catalog: Any = None  # catalog.queries.Catalog
    spool: Any = None  # store.spool.Spool
    queue: Any = None  # store.queue.ForwardQueue
    forwarder: Any = None  # store.forwarder.Forwarder
    front: Any = None  # scp.front.DicomFront
    metrics: Any = None  # metrics.Metrics


DEPS = web.AppKey("dicomrouter.deps", HttpDeps)
