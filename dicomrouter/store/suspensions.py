"""Destinations in maintenance (`queue suspend`), as the router's lanes ask about them."""

from __future__ import annotations

import threading
import time
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from dicomrouter.catalog.db import read_plain, write_plain
from dicomrouter.store import queue_actions


class Suspensions:
    """Destinations in maintenance, kept in the catalog so the CLI and every router node agree."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions
        self._cache: dict[str, datetime] = {}
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def suspend(self, destination: str, by: str) -> bool:
        """Suspend; False when it already was."""
        return write_plain(
            self.sessions, lambda writer: queue_actions.suspend(writer, destination, by)
        )

    def resume(self, destination: str) -> bool:
        """Resume; False when it was not suspended."""
        return write_plain(self.sessions, lambda writer: queue_actions.resume(writer, destination))

    def all(self) -> dict[str, tuple[datetime, str | None]]:
        """Every suspended destination: since when, and by whom."""
        return read_plain(self.sessions, queue_actions.suspended)

    def is_suspended(self, destination: str, max_age_s: float) -> bool:
        """From a copy read at most `max_age_s` ago: one query per interval for all the lanes together."""
        with self._lock:
            if time.monotonic() - self._read_at > max_age_s:
                try:
                    self._cache = {name: at for name, (at, _by) in self.all().items()}
                except Exception:  # the catalog is down: keep what we knew (claims fail anyway)
                    pass
                self._read_at = time.monotonic()
            return destination in self._cache
