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

With several worker processes (`router.workers`) these numbers hold for all of them together:
each worker's table also counts what the others hold (dicomrouter/dul/shared_counts.py).
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dicomrouter.dul.connection import Connection
from dicomrouter.dul.shared_counts import (
    CLAIM_POLL_S,
    CLAIM_WAIT_S,
    ENTRIES_PER_SLOT,
    PEER_CLOSED,
    PEER_SILENT,
    PEER_SPOKE,
    OtherCounts,
    SharedCounts,
    WaitingEntry,
)
from dicomrouter.logging import get_logger

log = get_logger(__name__)

LISTEN_BACKLOG = 512
# A worker whose turn it is not waits this long before it takes a connection the one named has not.
ACCEPT_DEFER_S = 0.01
ACCEPT_BACKOFF_S = (0.05, 1.0)  # first and longest pause after accept() fails for lack of resources
RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# A connection silent this long may be dropped to make room; a requestor sends its A-ASSOCIATE-RQ
# within milliseconds of connecting, so a younger one is probably a caller mid-connect.
SILENT_EVICTION_AGE_S = 0.2
CLAIM_ATTEMPTS = 3  # claims on other workers' silent connections for one new connection
NO_OTHERS = OtherCounts()  # a single-process router: nobody else holds anything


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

    def __init__(
        self,
        limits: Callable[[], ConnectionLimits],
        known_address: Callable[[str], bool],
        shared: SharedCounts | None = None,
    ):
        self._limits = limits
        self._known_address = known_address
        self._lock = threading.Lock()
        # With several workers, what the others hold counts too (dicomrouter/dul/shared_counts.py).
        self._shared = shared
        self._ids: dict[Connection, int] = {}  # waiting connections as the shared table names them
        self._next_id = itertools.count(1)
        self.pending: list[Connection] = []  # oldest first
        self.associated: set[Connection] = set()
        self.refusing: set[Connection] = set()

    @property
    def limits(self) -> ConnectionLimits:
        return self._limits()

    @property
    def shared(self) -> bool:
        return self._shared is not None

    @contextmanager
    def _deciding(self, address: str = "") -> Iterator[OtherCounts]:
        """This table to the calling thread and the shared one to this worker; yields what the other
        workers hold, closes what they claimed from this one, and publishes this worker's counts."""
        with self._lock:
            if self._shared is None:
                yield NO_OTHERS
                return
            with self._shared.locked():
                self._close_claimed(self._shared.take_claims())
                try:
                    yield self._shared.others(address)
                finally:
                    self._publish()

    def _publish(self) -> None:
        assert self._shared is not None
        states = _peer_states([c for c in self.pending if not c.heard_from])
        waiting = [
            WaitingEntry(self._ids[c], c.address, c.accepted_at, states.get(c, PEER_SPOKE))
            for c in self.pending
            if c in self._ids
        ]
        self._shared.publish(waiting, len(self.associated), len(self.refusing))

    def _close_claimed(self, claimed: set[int]) -> None:
        """Close this worker's connections another worker dropped to make room (if still silent)."""
        if not claimed:
            return
        now = time.monotonic()
        for connection in [c for c in self.pending if self._ids.get(c) in claimed]:
            if self._evictable(connection, now, min_age=0.0):
                self._forget_pending(connection)
                log.info("connection_dropped", address=connection.address, reason="silent while others waited for room")
                connection.close()

    def collect_claims(self) -> None:
        """Close what other workers claimed, now (the listener calls this every CLAIM_POLL_S)."""
        with self._deciding():
            pass

    def _forget_pending(self, connection: Connection) -> None:
        if connection in self.pending:
            self.pending.remove(connection)
        self._ids.pop(connection, None)

    @staticmethod
    def _evictable(connection: Connection, now: float, min_age: float = SILENT_EVICTION_AGE_S) -> bool:
        """Connected a while ago and not a byte sent: not read by its thread yet (a flood delays threads)
        and nothing waiting in the socket either."""
        if connection.heard_from:
            return False
        state = _peer_states([connection])[connection]
        return state == PEER_CLOSED or (state == PEER_SILENT and now - connection.accepted_at >= min_age)

    def admit(self, connection: Connection) -> tuple[str, list[Connection]]:
        """('pending' | 'refuse' | 'close', connections to drop to make room)."""
        evicted: list[Connection] = []
        for _attempt in range(CLAIM_ATTEMPTS):
            verdict, claim = self._admit_once(connection, evicted)
            if claim is None:
                return verdict, evicted
            self._await_claim(claim)  # then decide again: the claimed one closed, or it spoke meanwhile
        verdict, _ = self._admit_once(connection, evicted, may_claim=False)
        return verdict, evicted

    def _admit_once(
        self, connection: Connection, evicted: list[Connection], may_claim: bool = True
    ) -> tuple[str, tuple[int, int] | None]:
        """A verdict, or a claim on another worker's silent connection to wait for and decide again."""
        limits = self.limits
        now = time.monotonic()
        with self._deciding(connection.address) as others:
            same_address = [c for c in self.pending if c.address == connection.address]
            if len(same_address) + others.pending_from_address >= limits.max_pending_per_address:
                victim = next((c for c in same_address if self._evictable(c, now)), None)
                if victim is None:
                    claim = self._claim_elsewhere(now, connection.address) if may_claim else None
                    return (("claim", claim) if claim else (self._refuse_or_close(connection, limits, others), None))
                evicted.append(victim)
                self._forget_pending(victim)
            if len(self.pending) + others.pending >= limits.max_pending or self._slot_full():
                silent = [c for c in self.pending if self._evictable(c, now)]
                unknown = [c for c in silent if not self._known_address(c.address)]
                claim = None
                if not unknown and may_claim:
                    claim = self._claim_elsewhere(now, None, unknown_only=True)
                    if claim is None and not silent:
                        claim = self._claim_elsewhere(now, None)
                if claim is not None:
                    return "claim", claim
                victim = (unknown or silent or [None])[0]
                if victim is None:
                    return self._refuse_or_close(connection, limits, others), None
                evicted.append(victim)
                self._forget_pending(victim)
            self.pending.append(connection)
            self._ids[connection] = next(self._next_id)
            return "pending", None

    def _claim_elsewhere(self, now: float, address: str | None, unknown_only: bool = False) -> tuple[int, int] | None:
        """Ask another worker to drop its oldest silent connection (from `address`; of an address no
        client or server is configured at, with `unknown_only`). Never when this worker's share is full."""
        if self._shared is None or self._slot_full():
            return None
        accept = (lambda a: not self._known_address(a)) if unknown_only else (lambda _a: True)
        return self._shared.claim_silent(now - SILENT_EVICTION_AGE_S, address, accept)

    def _await_claim(self, claim: tuple[int, int]) -> None:
        """Until the claimed connection's worker answered the claim (or CLAIM_WAIT_S passed), locks released."""
        assert self._shared is not None
        deadline = time.monotonic() + CLAIM_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(CLAIM_POLL_S / 5)
            with self._lock, self._shared.locked():
                if not self._shared.claim_pending(claim):
                    return

    def _slot_full(self) -> bool:
        """This worker's share of the shared table cannot take one more waiting connection."""
        return self._shared is not None and len(self.pending) >= ENTRIES_PER_SLOT

    def _refuse_or_close(self, connection: Connection, limits: ConnectionLimits, others: OtherCounts) -> str:
        if len(self.refusing) + others.refusing < limits.max_refusing:
            self.refusing.add(connection)
            return "refuse"
        return "close"

    def associate(self, connection: Connection, known_caller: bool) -> bool:
        """Move a pending connection to the associated ones if there is room for its kind of caller."""
        limits = self.limits
        with self._deciding() as others:
            room = limits.max_associations - len(self.associated) - others.associated
            if not known_caller:
                room -= limits.reserved_for_known
            if room <= 0:
                return False
            self._forget_pending(connection)
            self.associated.add(connection)
            return True

    def refusing_now(self, connection: Connection) -> bool:
        """A pending connection being answered with a refusal: it no longer holds a waiting slot. True
        when it may linger for the requestor to close first (there is room among the refusing ones)."""
        limits = self.limits
        with self._deciding() as others:
            self._forget_pending(connection)
            if connection in self.refusing:
                return True
            if len(self.refusing) + others.refusing < limits.max_refusing:
                self.refusing.add(connection)
                return True
            return False

    def remove(self, connection: Connection) -> None:
        with self._deciding():
            self._forget_pending(connection)
            self.associated.discard(connection)
            self.refusing.discard(connection)

    def next_to_accept(self) -> bool:
        """Whether this worker should take the next connection on the port it shares with others."""
        if self._shared is None:
            return True
        with self._deciding() as _others:
            return self._shared.next_to_accept()

    def took_connection(self) -> None:
        if self._shared is not None:
            with self._deciding():
                self._shared.took_connection()

    def counts(self) -> dict[str, int]:
        """What the router holds now (every worker's connections)."""
        with self._deciding() as others:
            return {
                "associated": len(self.associated) + others.associated,
                "pending": len(self.pending) + others.pending,
                "refusing": len(self.refusing) + others.refusing,
            }

    def everyone(self) -> list[Connection]:
        with self._lock:
            return [*self.pending, *self.associated, *self.refusing]


