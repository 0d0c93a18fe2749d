"""Federated C-FIND: one query to several PACS in parallel, answers streamed, merged, de-duplicated.

Merge policy while streaming: an answer cannot be taken back once sent. So the first copy of an
entity (a patient, study, series or image, by its unique key) is held until every other server
still answering has finished, or for at most `merge_window_s` after it arrived, whichever comes
first. The copies that arrived by then are merged: the most complete copy (by its
NumberOf...RelatedInstances) wins, then the primary's, then server order; attributes it lacks are
filled from the others, counts are never summed, and each server's count is kept beside the
answer (the CLI shows them when copies differ). A copy arriving after
its entity was sent only adds its server to the holders (the catalog and the CLI see it). PACS
that answer within the window of each other are merged fully; a slow PACS delays no answer by
more than the window. The CLI waits for every server (`merge_window_s=None`).

A worklist item is one scheduled procedure step (see `worklist_item_key`): items alike are copies
only across servers, the n-th of one server with the n-th of another; one server's are all sent.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydicom import Dataset

from dicomrouter.config import RouterSettings, ServerConfig
from dicomrouter.logging import get_logger
from dicomrouter.net.encoding import EXPLICIT_VR_LE, IMPLICIT_VR_LE, RawAnswer, encode_dataset
from dicomrouter.net.find_client import PeerFind, PeerFindError
from dicomrouter.net.link_pool import LinkPool
from dicomrouter.query.learn import RecentlyLearned, learn_from_answers
from dicomrouter.query.merge import (
    answer_key,
    distinct_within_server,
    instance_count,
    keyword_tags,
    merge_copies,
    most_complete_first,
    prepare_query,
    raw_answer_key,
)

log = get_logger(__name__)

DEFAULT_MERGE_WINDOW_S = 0.010
CANCEL_POLL_S = 0.01  # how often a waiting query looks for the caller's C-CANCEL
# Catalog learning writes when no query has been in flight for LEARN_QUIET_S, or after
# LEARN_MAX_WAIT_S per batch: its writes hold the GIL for a good part of a second per few
# hundred studies, which a workstation's next query would wait for.
LEARN_QUIET_S = 0.2
LEARN_MAX_WAIT_S = 5.0
FAILED_STATES = ("unreachable", "rejected", "timeout", "failed", "aborted")
# The query goes to the servers once every association is established, or this long after a server
# accepted (see FederatedFind._wait_for_associations).
ASSOCIATIONS_WAIT_S = 0.05


@dataclass
class ServerReport:
    """How one server did in one federated query."""

    name: str
    state: str = "running"  # running | ok | cancelled | one of FAILED_STATES
    reason: str = ""
    answers: int = 0
    first_answer_ms: float | None = None
    elapsed_ms: float | None = None

    @property
    def failed(self) -> bool:
        return self.state in FAILED_STATES

    def as_dict(self) -> dict[str, object]:
        return {
            "server": self.name,
            "state": self.state,
            "reason": self.reason,
            "answers": self.answers,
            "first_answer_ms": self.first_answer_ms,
            "elapsed_ms": self.elapsed_ms,
        }


RETRIEVE_AE_TITLE = 0x00080054


class FederatedAnswer:
    """One merged answer: `identifier` as a data set, or `encode` it for the wire.

    An answer only one server gave is kept as that server's bytes (`raw`), with the keys to strip
    and the Retrieve AE Title to set: the C-FIND front sends it spliced, never decoded.
    """

    def __init__(
        self,
        identifier: Dataset | None,
        servers: list[str],
        counts: dict[str, int | None] | None = None,
        *,
        raw: RawAnswer | None = None,
        strip: frozenset[str] = frozenset(),
        retrieve_ae: str | None = None,
        strip_tags: tuple[int, ...] | None = None,
    ):
        self._identifier = identifier
        self.servers = servers  # every server found holding it; grows while the query runs
        # Instances each server's copy holds (NumberOf...RelatedInstances), when the answers say.
        self.counts: dict[str, int | None] = counts if counts is not None else {}
        self._raw = raw
        self._strip = strip
        self._retrieve_ae = retrieve_ae
        # `strip` as tags (None: a key inside a sequence, which only pydicom strips); once per query
        self._strip_tags = strip_tags if strip_tags is not None else keyword_tags(strip)

    @property
    def identifier(self) -> Dataset:
        if self._identifier is None:
            assert self._raw is not None
            self._identifier = merge_copies([self._raw.dataset()], self._strip, self._retrieve_ae)
        return self._identifier

    def encode(self, transfer_syntax: str) -> bytes | None:
        """The answer in `transfer_syntax`, None when it cannot be encoded."""
        if (
            self._identifier is None
            and self._raw is not None
            and transfer_syntax in (IMPLICIT_VR_LE, EXPLICIT_VR_LE)
        ):
            strip = self._strip_tags
            added = [(RETRIEVE_AE_TITLE, "AE", self._retrieve_ae)] if self._retrieve_ae else []
            if strip is not None:
                encoded = self._raw.encode(transfer_syntax == IMPLICIT_VR_LE, strip, added)
                if encoded is not None:
                    return encoded
        return encode_dataset(self.identifier, transfer_syntax)

    @property
    def copies_differ(self) -> bool:
        return len(set(self.counts.values())) > 1

    @property
    def incomplete(self) -> list[str]:
        """Servers whose copy holds fewer instances than the most complete one."""
        most = max((count or 0 for count in self.counts.values()), default=0)
        return [name for name, count in self.counts.items() if (count or 0) < most]


@dataclass
class FindSummary:
    outcome: str  # complete | partial | failed | cancelled | limited
    servers: list[ServerReport]
    answers: int
    elapsed_ms: float

    @property
    def failed_servers(self) -> list[ServerReport]:
        return [r for r in self.servers if r.failed]

    def failure_comment(self, limit: int = 64) -> str:
        """Names and reasons for an Error Comment (LO: 64 characters), most detail that fits."""
        failed = self.failed_servers
        detailed = "; ".join(f"{r.name}: {r.state} ({r.reason})" for r in failed)
        if len(detailed) <= limit:
            return detailed
        by_state: dict[str, list[str]] = {}
        for report in failed:
            by_state.setdefault(report.state, []).append(report.name)
        grouped = "; ".join(f"{state}: {', '.join(names)}" for state, names in by_state.items())
        return grouped if len(grouped) <= limit else grouped[: limit - 3] + "..."


@dataclass
class _Entry:
    arrived: float
    copies: dict[int, RawAnswer] = field(default_factory=dict)  # rank -> answer


class Federation:
    """Starts federated queries; owns the background thread that teaches the catalog."""

    def __init__(
        self,
        catalog=None,
        merge_window_s: float | None = DEFAULT_MERGE_WINDOW_S,
        keep_links: bool = True,
    ):
        self.catalog = catalog
        self.merge_window_s = merge_window_s
        # Associations kept for the next query (router.find_keepalive); a one-shot command keeps none.
        self.links = LinkPool() if keep_links else None
        self.failures: Counter[str] = Counter()  # server name -> failed queries, since start
        self._failures_lock = threading.Lock()
        self._last_elapsed_ms: dict[str, float] = {}  # server name -> its last complete answer took
        self._learner = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="find-learn") if catalog else None
        )
        self._recent = RecentlyLearned()
        self._in_flight = 0
        self._last_finished = float("-inf")
        self._closing = False
        self._quiet = threading.Condition()

    def start(
        self,
        servers: Sequence[ServerConfig],
        router: RouterSettings,
        query_model: str,
        identifier: Dataset,
        level: str,
        retrieve_ae: str | None,
        *,
        timeout_s: float | None = None,
        max_results: int | None = None,
        calling_ae: str = "",
    ) -> FederatedFind:
        """Send the query to every server now; iterate `answers()` of the result."""
        run = FederatedFind(
            self,
            list(servers),
            router,
            query_model,
            identifier,
            level,
            retrieve_ae,
            timeout_s or router.find_timeout_s,
            max_results or router.max_find_results,
            calling_ae,
        )
        run.start()
        return run

    def count_failure(self, server_name: str) -> None:
        with self._failures_lock:
            self.failures[server_name] += 1

    def note_elapsed(self, server_name: str, elapsed_ms: float) -> None:
        with self._failures_lock:
            self._last_elapsed_ms[server_name] = elapsed_ms

    def slowest_first(self, server_names: Sequence[str]) -> list[int]:
        """Indexes of `server_names`, the one that took longest last time first (unknown ones first)."""
        with self._failures_lock:
            last = dict(self._last_elapsed_ms)
        return sorted(
            range(len(server_names)), key=lambda i: -last.get(server_names[i], float("inf"))
        )

    def learn(self, level: str, answers: list[tuple[str, RawAnswer]]) -> None:
        """Record where the answered studies are, off the caller's path."""
        if self._learner is not None and answers and level not in ("PATIENT", "WORKLIST"):
            self._learner.submit(
                learn_from_answers, self.catalog, answers, self._recent, self._wait_quiet
            )

    def _query_started(self) -> None:
        with self._quiet:
            self._in_flight += 1

    def _query_finished(self) -> None:
        with self._quiet:
            self._in_flight -= 1
            self._last_finished = time.monotonic()
            self._quiet.notify_all()

    def _wait_quiet(self) -> None:
        """Until no query has run for LEARN_QUIET_S, or LEARN_MAX_WAIT_S passed."""
        deadline = time.monotonic() + LEARN_MAX_WAIT_S
        with self._quiet:
            while (now := time.monotonic()) < deadline and not self._closing:
                if self._in_flight:
                    self._quiet.wait(deadline - now)
                    continue
                quiet_for = now - self._last_finished
                if quiet_for >= LEARN_QUIET_S:
                    return
                self._quiet.wait(min(LEARN_QUIET_S - quiet_for, deadline - now))

    def close(self, wait: bool = True) -> None:
        with self._quiet:
            self._closing = True  # no query will come: learn at once
            self._quiet.notify_all()
        if self._learner is not None:
            self._learner.shutdown(wait=wait)
        if self.links is not None:
            self.links.release_all()


