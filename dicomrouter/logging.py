"""structlog setup: our events and pynetdicom's stdlib records through one renderer."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(log_format: str = "console", level: str = "info", worker: int | str | None = None) -> None:
    """Console lines for a terminal, JSON lines otherwise (or when asked). With `worker` (a worker's
    index, or "supervisor"), every line says which process of a multi-worker router wrote it."""
    shared = [
        structlog.contextvars.merge_contextvars,
        *([_WorkerKey(worker)] if worker is not None else []),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        # filter_by_level first: a debug event below the level costs one check, not a timestamp
        # and a context merge (the store path has a debug line per instance).
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a logger bound once would keep this configuration for good, and tests (and a
        # reconfigured CLI in one process) must be able to capture or change it later.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO/DEBUG; its warnings and errors are what admins need.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class _WorkerKey:
    """A processor adding `worker=<id>` to every event of this process (threads included)."""

    def __init__(self, worker: int | str):
        self.worker = worker

    def __call__(self, _logger: object, _method: str, event_dict: dict) -> dict:
        event_dict.setdefault("worker", self.worker)
        return event_dict


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