def _peer_states(connections: list[Connection]) -> dict[Connection, int]:
    """PEER_SILENT, PEER_SPOKE (bytes wait in the socket, unread) or PEER_CLOSED (closed without a
    byte, like a port probe: nobody waits on it), by one poll() for all of them."""
    states = dict.fromkeys(connections, PEER_SILENT)
    poller = select.poll()
    by_fd: dict[int, Connection] = {}
    for connection in connections:
        try:
            fd = connection.sock.fileno()
        except (OSError, ValueError):
            fd = -1
        if fd < 0:
            states[connection] = PEER_CLOSED
            continue
        by_fd[fd] = connection
        poller.register(fd, select.POLLIN)
    if by_fd:
        for fd, _events in poller.poll(0):
            if fd in by_fd:
                states[by_fd[fd]] = _readable_state(by_fd[fd].sock)
    return states


def _readable_state(sock: socket.socket) -> int:
    """A readable socket: bytes to read, or the end of the stream? Peeks at the TCP bytes (under TLS
    too), never consuming them."""
    try:
        return PEER_SPOKE if socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) else PEER_CLOSED
    except BlockingIOError:
        return PEER_SILENT
    except OSError:
        return PEER_CLOSED  # reset


# (connection, ssl-wrapped or plain socket, admitted as pending: True, or to be refused: False) -> None
ConnectionHandler = Callable[[Connection, bool], None]


