"""C-GET side of a retrieve plan: take the instances from each source, each instance once."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from dicomrouter.config import Config, ServerConfig
from dicomrouter.logging import get_logger
from dicomrouter.net.get_client import (
    PATIENT_ROOT_GET,
    STUDY_ROOT_GET,
    ReceivedInstance,
    get_instances,
)
from dicomrouter.net.move_client import (
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_MOVE,
    ModelNotAccepted,
    PeerMoveError,
)
from dicomrouter.retrieve.held_syntax import get_as_held
from dicomrouter.retrieve.move_to_self import GET_UNSUPPORTED, GetUnsupported, MoveToSelf
from dicomrouter.retrieve.plan import RetrieveRequest, SourcePlan

log = get_logger(__name__)

WARNING = 0xB000
# The plan writes its own identifiers with the C-MOVE models; C-GET asks the same with its own.
Storage = Mapping[str, Sequence[str]] | Sequence[tuple[str, Sequence[str]]] | None
GET_MODEL = {STUDY_ROOT_MOVE: STUDY_ROOT_GET, PATIENT_ROOT_MOVE: PATIENT_ROOT_GET}


def collect_instances(
    config: Config,
    sources: Sequence[SourcePlan],
    storage: Storage,
    on_instance: Callable[[ReceivedInstance], int],
    is_cancelled: Callable[[], bool] = lambda: False,
    spill_folder: Path | None = None,
    on_missed: Callable[[int], None] | None = None,
    mover: MoveToSelf | None = None,
) -> tuple[list[str], bool]:
    """C-GET every request of every source, handing each instance once to `on_instance` (a large
    one in a file of `spill_folder`, when given: see get_instances). With `mover`, a server that
    only moves (its `retrieve:`) is asked by C-MOVE to the router instead (retrieve/move_to_self.py).

    `storage`: the contexts to offer, one transfer syntax each; None: every instance in the syntax
    the source holds it in (retrieve/held_syntax.py: the classes found first, several
    associations where they do not fit in one).

    Returns (what went wrong, one line per source; whether the caller cancelled).
    `on_missed(n)` hears of sub-operations a source counted failed or left undone.
    """
    seen: set[str] = set()

    def once(instance: ReceivedInstance) -> int:
        if instance.sop_instance_uid in seen:  # a copy the plan could not rule out: not twice
            instance.discard()
            return 0x0000
        status = on_instance(instance)
        if status == 0x0000:
            seen.add(instance.sop_instance_uid)
        return status

    errors: list[str] = []
    for source in sources:
        candidates = [(source.server, source.requests), *source.fallbacks]
        for attempt, (server, requests) in enumerate(candidates):
            before = len(seen)
            failures, missed = _fetch_requests(
                config, server, requests, storage, once, spill_folder, mover, is_cancelled
            )
            if failures and len(seen) == before and attempt < len(candidates) - 1:
                # Nothing came from this copy: ask the next server holding it as completely.
                log.warning("get_source_skipped", source=server.name, reason="; ".join(failures))
                continue
            errors += failures
            expected = _expected(requests)
            if failures and expected is not None:
                # A source that gave up (Orthanc answers 0xC000 without counts) missed what it
                # said it holds and did not send.
                missed = max(missed, expected - (len(seen) - before))
            if missed and on_missed is not None:
                on_missed(missed)
            break
        if is_cancelled():
            return errors, True
    return errors, False


def _expected(requests: list[RetrieveRequest]) -> int | None:
    counts = [request.instances for request in requests]
    return None if any(count is None for count in counts) else sum(counts)  # type: ignore[misc]


def _fetch_requests(
    config: Config,
    server: ServerConfig,
    requests: list[RetrieveRequest],
    storage: Storage,
    on_instance: Callable[[ReceivedInstance], int],
    spill_folder: Path | None,
    mover: MoveToSelf | None,
    is_cancelled: Callable[[], bool],
) -> tuple[list[str], int]:
    """Each request from `server` by C-GET, or by C-MOVE to the router where it only moves."""
    if mover is None:
        return _get_requests(config, server, requests, storage, on_instance, spill_folder)
    if mover.uses_move(server):
        return mover.fetch(server, requests, on_instance, is_cancelled)
    try:
        return _get_requests(
            config, server, requests, storage, on_instance, spill_folder, mover.falls_back(server)
        )
    except GetUnsupported as exc:
        mover.get_refused(server, exc.reason)
        return mover.fetch(server, requests, on_instance, is_cancelled)


def _get_requests(
    config: Config,
    server: ServerConfig,
    requests: list[RetrieveRequest],
    storage: Storage,
    on_instance: Callable[[ReceivedInstance], int],
    spill_folder: Path | None = None,
    raise_unsupported: bool = False,
) -> tuple[list[str], int]:
    """C-GET each request from `server`; (what went wrong, one line per failed request; how many
    sub-operations the source counted failed or left undone). `raise_unsupported`: GetUnsupported
    when the server refuses C-GET at its first request (nothing was received yet)."""
    errors = []
    missed = 0
    for index, request in enumerate(requests):
        first = raise_unsupported and index == 0
        model = GET_MODEL.get(request.query_model, request.query_model)
        try:
            if storage is None:
                outcome = get_as_held(
                    server, config.router, model, request.identifier, on_instance, spill_folder
                )
            else:
                outcome = get_instances(
                    server,
                    config.router,
                    model,
                    request.identifier,
                    storage,
                    on_instance,
                    spill_folder,
                )
        except ModelNotAccepted as exc:
            if first:
                raise GetUnsupported(exc.reason) from None
            log.warning("get_source_failed", source=server.name, kind=exc.kind, reason=exc.reason)
            errors.append(f"{server.name} {exc.kind}: {exc.reason}")
            continue
        except PeerMoveError as exc:
            log.warning("get_source_failed", source=server.name, kind=exc.kind, reason=exc.reason)
            errors.append(f"{server.name} {exc.kind}: {exc.reason}")
            continue
        if first and outcome.status in GET_UNSUPPORTED and not outcome.completed:
            raise GetUnsupported(
                f"{server.name} answered the C-GET 0x{outcome.status:04X} {outcome.comment}".strip()
            )
        missed += outcome.failed + (0 if outcome.status == 0xFE00 else outcome.remaining)
        if outcome.status not in (0x0000, WARNING) and (outcome.status >> 12) != 0xB:
            errors.append(
                f"{server.name} answered 0x{outcome.status:04X} {outcome.comment}".strip()
            )
        elif outcome.failed:  # sub-operations the source could not send: the caller misses them
            errors.append(
                f"{server.name} could not send {outcome.failed} instance(s) {outcome.comment}".strip()
            )
    return errors, missed
