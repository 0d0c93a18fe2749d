"""What each destination accepts (SOP class, transfer syntax), learned from its own association
negotiation, so the router can refuse at negotiation what its destination would refuse.

Verdicts come from every association the forwarder opens and from explicit probes; they live in
memory (a verdict costs a dictionary lookup) and in the catalog (written in batches by a
background thread). A destination that cannot be reached leaves its verdicts unknown: it is
trusted to accept, as before. A verdict is forgotten when the server's address or calling AE
changes (reload); a refusal when the forwarder reconnects after an outage or a failure, and after
`refused_ttl_s`, so that a PACS reconfigured to accept a class gets asked again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from dicomrouter.catalog.models import DestinationCapability
from dicomrouter.catalog.upserts import dialect_insert
from dicomrouter.config import Config, RouterSettings, ServerConfig, calling_ae_for
from dicomrouter.logging import get_logger
from dicomrouter.net.peer import PeerUnavailable, associate_with
from dicomrouter.net.upper_layer import Link

log = get_logger(__name__)

MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8)
RELEASE_WAIT_S = 1.0
TABLE = DestinationCapability.__table__
Pair = tuple[str, str]  # (SOP class UID, transfer syntax UID)


@dataclass(frozen=True)
class Verdict:
    """What one destination does with one SOP class in the transfer syntaxes asked about."""

    accepted: tuple[str, ...]  # asked syntaxes it accepted
    refused: tuple[str, ...]  # asked syntaxes it refused
    unknown: tuple[str, ...]  # asked syntaxes never tried with it (or forgotten)
    class_accepted: bool = False  # it accepted this SOP class in some syntax, asked or not

    @property
    def state(self) -> str:
        """accepted (in at least one asked syntax) | unknown | refused (every asked syntax)."""
        if self.accepted:
            return "accepted"
        return "unknown" if self.unknown else "refused"


@dataclass(frozen=True)
class _Known:
    accepted: bool
    learned_at: float  # time.time()


def peer_key(server: ServerConfig, router: RouterSettings) -> str:
    """Who was asked: a verdict holds for this calling AE, AE title, address and TLS setting only."""
    tls = " tls" if server.tls is not None else ""
    return f"{calling_ae_for(server, 'store', router)}->{server.ae_title}@{server.host}:{server.port}{tls}"


class DestinationCapabilities:
    """Per destination server (by name): which (SOP class, transfer syntax) pairs it accepted or
    refused in its own association negotiation. Thread-safe; `start()` the writer, `stop()` at exit."""

    def __init__(
        self,
        sessions: sessionmaker[Session] | None,
        config: Callable[[], Config],
        refused_ttl_s: float = 3600.0,
        flush_interval_s: float = 0.5,
    ):
        self._sessions = sessions
        self._config = config
        self.refused_ttl_s = refused_ttl_s
        self.flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        # server name -> SOP class -> transfer syntax -> what it answered
        self._known: dict[str, dict[str, dict[str, _Known]]] = {}
        self._peers: dict[str, str] = {}  # server name -> peer_key its verdicts hold for
        self._unwritten: dict[tuple[str, str, str], dict] = {}  # (server, sop, syntax) -> row
        # server name -> which of its rows are to be deleted: True every one, False its refusals
        self._forgotten: dict[str, bool] = {}
        self._write_lock = threading.Lock()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._writer: threading.Thread | None = None
        self._load()

    # ------------------------------------------------------------------ verdicts

    def verdict(
        self, server_name: str, sop_class: str, transfer_syntaxes: Iterable[str]
    ) -> Verdict:
        """What `server_name` does with `sop_class` in each of `transfer_syntaxes` (memory only)."""
        accepted, refused, unknown = [], [], []
        oldest_refusal = time.time() - self.refused_ttl_s
        with self._lock:
            known = self._known.get(server_name, {}).get(sop_class, {})
            for syntax in transfer_syntaxes:
                entry = known.get(syntax)
                if entry is None or (not entry.accepted and entry.learned_at < oldest_refusal):
                    unknown.append(syntax)
                elif entry.accepted:
                    accepted.append(syntax)
                else:
                    refused.append(syntax)
            class_accepted = any(entry.accepted for entry in known.values())
        return Verdict(tuple(accepted), tuple(refused), tuple(unknown), class_accepted)

    def accepted_syntaxes(
        self, server_name: str, sop_class: str, transfer_syntaxes: Iterable[str]
    ) -> frozenset[str] | None:
        """The asked syntaxes `server_name` may take for `sop_class` (those it accepted, and those never
        tried, which it is trusted with); frozenset() when it refused them all; None when it was never
        asked about any of them (the front's DestinationVerdict)."""
        verdict = self.verdict(server_name, sop_class, transfer_syntaxes)
        if verdict.state == "unknown":
            return None
        return frozenset(verdict.accepted + verdict.unknown)

    def verdicts(
        self,
        servers: Sequence[ServerConfig],
        contexts: Sequence[tuple[str, Sequence[str]]],
        timeout_s: float,
    ) -> dict[str, dict[str, Verdict]]:
        """server name -> SOP class -> Verdict for each context, after probing (in parallel, within
        `timeout_s`) the servers that have not been asked about some of the pairs yet."""
        result = self._verdicts_now(servers, contexts)
        asks = [
            (
                server,
                [
                    (sop, verdict.unknown)
                    for sop, verdict in result[server.name].items()
                    if verdict.unknown
                ],
            )
            for server in servers
        ]
        asks = [(server, unknown) for server, unknown in asks if unknown]
        if not asks:
            return result
        self._probe_each(asks, timeout_s)
        return self._verdicts_now(servers, contexts)

    def _verdicts_now(
        self, servers: Sequence[ServerConfig], contexts: Sequence[tuple[str, Sequence[str]]]
    ) -> dict[str, dict[str, Verdict]]:
        return {
            server.name: {
                sop: self.verdict(server.name, sop, syntaxes) for sop, syntaxes in contexts
            }
            for server in servers
        }

    def record(
        self, server: ServerConfig, accepted: Iterable[Pair], refused: Iterable[Pair]
    ) -> None:
        """Note what `server` answered to an association proposing these pairs."""
        router = self._config().router
        key = peer_key(server, router)
        now = time.time()
        learned_at = datetime.fromtimestamp(now, UTC)
        outcomes = [(pair, True) for pair in accepted] + [(pair, False) for pair in refused]
        with self._lock:
            if self._peers.get(server.name) != key:
                self._forget_locked(server.name)
                self._peers[server.name] = key
            known = self._known.setdefault(server.name, {})
            for (sop_class, syntax), was_accepted in outcomes:
                known.setdefault(sop_class, {})[syntax] = _Known(was_accepted, now)
                self._unwritten[(server.name, sop_class, syntax)] = {
                    "server_name": server.name,
                    "sop_class_uid": sop_class,
                    "transfer_syntax_uid": syntax,
                    "accepted": was_accepted,
                    "peer": key,
                    "learned_at": learned_at,
                }
        if outcomes:
            self._wake_writer()

    def learn(self, server: ServerConfig, link: Link) -> None:
        """Record the negotiation of an association just opened to `server` (the forwarder's hook)."""
        self.record(server, link.contexts.values(), link.refused)

    def forget(self, server_name: str) -> None:
        """Drop every verdict about `server_name` (memory now, catalog with the next write)."""
        with self._lock:
            self._forget_locked(server_name)
            self._peers.pop(server_name, None)
        self._wake_writer()

    def _forget_locked(self, server_name: str) -> None:
        self._known.pop(server_name, None)
        self._forgotten[server_name] = True
        for row_key in [k for k in self._unwritten if k[0] == server_name]:
            del self._unwritten[row_key]

    def forget_refusals(self, server_name: str) -> None:
        """Drop what `server_name` refused (it may accept it now), keep what it accepted: after it
        was unreachable or failed, it may come back reconfigured (the forwarder's reconnect)."""
        with self._lock:
            for by_syntax in self._known.get(server_name, {}).values():
                for syntax in [syntax for syntax, entry in by_syntax.items() if not entry.accepted]:
                    del by_syntax[syntax]
            self._forgotten.setdefault(server_name, False)
            for row_key in [
                k
                for k, row in self._unwritten.items()
                if k[0] == server_name and not row["accepted"]
            ]:
                del self._unwritten[row_key]
        self._wake_writer()

    def config_changed(self, old: Config, new: Config) -> None:
        """A reload: forget servers that went away or now answer elsewhere (ConfigHolder.on_change)."""
        with self._lock:
            peers = dict(self._peers)
        for name, key in peers.items():
            server = new.server(name)
            if server is None or server.deleted or peer_key(server, new.router) != key:
                log.info("destination_capabilities_forgotten", server=name, reason="config changed")
                self.forget(name)

    # ------------------------------------------------------------------ probes

    def probe(
        self,
        servers: Sequence[ServerConfig],
        contexts: Sequence[tuple[str, Sequence[str]]],
        timeout_s: float,
    ) -> None:
        """Ask each server, in parallel, about every (SOP class, transfer syntax) in `contexts`: one
        presentation context per pair, up to 128 per association. Returns once every answer is
        recorded or `timeout_s` passed; a server that cannot be reached (or rejects the
        association) leaves its verdicts unknown."""
        self._probe_each([(server, contexts) for server in servers], timeout_s)

    def _probe_each(
        self,
        asks: Sequence[tuple[ServerConfig, Sequence[tuple[str, Sequence[str]]]]],
        timeout_s: float,
    ) -> None:
        router = self._config().router
        deadline = time.monotonic() + timeout_s
        finished: list[threading.Event] = []
        for server, contexts in asks:
            pairs = list(
                dict.fromkeys((sop, syntax) for sop, syntaxes in contexts for syntax in syntaxes)
            )
            for start in range(0, len(pairs), MAX_CONTEXTS):
                event = threading.Event()
                finished.append(event)
                threading.Thread(
                    target=self._probe_one,
                    args=(server, router, pairs[start : start + MAX_CONTEXTS], deadline, event),
                    name=f"probe-{server.name}",
                    daemon=True,
                ).start()
        for event in finished:
            event.wait(max(deadline - time.monotonic(), 0))

    def _probe_one(
        self,
        server: ServerConfig,
        router: RouterSettings,
        pairs: list[Pair],
        deadline: float,
        finished: threading.Event,
    ) -> None:
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            calling_ae = calling_ae_for(server, "store", router)
            contexts = [(sop, [syntax]) for sop, syntax in pairs]
            try:
                link = associate_with(server, router, calling_ae, contexts, remaining)
            except PeerUnavailable as exc:
                log.info(
                    "capability_probe_failed",
                    server=server.name,
                    status=exc.status,
                    reason=exc.reason,
                )
                return
            self.learn(server, link)
        finally:
            finished.set()
        log.info(
            "capability_probed",
            server=server.name,
            accepted=len(link.contexts),
            refused=len(link.refused),
        )
        link.release(
            RELEASE_WAIT_S
        )  # after the answer is recorded: the caller does not wait for it

    # ------------------------------------------------------------------ the catalog

    def _load(self) -> None:
        """Verdicts kept by the catalog, for servers still at the address they were learned from."""
        if self._sessions is None:
            return
        config = self._config()
        current = {s.name: peer_key(s, config.router) for s in config.live_servers()}
        with self._sessions() as session:
            rows = session.execute(
                select(
                    TABLE.c.server_name,
                    TABLE.c.sop_class_uid,
                    TABLE.c.transfer_syntax_uid,
                    TABLE.c.accepted,
                    TABLE.c.peer,
                    TABLE.c.learned_at,
                )
            ).all()
        for name, sop_class, syntax, accepted, peer, learned_at in rows:
            if current.get(name) != peer:
                self._forgotten[name] = True  # learned from another address, or a server gone
                continue
            self._peers[name] = peer
            if learned_at.tzinfo is None:
                learned_at = learned_at.replace(tzinfo=UTC)
            by_class = self._known.setdefault(name, {}).setdefault(sop_class, {})
            by_class[syntax] = _Known(accepted, learned_at.timestamp())
        for name in self._peers:
            self._forgotten.pop(name, None)

    def flush(self) -> None:
        """Write what is waiting now (the writer thread does this every `flush_interval_s`)."""
        if self._sessions is None:
            return
        with self._write_lock:
            with self._lock:
                rows, self._unwritten = list(self._unwritten.values()), {}
                forgotten, self._forgotten = self._forgotten, {}
            try:
                with self._sessions.begin() as session:
                    connection = session.connection()
                    for name, everything in forgotten.items():
                        rows_of = delete(TABLE).where(TABLE.c.server_name == name)
                        connection.execute(
                            rows_of if everything else rows_of.where(TABLE.c.accepted.is_(False))
                        )
                    if rows:  # one upsert for all: several router nodes may learn the same pair
                        upsert = dialect_insert(session, DestinationCapability)
                        connection.execute(
                            upsert.on_conflict_do_update(
                                index_elements=[
                                    "server_name",
                                    "sop_class_uid",
                                    "transfer_syntax_uid",
                                ],
                                set_={
                                    name: upsert.excluded[name]
                                    for name in ("accepted", "peer", "learned_at")
                                },
                            ),
                            rows,
                        )
            except Exception as exc:
                log.warning(
                    "destination_capabilities_write_failed", rows=len(rows), reason=str(exc)[:200]
                )
                with self._lock:  # keep them for the next round, unless newer ones came meanwhile
                    for row in rows:
                        key = (row["server_name"], row["sop_class_uid"], row["transfer_syntax_uid"])
                        if row["server_name"] not in self._forgotten:
                            self._unwritten.setdefault(key, row)
                    for name, everything in forgotten.items():
                        self._forgotten[name] = everything or self._forgotten.get(name, False)

    def start(self) -> DestinationCapabilities:
        if self._sessions is not None and self._writer is None:
            self._writer = threading.Thread(
                target=self._run, name="capabilities-writer", daemon=True
            )
            self._writer.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._writer is not None:
            self._writer.join(timeout_s)
        self.flush()

    def _wake_writer(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self._unwritten and not self._forgotten:
                    self._wakeup.wait()
                if self._stopping:
                    return
            self.flush()
            with self._wakeup:  # let records gather: one transaction for many
                if not self._stopping:
                    self._wakeup.wait(self.flush_interval_s)
