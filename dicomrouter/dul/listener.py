"""The listening socket and what a connection may cost before anyone knows who it is.

One accept thread takes connections; each admitted connection gets one thread, which does the
TLS handshake, reads the A-ASSOCIATE-RQ and serves the association. The table of connections
bounds what a caller can hold:

- at most `max_associations` associations; callers that are not configured clients or servers
  cannot take the last quarter of them;
- at most `max_associations` connections (at least 8) still waiting for their A-ASSOCIATE-RQ,
  and `max_pending_per_address` of them per source address. When a new connection finds no room,
  the oldest *silent* waiting connection (not a byte sent) is dropped for it, those
  of addresses no client or server is configured at first: idle sockets cannot lock a modality out;
- beyond that, as many again are read briefly and answered A-ASSOCIATE-RJ "local limit exceeded";
  anything more is closed at once. Threads and descriptors are bounded by these three numbers;
- accept() failing for lack of descriptors (EMFILE) backs off instead of spinning.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dicomrouter.dul.connection import Connection
from dicomrouter.logging import get_logger

log = get_logger(__name__)

LISTEN_BACKLOG = 512
ACCEPT_BACKOFF_S = (0.05, 1.0)  # first and longest pause after accept() fails for lack of resources
RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# A connection silent this long may be dropped to make room; a requestor sends its A-ASSOCIATE-RQ
# within milliseconds of connecting, so a younger one is probably a caller mid-connect.
SILENT_EVICTION_AGE_S = 0.2


@dataclass(frozen=True)
class ConnectionLimits:
    max_associations: int
    max_pending: int
    max_pending_per_address: int
    max_refusing: int

    @classmethod
    def for_associations(cls, max_associations: int, per_address: int) -> ConnectionLimits:
        return cls(max_associations, max(max_associations, 8), max(per_address, 1), max(max_associations, 8))

    @property
    def reserved_for_known(self) -> int:
        """Association slots only configured callers may take."""
        return max(1, self.max_associations // 4) if self.max_associations > 1 else 0


class ConnectionTable:
    """Who is connected, in which state; every decision about room is taken under one lock."""

    def __init__(self, limits: Callable[[], ConnectionLimits], known_address: Callable[[str], bool]):
        self._limits = limits
        self._known_address = known_address
        self._lock = threading.Lock()
        self.pending: list[Connection] = []  # oldest first
        self.associated: set[Connection] = set()
        self.refusing: set[Connection] = set()

    @property
    def limits(self) -> ConnectionLimits:
        return self._limits()

    @staticmethod
    def _evictable(connection: Connection, now: float) -> bool:
        """Connected a while ago and not a byte sent: not read by its thread yet (a flood delays threads)
        and nothing waiting in the socket either."""
        if connection.heard_from or now - connection.accepted_at < SILENT_EVICTION_AGE_S:
            return False
        try:
            readable, _, _ = select.select([connection.sock], [], [], 0)
        except (OSError, ValueError):
            return True  # already closed
        return not readable

    def admit(self, connection: Connection) -> tuple[str, list[Connection]]:
        """('pending' | 'refuse' | 'close', connections to drop to make room)."""
        limits = self.limits
        now = time.monotonic()
        with self._lock:
            evicted: list[Connection] = []
            same_address = [c for c in self.pending if c.address == connection.address]
            if len(same_address) >= limits.max_pending_per_address:
                victim = next((c for c in same_address if self._evictable(c, now)), None)
                if victim is None:
                    return self._refuse_or_close(connection, limits), []
                evicted.append(victim)
                self.pending.remove(victim)
            if len(self.pending) >= limits.max_pending:
                silent = [c for c in self.pending if self._evictable(c, now)]
                unknown = [c for c in silent if not self._known_address(c.address)]
                victim = (unknown or silent or [None])[0]
                if victim is None:
                    return self._refuse_or_close(connection, limits), evicted
                evicted.append(victim)
                self.pending.remove(victim)
            self.pending.append(connection)
            return "pending", evicted

    def _refuse_or_close(self, connection: Connection, limits: ConnectionLimits) -> str:
        if len(self.refusing) < limits.max_refusing:
            self.refusing.add(connection)
            return "refuse"
        return "close"

    def associate(self, connection: Connection, known_caller: bool) -> bool:
        """Move a pending connection to the associated ones if there is room for its kind of caller."""
        limits = self.limits
        with self._lock:
            room = limits.max_associations - len(self.associated)
            if not known_caller:
                room -= limits.reserved_for_known
            if room <= 0:
                return False
            if connection in self.pending:
                self.pending.remove(connection)
            self.associated.add(connection)
            return True

    def refusing_now(self, connection: Connection) -> bool:
        """A pending connection being answered with a refusal: it no longer holds a waiting slot. True
        when it may linger for the requestor to close first (there is room among the refusing ones)."""
        limits = self.limits
        with self._lock:
            if connection in self.pending:
                self.pending.remove(connection)
            if connection in self.refusing:
                return True
            if len(self.refusing) < limits.max_refusing:
                self.refusing.add(connection)
                return True
            return False

    def remove(self, connection: Connection) -> None:
        with self._lock:
            if connection in self.pending:
                self.pending.remove(connection)
            self.associated.discard(connection)
            self.refusing.discard(connection)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"associated": len(self.associated), "pending": len(self.pending), "refusing": len(self.refusing)}

    def everyone(self) -> list[Connection]:
        with self._lock:
            return [*self.pending, *self.associated, *self.refusing]


# (connection, ssl-wrapped or plain socket, admitted as pending: True, or to be refused: False) -> None
ConnectionHandler = Callable[[Connection, bool], None]


class Listener:
    """Accepts connections on one port and hands each to `handle` on its own thread."""

    def __init__(
        self,
        host: str,
        port: int,
        table: ConnectionTable,
        handle: ConnectionHandler,
        tls_context: Callable[[], ssl.SSLContext | None],
        on_refused: Callable[[str], None] = lambda address: None,
    ):
        self.table = table
        self._on_refused = on_refused
        self._handle = handle
        self._tls_context = tls_context
        self._socket = socket.create_server((host, port), backlog=LISTEN_BACKLOG, reuse_port=False)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._socket.getsockname()[:2]
        return host, port

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        backoff = ACCEPT_BACKOFF_S[0]
        while not self._stopping.is_set():
            try:
                sock, peer = self._socket.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                if exc.errno in RESOURCE_ERRORS:
                    log.error("accept_failed", reason=str(exc), retry_in_s=backoff)
                    self._drop_oldest_silent()
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, ACCEPT_BACKOFF_S[1])
                else:
                    log.warning("accept_failed", reason=str(exc))
                continue
            backoff = ACCEPT_BACKOFF_S[0]
            try:
                self._admit(sock, peer[0])
            except Exception:  # never let one connection stop the port
                log.exception("accept_failed", address=peer[0])
                sock.close()

    def _admit(self, sock: socket.socket, address: str) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        context = self._tls_context()
        if context is not None:
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        connection = Connection(sock, address)
        verdict, evicted = self.table.admit(connection)
        for victim in evicted:
            log.info("connection_dropped", address=victim.address, reason="silent while others waited for room")
            victim.close()
        if verdict == "close":
            connection.close()
            self._on_refused(address)
            return
        threading.Thread(
            target=self._run, args=(connection, verdict == "pending"), name="dicom-association", daemon=True
        ).start()

    def _run(self, connection: Connection, admitted: bool) -> None:
        try:
            self._handle(connection, admitted)
        except Exception:
            log.exception("association_failed", address=connection.address)
            connection.abort()
        finally:
            connection.close()
            self.table.remove(connection)

    def _drop_oldest_silent(self) -> None:
        for connection in self.table.everyone():
            if not connection.is_established and not connection.heard_from:
                log.warning("connection_dropped", address=connection.address, reason="out of file descriptors")
                connection.close()
                return

    def stop_accepting(self) -> None:
        self._stopping.set()
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._socket.close()
        if self._thread is not None:
            self._thread.join(5.0)
