"""Move a study (or series, or images) to one destination, following a retrieve plan.

Used by the C-MOVE SCP and by `dicomrouter move`. The plan (retrieve/plan.py) names each source
and what to take from it, each series once; the requests are sent in turn and their pending
answers passed on with the counts of the requests before added in.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

from dicomrouter.catalog.queries import Catalog
from dicomrouter.config import Config, ServerConfig
from dicomrouter.logging import get_logger
from dicomrouter.net.move_client import CANCELLED, PeerMove, PeerMoveError
from dicomrouter.retrieve.plan import RetrieveRequest, SourcePlan
from dicomrouter.retrieve.relay import Relay, describe_reasons
from dicomrouter.routing.move_routes import MoveDestination, plan_route

log = get_logger(__name__)

SUCCESS = 0x0000
WARNING = 0xB000  # some sub-operations failed
UNABLE_TO_PERFORM = 0xA702  # out of resources: unable to perform sub-operations
UNABLE_TO_PROCESS = 0xC000


def move_outcome(status: int | None) -> str:
    """The audit trail's word for a final C-MOVE / C-GET status."""
    if status == SUCCESS:
        return "success"
    if status == CANCELLED:
        return "cancelled"
    if status is not None and (status >> 12) == 0xB:
        return "partial"
    return "failed"


@dataclass
class MoveTotals:
    """Sub-operation counts over every source so far; `status` is set on the final one."""

    remaining: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_sop_uids: list[str] = field(default_factory=list)
    status: int | None = None  # None while pending
    comment: str = ""

    @property
    def final(self) -> bool:
        return self.status is not None


@dataclass
class _SourceOutcome:
    server: ServerConfig
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_sop_uids: list[str] = field(default_factory=list)
    error_status: int | None = None  # the source refused or could not be reached
    error: str = ""
    # Why sub-operations failed on a relay ("WORKSTATION does not accept ... in <syntax>")
    reasons: list[str] = field(default_factory=list)


