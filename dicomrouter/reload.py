"""The config in force, and its replacement on SIGHUP or when the file changes on disk."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from dicomrouter.config import Config, ConfigError, load_config, parse_config, read_document
from dicomrouter.logging import get_logger

log = get_logger(__name__)


class ConfigHolder:
    """Holds the current Config; handlers read `.current` once per association or request."""

    def __init__(self, config: Config, adapt: Callable[[Config], Config] = lambda config: config):
        # `adapt`: what this process makes of every config it takes (a worker's share of the router's lanes).
        self._adapt = adapt
        self._config = adapt(config)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Config, Config], None]] = []

    @property
    def current(self) -> Config:
        return self._config

    def on_change(self, listener: Callable[[Config, Config], None]) -> None:
        self._listeners.append(listener)

    def reload(self, reason: str = "requested", source: Path | None = None) -> bool:
        """Load the file again (or `source`, a copy of it a supervisor checked, read as if it were the
        file); keep the old config when the new one is invalid."""
        with self._lock:
            old = self._config
            try:
                new = load_config(old.path) if source is None else parse_config(read_document(source), old.path)
                new = self._adapt(new)
            except ConfigError as exc:
                log.error("config_reload_refused", path=str(old.path), reason=reason, problems=exc.render())
                return False
            self._config = new
        log.info("config_reloaded", path=str(new.path), reason=reason, servers=len(new.servers), clients=len(new.clients))
        for listener in self._listeners:
            try:
                listener(old, new)
            except Exception:
                log.exception("config_listener_failed")
        return True


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ConfigFileWatcher:
    """Polls the config file and reloads when it changed (editors replace files atomically)."""

    def __init__(self, holder: ConfigHolder, interval_s: float = 1.0):
        self._holder = holder
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="config-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        path = self._holder.current.path
        last = _file_signature(path)
        while not self._stop.wait(self._interval_s):
            current = _file_signature(path)
            if current is not None and current != last:
                last = current
                self._holder.reload(reason="file changed")
