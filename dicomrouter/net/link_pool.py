"""Associations kept open between C-FINDs to the same PACS, for a while.

A workstation queries again and again. Each federated query would otherwise open an association
with every PACS, and the slowest PACS's handshake is on the critical path of the whole answer:
its own time only starts once its request is in. A link is kept only after a complete exchange
(final Success), for `keep_s`, a few per PACS; a link the PACS closed or spoke on while idle is
dropped when taken, and the find client retries once on a fresh association if a reused one fails
before its first answer (C-FIND is safe to repeat). Idle links are released in the background.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Hashable

from dicomrouter.logging import get_logger
from dicomrouter.net.upper_layer import Link

log = get_logger(__name__)

RELEASE_WAIT_S = 1.0
MAX_IDLE_PER_KEY = 4  # simultaneous queries to one PACS beyond this open their own associations


def _looks_open(link: Link) -> bool:
    """Nothing arrived while idle: a PACS that closed or aborted the association has said so."""
    if link.closed:
        return False
    try:
        readable, _, _ = select.select([link.layer.sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class LinkPool:
    """Idle associations by what they were opened for (`key`: peer, AE titles, context)."""

    def __init__(self) -> None:
        # key -> (expires, link), newest last
        self._idle: dict[Hashable, list[tuple[float, Link]]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._reaper: threading.Thread | None = None

    def take(self, key: Hashable) -> Link | None:
        """An idle link for `key` that still looks open, or None."""
        now = time.monotonic()
        stale: list[Link] = []
        found = None
        with self._lock:
            links = self._idle.get(key, [])
            while links and found is None:
                expires, link = links.pop()
                if expires > now and _looks_open(link):
                    found = link
                else:
                    stale.append(link)
        for link in stale:
            link.abort()  # closed by the PACS, or spoke out of turn: nothing to release politely
        return found

    def give(self, key: Hashable, link: Link, keep_s: float) -> None:
        """Keep `link` for the next query to the same PACS (released at once when keep_s is 0)."""
        with self._lock:
            links = self._idle.setdefault(key, [])
            if keep_s > 0 and len(links) < MAX_IDLE_PER_KEY:
                links.append((time.monotonic() + keep_s, link))
                self._start_reaper()
                self._wake.notify_all()
                return
        link.release(RELEASE_WAIT_S)

    def _start_reaper(self) -> None:
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._reap, name="find-link-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Release links idle past their time; ends when none is left."""
        while True:
            with self._lock:
                now = time.monotonic()
                expired = [
                    link
                    for links in self._idle.values()
                    for expires, link in links
                    if expires <= now
                ]
                for key, links in list(self._idle.items()):
                    kept = [(expires, link) for expires, link in links if expires > now]
                    if kept:
                        self._idle[key] = kept
                    else:
                        del self._idle[key]
                if not expired:
                    if not self._idle:
                        self._reaper = None
                        return
                    next_expiry = min(
                        expires for links in self._idle.values() for expires, _ in links
                    )
                    self._wake.wait(max(next_expiry - now, 0.01))
                    continue
            for link in expired:
                try:
                    link.release(RELEASE_WAIT_S)
                except Exception:  # never let one link stop the others' release
                    log.exception("find_link_release_failed")

    def release_all(self) -> None:
        """Release every idle link now (the router stops)."""
        with self._lock:
            links = [link for entries in self._idle.values() for _, link in entries]
            self._idle.clear()
            self._wake.notify_all()
        for link in links:
            link.release(RELEASE_WAIT_S)