class MoveRun:
    """One move to `destination` from `sources`; iterate `progress()`, `cancel()` from any thread."""

    def __init__(
        self,
        config: Config,
        catalog: Catalog | None,
        sources: list[SourcePlan],
        destination: MoveDestination,
        study_uid: str | None,
        move_originator: tuple[str, int] | None = None,
    ):
        self.move_originator = move_originator  # relayed sub-operations name the caller's C-MOVE
        self.config = config
        self.catalog = catalog
        self.sources = sources
        self.destination = destination
        self.study_uid = study_uid
        self._lock = threading.Lock()
        self._current: PeerMove | None = None
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Pass the cancel on to the source being asked; later sources are skipped."""
        self._cancelled.set()
        with self._lock:
            current = self._current
        if current is not None:
            current.cancel()

    def progress(self) -> Iterator[MoveTotals]:
        """Pending totals as the sources report them, then the final totals with a status."""
        outcomes: list[_SourceOutcome] = []
        for index, source in enumerate(self.sources):
            # What the sources still to come will send, as they counted it when asked.
            later = sum(s.instances or 0 for s in self.sources[index + 1 :])
            candidates = [(source.server, source.requests), *source.fallbacks]
            for attempt, (server, requests) in enumerate(candidates):
                if self.cancelled:
                    break
                last = attempt == len(candidates) - 1
                if not (yield from self._move_requests(server, requests, outcomes, later, last)):
                    break  # done, or failed after sending something: no other copy is asked
        final = self._final(outcomes)
        self._learn(final)
        log.info(
            "move_finished",
            study_uid=self.study_uid,
            destination=self.destination.name,
            sources=list(dict.fromkeys(o.server.name for o in outcomes)),  # asked and kept
            status=f"0x{final.status:04X}",
            completed=final.completed,
            failed=final.failed,
            warning=final.warning,
            comment=final.comment,
        )
        yield final

    def _move_requests(
        self,
        server: ServerConfig,
        requests: list[RetrieveRequest],
        outcomes: list[_SourceOutcome],
        later: int,
        last: bool,
    ) -> Generator[MoveTotals, None, bool]:
        """Send `requests` to `server` in turn. Unless it is the `last` copy, returns True when it
        refused or could not be reached before sending anything: its failure is dropped and the
        next copy is asked."""
        for index, request in enumerate(requests):
            outcome = _SourceOutcome(server)
            outcomes.append(outcome)
            still = sum(r.instances or 0 for r in requests[index + 1 :]) + later
            yield from self._move_from(server, request, outcome, outcomes, still)
            if outcome.error_status is None or self.cancelled:
                continue
            sent_nothing = not (outcome.completed or outcome.warning or outcome.failed_sop_uids)
            if index == 0 and sent_nothing and not last:
                outcomes.remove(outcome)
                log.warning("move_source_skipped", source=server.name, reason=outcome.error)
                return True
        return False

    def _move_from(
        self,
        source: ServerConfig,
        request: RetrieveRequest,
        outcome: _SourceOutcome,
        outcomes: list[_SourceOutcome],
        later: int,
    ) -> Iterator[MoveTotals]:
        route = plan_route(source, self.destination, self.config.router.ae_title)
        if not route.direct:
            yield from self._relay_from(source, request, outcome, outcomes)
            return
        peer = PeerMove(source, self.config.router, request.query_model, request.identifier)
        with self._lock:
            self._current = peer
        if self.cancelled:
            peer.cancel()
        log.info(
            "move_started",
            source=source.name,
            destination=self.destination.name,
            move_destination_ae=route.move_destination_ae,
            calling_ae=peer.calling_ae,
            study_uid=self.study_uid,
        )
        try:
            for answer in peer.progress(route.move_destination_ae):
                outcome.completed, outcome.failed, outcome.warning = (
                    answer.completed,
                    answer.failed,
                    answer.warning,
                )
                if answer.pending:
                    yield self._totals(outcomes, remaining=answer.remaining + later)
                    continue
                outcome.failed_sop_uids = answer.failed_sop_uids
                if answer.status == CANCELLED:
                    self._cancelled.set()
                elif answer.status not in (SUCCESS, WARNING) and (answer.status >> 12) != 0xB:
                    outcome.error_status = answer.status
                    outcome.error = f"{source.name} answered 0x{answer.status:04X}" + (
                        f" ({answer.comment})" if answer.comment else ""
                    )
                    # A refusal before any sub-operation: count nothing as done.
                    outcome.failed += answer.remaining
        except PeerMoveError as exc:
            outcome.error_status = UNABLE_TO_PERFORM
            outcome.error = f"{source.name} {exc.kind}: {exc.reason}"
            log.warning("move_source_failed", source=source.name, kind=exc.kind, reason=exc.reason)
        finally:
            with self._lock:
                self._current = None

    def _relay_from(
        self,
        source: ServerConfig,
        request: RetrieveRequest,
        outcome: _SourceOutcome,
        outcomes: list[_SourceOutcome],
    ) -> Iterator[MoveTotals]:
        relay = Relay(
            source,
            self.destination,
            self.config.router,
            request.query_model,
            request.identifier,
            move_originator=self.move_originator,
        )
        log.info(
            "move_relay_started",
            source=source.name,
            destination=self.destination.name,
            study_uid=self.study_uid,
        )
        for event in relay.progress():
            if self.cancelled:
                relay.cancelled.set()
            counts = relay.counts
            outcome.completed, outcome.failed, outcome.warning = (
                counts.completed,
                counts.failed,
                counts.warning,
            )
            outcome.failed_sop_uids = list(counts.failed_sop_uids)
            outcome.reasons = list(counts.reasons)
            if event is None:
                yield self._totals(outcomes)
            elif isinstance(event, PeerMoveError):
                outcome.error_status = UNABLE_TO_PERFORM
                outcome.error = f"{source.name} {event.kind}: {event.reason}"
                log.warning(
                    "move_source_failed", source=source.name, kind=event.kind, reason=event.reason
                )
            elif (
                event.status not in (SUCCESS, WARNING)
                and (event.status >> 12) != 0xB
                and not relay.cancelled.is_set()
            ):
                outcome.error_status = event.status
                outcome.error = f"{source.name} answered 0x{event.status:04X}" + (
                    f" ({event.comment})" if event.comment else ""
                )

    @staticmethod
    def _totals(outcomes: list[_SourceOutcome], remaining: int = 0) -> MoveTotals:
        totals = MoveTotals(remaining=remaining)
        for outcome in outcomes:
            totals.completed += outcome.completed
            totals.failed += outcome.failed
            totals.warning += outcome.warning
            totals.failed_sop_uids += outcome.failed_sop_uids
        return totals

    def _final(self, outcomes: list[_SourceOutcome]) -> MoveTotals:
        totals = self._totals(outcomes)
        errors = [o for o in outcomes if o.error_status is not None]
        reasons = [reason for o in outcomes for reason in o.reasons]
        totals.comment = "; ".join(
            [o.error for o in errors] + ([describe_reasons(reasons)] if reasons else [])
        )
        if self.cancelled:
            totals.status = CANCELLED
        elif errors and not totals.completed and not totals.warning:
            statuses = {o.error_status for o in errors}
            totals.status = statuses.pop() if len(statuses) == 1 else UNABLE_TO_PERFORM
        elif errors or totals.failed or totals.warning:
            totals.status = WARNING
        else:
            totals.status = SUCCESS
        return totals

    def _learn(self, final: MoveTotals) -> None:
        """A move between PACS: the destination now holds the study."""
        if self.catalog is None or self.destination.server is None or not self.study_uid:
            return
        if not (final.completed or final.warning):
            return
        try:
            self.catalog.record_study_seen(self.destination.server.name, self.study_uid, "moved")
        except Exception:
            log.exception(
                "catalog_learn_failed", server=self.destination.name, study_uid=self.study_uid
            )