class FederatedFind:
    """One query in flight: peer threads push into a queue, `answers()` merges and streams."""

    def __init__(
        self,
        federation: Federation,
        servers: list[ServerConfig],
        router: RouterSettings,
        query_model: str,
        identifier: Dataset,
        level: str,
        retrieve_ae: str | None,
        timeout_s: float,
        max_results: int,
        calling_ae: str,
    ):
        self.federation = federation
        self.level = level
        self.retrieve_ae = retrieve_ae
        self.timeout_s = timeout_s
        self.max_results = max_results
        self.calling_ae = calling_ae
        query, self._strip = prepare_query(identifier, level)
        self._strip_tags = keyword_tags(self._strip)
        # Per server, how many of its answers had each key so far (when they are all distinct).
        self._occurrences: list[Counter[object]] | None = (
            [Counter() for _ in servers] if distinct_within_server(level) else None
        )
        self.peers = [
            PeerFind(s, router, query_model, query, timeout_s, federation.links) for s in servers
        ]
        self.reports = [ServerReport(s.name) for s in servers]
        self.summary: FindSummary | None = None
        self._queue: queue.SimpleQueue[tuple[int, RawAnswer | None]] = queue.SimpleQueue()
        self._started = 0.0
        self._reports_lock = threading.Lock()
        self._associating = set(range(len(servers)))  # ranks still associating
        self._associated = threading.Event()

    def start(self) -> None:
        self._started = time.monotonic()
        # Starting a thread waits for it to run: the server likely to answer last gets its query first.
        for rank in self.federation.slowest_first([peer.server.name for peer in self.peers]):
            threading.Thread(
                target=self._run_peer,
                args=(rank,),
                name=f"find-{self.peers[rank].server.name}",
                daemon=True,
            ).start()

    def _ms(self) -> float:
        return round((time.monotonic() - self._started) * 1000, 1)

    def _run_peer(self, rank: int) -> None:
        peer, report = self.peers[rank], self.reports[rank]
        state, reason = "ok", ""
        try:
            for answer in peer.raw_answers(associated=lambda: self._wait_for_associations(rank)):
                if report.first_answer_ms is None:
                    report.first_answer_ms = self._ms()
                self._queue.put((rank, answer))
            if peer.cancelled:
                state = "cancelled"
        except PeerFindError as exc:
            state, reason = exc.kind, exc.reason
        except Exception as exc:  # a bug or an unexpected peer: one server, not the query
            log.exception("find_peer_crashed", server=peer.server.name)
            state, reason = "failed", f"internal error: {exc.__class__.__name__}"
        finally:
            self._association_done(rank)
            self._finish_peer(rank, state, reason)
            self._queue.put((rank, None))  # after the report: the consumer may summarize next
            peer.close()  # the release is off the caller's path

    def _association_done(self, rank: int) -> None:
        """The server accepted the association, or never will."""
        with self._reports_lock:
            self._associating.discard(rank)
            if not self._associating:
                self._associated.set()

    def _wait_for_associations(self, rank: int) -> None:
        """Hold this server's query until every server has accepted (at most ASSOCIATIONS_WAIT_S).

        The slowest server's own time starts when its request arrives. Its handshake competes for
        the CPU with the fast servers answering and with the router reading their answers, and a
        handshake slowed by them adds to the whole query; the fast servers lose only the moments
        the handshakes take.
        """
        self._association_done(rank)
        self._associated.wait(ASSOCIATIONS_WAIT_S)

    def _finish_peer(self, rank: int, state: str, reason: str) -> None:
        with self._reports_lock:
            report = self.reports[rank]
            if report.state == "running":  # else already given up on at the deadline
                report.state, report.reason, report.elapsed_ms = state, reason, self._ms()

    def cancel(self) -> None:
        """Stop the fan-out: C-CANCEL to every peer still answering."""
        for peer in self.peers:
            peer.cancel()

    def answers(
        self,
        is_cancelled: Callable[[], bool] | None = None,
        before_wait: Callable[[], None] | None = None,
    ) -> Iterator[FederatedAnswer]:
        """Merged answers as they become final; then `summary` tells how it went.

        `before_wait` is called each time no answer is at hand and the query is about to wait for
        one (the C-FIND front sends what it has gathered then).
        """
        window = self.federation.merge_window_s
        deadline = self._started + self.timeout_s
        running = set(range(len(self.peers)))
        # In arrival order (entries are added when their first copy arrives), so the window
        # expiries are checked from the front; `complete` holds the keys no server can add to.
        pending: OrderedDict[object, _Entry] = OrderedDict()
        complete: set[object] = set()
        sent: dict[object, FederatedAnswer] = {}
        seen: list[tuple[str, RawAnswer]] = []
        outcome = None
        released = 0
        self.federation._query_started()
        try:
            while outcome is None:
                now = time.monotonic()
                for key in self._ready_keys(pending, complete, now, window):
                    if released >= self.max_results:
                        outcome = "limited"
                        break
                    answer = sent[key] = self._release(pending.pop(key))
                    released += 1
                    yield answer
                if outcome or not running:
                    break
                if is_cancelled is not None and is_cancelled():
                    outcome = "cancelled"
                    break
                wait = deadline - now
                if wait <= 0:
                    self._give_up(running)
                    break
                if window is not None and pending:
                    wait = min(wait, max(self._oldest(pending) + window - now, 0.0005))
                if is_cancelled is not None:
                    wait = min(wait, CANCEL_POLL_S)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    if before_wait is not None:
                        before_wait()
                    try:
                        item = self._queue.get(timeout=wait)
                    except queue.Empty:
                        continue
                while item is not None:
                    self._take(item, running, pending, complete, sent, seen)
                    # Stop reading as soon as an answer is due: fast peers must not hold it up.
                    if complete or (
                        window is not None
                        and pending
                        and time.monotonic() >= self._oldest(pending) + window
                    ):
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = None
            if outcome is None:
                for entry in pending.values():  # every server is done: nothing to wait for
                    if released >= self.max_results:
                        outcome = "limited"
                        break
                    released += 1
                    yield self._release(entry)
        finally:
            self.federation._query_finished()
            if outcome is not None or running:
                self.cancel()  # stopped early: the peers still answering stop too
            self._summarize(outcome, released)
            self.federation.learn(self.level, seen)

    @staticmethod
    def _oldest(pending: OrderedDict[object, _Entry]) -> float:
        return next(iter(pending.values())).arrived

    @staticmethod
    def _ready_keys(
        pending: OrderedDict[object, _Entry],
        complete: set[object],
        now: float,
        window: float | None,
    ) -> list[object]:
        """Keys to release now: every copy is in, or the first copy waited the merge window."""
        ready = dict.fromkeys(key for key in complete if key in pending)
        complete.clear()
        if window is not None:
            for key, entry in pending.items():
                if now < entry.arrived + window:
                    break
                ready[key] = None
        return list(ready)

    def _take(self, item, running, pending, complete, sent, seen) -> None:
        rank, answer = item
        if rank not in running:
            return  # late: the server was given up on
        if answer is None:
            running.discard(rank)
            complete.update(
                key for key, entry in pending.items() if not running - entry.copies.keys()
            )
            return
        name = self.peers[rank].server.name
        self.reports[rank].answers += 1
        seen.append((name, answer))
        key = raw_answer_key(self.level, answer)
        if key is None:
            key = (None, len(seen))  # no unique key: cannot be matched, its own entity
        elif self._occurrences is not None:
            # The n-th answer of a server with this key is a copy of the n-th of another server,
            # never of its own earlier ones: two alike items of one worklist are two steps.
            earlier = self._occurrences[rank][key]
            self._occurrences[rank][key] += 1
            key = (key, earlier)
        if key in sent:
            if name not in sent[key].servers:
                sent[key].servers.append(name)
                sent[key].counts[name] = instance_count(self.level, answer)
            return
        entry = pending.get(key)
        if entry is None:
            entry = pending[key] = _Entry(time.monotonic())
        entry.copies.setdefault(rank, answer)
        if not running - entry.copies.keys():
            complete.add(key)

    def _release(self, entry: _Entry) -> FederatedAnswer:
        ranks = sorted(entry.copies)
        # In server order (the primary first), whichever answered first; later holders follow.
        names = [self.peers[rank].server.name for rank in ranks]
        counts = [instance_count(self.level, entry.copies[rank]) for rank in ranks]
        if len(ranks) == 1:  # the common case: sent as the server encoded it
            copy = entry.copies[ranks[0]]
            return FederatedAnswer(
                None,
                names,
                dict(zip(names, counts, strict=True)),
                raw=copy,
                strip=self._strip,
                retrieve_ae=self.retrieve_ae,
                strip_tags=self._strip_tags,
            )
        # The most complete copy wins (a partial copy must not hide the whole one), then server order.
        order = most_complete_first(counts)
        identifier = merge_copies(
            [entry.copies[ranks[index]].dataset() for index in order], self._strip, self.retrieve_ae
        )
        if len(set(counts)) > 1:
            log.info(
                "find_copies_differ",
                query_level=self.level,
                key=answer_key(self.level, identifier),
                counts=dict(zip(names, counts, strict=True)),
            )
        return FederatedAnswer(identifier, names, dict(zip(names, counts, strict=True)))

    def _give_up(self, running: set[int]) -> None:
        for rank in sorted(running):
            self._finish_peer(rank, "timeout", f"no complete answer within {self.timeout_s:g} s")
            self.peers[rank].cancel()
        running.clear()

    def _summarize(self, outcome: str | None, released: int) -> None:
        for rank in range(len(self.reports)):
            self._finish_peer(
                rank, "cancelled", ""
            )  # still running: stopped by a cancel or the cap
        for report in self.reports:
            if report.state == "ok" and report.elapsed_ms is not None:
                self.federation.note_elapsed(report.name, report.elapsed_ms)
            if report.failed:
                self.federation.count_failure(report.name)
                log.warning(
                    "find_server_failed",
                    server=report.name,
                    state=report.state,
                    reason=report.reason,
                    calling_ae=self.calling_ae,
                    query_level=self.level,
                )
        if outcome is None:
            failed = sum(r.failed for r in self.reports)
            outcome = (
                "failed" if failed == len(self.reports) else "partial" if failed else "complete"
            )
        self.summary = FindSummary(outcome, self.reports, released, self._ms())
        log.info(
            "find_done",
            calling_ae=self.calling_ae,
            query_level=self.level,
            outcome=outcome,
            answers=released,
            elapsed_ms=self.summary.elapsed_ms,
            servers={r.name: f"{r.state} {r.answers} in {r.elapsed_ms} ms" for r in self.reports},
        )