class Listener:
    """Accepts connections on one port and hands each to `handle` on its own thread.

    A worker of several is given the listening socket its supervisor bound (`shared_socket`): every
    worker waits on it, and the one the shared table names takes each connection
    (`ConnectionTable.next_to_accept`); the others look again a moment later and take it only if it is
    still there (that worker was busy). So associations spread evenly, and a connection arriving while
    a worker restarts waits in the one backlog for the others instead of being reset with it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        table: ConnectionTable,
        handle: ConnectionHandler,
        tls_context: Callable[[], ssl.SSLContext | None],
        on_refused: Callable[[str], None] = lambda address: None,
        shared_socket: socket.socket | None = None,
    ):
        self.table = table
        self._on_refused = on_refused
        self._handle = handle
        self._tls_context = tls_context
        self._socket = shared_socket or socket.create_server((host, port), backlog=LISTEN_BACKLOG)
        # Non-blocking: another worker may take the connection between poll() and accept().
        self._socket.setblocking(False)
        self._wake_read, self._wake_write = os.pipe()  # stop_accepting interrupts the poll
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._socket.getsockname()[:2]
        return host, port

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._thread.start()
        if self.table.shared:
            threading.Thread(target=self._claims_loop, name="dicom-claims", daemon=True).start()

    def _claims_loop(self) -> None:
        """Close the silent connections other workers claimed to make room, soon after they did."""
        while not self._stopping.wait(CLAIM_POLL_S):
            try:
                self.table.collect_claims()
            except Exception:  # never let the table stop this loop
                log.exception("claims_check_failed")

    def _accept_loop(self) -> None:
        backoff = ACCEPT_BACKOFF_S[0]
        poller = select.poll()
        poller.register(self._socket, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        while not self._stopping.is_set():
            poller.poll()
            if self._stopping.is_set():
                return
            if not self.table.next_to_accept() and self._stopping.wait(ACCEPT_DEFER_S):
                return  # another worker's turn: it has a moment to take the connection
            try:
                sock, peer = self._socket.accept()
            except BlockingIOError:
                continue  # another worker took it
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
            self.table.took_connection()
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
        """Stop taking connections and close this process's descriptor of the port (never shutdown():
        a shared socket would stop listening for every worker)."""
        self._stopping.set()
        os.write(self._wake_write, b"\0")
        if self._thread is not None:
            self._thread.join(5.0)
        self._socket.close()
        os.close(self._wake_read)
        os.close(self._wake_write)
