"""Storage commitment requests in the catalog, and whether the router may say "committed".

An instance is committed when every destination it was routed to acknowledged it (C-STORE
Success: an instance location, or a finished forwarding job) and, for a server marked
`storage_commitment: true`, that server committed it itself. Never received: 0x0112.
Dead-lettered, refused by a committing server, or still undelivered at the request's deadline:
0x0110, with the reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomrouter.catalog.db import read_plain
from dicomrouter.catalog.models import (
    CommitmentRequest,
    DestinationCommitment,
    ForwardJob,
    Instance,
    InstanceLocation,
    Server,
)
from dicomrouter.catalog.reads import CommitmentRow, commitment_requests
from dicomrouter.catalog.states import REPORTED, WAITING
from dicomrouter.config import Config
from dicomrouter.net.commitment_client import NO_SUCH_INSTANCE, PROCESSING_FAILURE, Referenced

OPEN_JOB_STATES = ("pending", "claimed")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Failure:
    reason: int  # Failure Reason (0008,1197)
    why: str


@dataclass
class Verdict:
    """Where one request stands: decided when nothing is pending."""

    committed: list[Referenced] = field(default_factory=list)
    failed: dict[Referenced, Failure] = field(default_factory=dict)
    pending: dict[Referenced, str] = field(default_factory=dict)  # instance -> what it waits for
    to_request: dict[str, list[Referenced]] = field(
        default_factory=dict
    )  # server -> its own commitment to ask

    @property
    def decided(self) -> bool:
        return not self.pending


@dataclass(frozen=True)
class ClaimedRequest:
    id: int
    transaction_uid: str
    calling_ae: str
    called_ae: str
    address: str
    instances: tuple[Referenced, ...]
    deadline_at: datetime
    received_by: str | None
    failures: dict[str, list] | None
    report_attempts: int


class CommitmentStore:
    """The commitment_requests and destination_commitments tables."""

    def __init__(self, sessions: sessionmaker[Session], node_id: str):
        self.sessions = sessions
        self.node_id = node_id

    # ------------------------------------------------------------------ client requests

    def add_request(
        self,
        transaction_uid: str,
        calling_ae: str,
        called_ae: str,
        address: str,
        instances: Sequence[Referenced],
        max_wait_s: float,
    ) -> bool:
        """Persist a request (before its N-ACTION-RSP); False when the Transaction UID is already known."""
        now = utcnow()
        with self.sessions.begin() as session:
            if session.scalar(
                select(CommitmentRequest.id).where(
                    CommitmentRequest.transaction_uid == transaction_uid
                )
            ):
                return False
            session.add(
                CommitmentRequest(
                    transaction_uid=transaction_uid,
                    calling_ae=calling_ae,
                    called_ae=called_ae,
                    address=address,
                    instances=[[ref.sop_class_uid, ref.sop_instance_uid] for ref in instances],
                    state=WAITING,
                    received_at=now,
                    deadline_at=now + timedelta(seconds=max_wait_s),
                    next_check_at=now,
                    received_by=self.node_id,
                    report_attempts=0,
                )
            )
        return True

    def claim(self, lease_s: float, limit: int = 20) -> list[ClaimedRequest]:
        """Due requests, each taken by one node (its next check moved past the lease); SKIP LOCKED on PostgreSQL."""
        now = utcnow()
        table = CommitmentRequest.__table__.c
        due = (table.state == WAITING) & (table.next_check_at <= now)
        with self.sessions.begin() as session:
            ids = list(
                session.scalars(
                    select(CommitmentRequest.id)
                    .where(due)
                    .order_by(CommitmentRequest.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            )
            if not ids:
                return []
            # The condition again: on SQLite (no row locks) a racing claim changes nothing.
            rows = session.execute(
                update(CommitmentRequest)
                .where(CommitmentRequest.id.in_(ids), due)
                .values(
                    claimed_by=self.node_id,
                    lease_until=now + timedelta(seconds=lease_s),
                    next_check_at=now + timedelta(seconds=lease_s),
                )
                .returning(
                    table.id,
                    table.transaction_uid,
                    table.calling_ae,
                    table.called_ae,
                    table.address,
                    table.instances,
                    table.deadline_at,
                    table.received_by,
                    table.failures,
                    table.report_attempts,
                )
            ).all()
        claimed = []
        for row in rows:
            deadline = (
                row.deadline_at if row.deadline_at.tzinfo else row.deadline_at.replace(tzinfo=UTC)
            )
            claimed.append(
                ClaimedRequest(
                    row.id,
                    row.transaction_uid,
                    row.calling_ae,
                    row.called_ae,
                    row.address,
                    tuple(Referenced(c, i) for c, i in row.instances),
                    deadline,
                    row.received_by,
                    row.failures,
                    row.report_attempts,
                )
            )
        return claimed

    def check_later(
        self, request_id: int, delay_s: float, error: str | None = None, attempted: bool = False
    ) -> None:
        values: dict = {
            "next_check_at": utcnow() + timedelta(seconds=delay_s),
            "claimed_by": None,
            "lease_until": None,
        }
        if error is not None:
            values["last_error"] = error
        if attempted:
            values["report_attempts"] = CommitmentRequest.report_attempts + 1
        with self.sessions.begin() as session:
            session.execute(
                update(CommitmentRequest).where(CommitmentRequest.id == request_id).values(**values)
            )

    def decide(self, request_id: int, event_type: int, failures: dict[Referenced, Failure]) -> None:
        """Keep the outcome (a report not sent yet is sent as decided, even after a restart)."""
        with self.sessions.begin() as session:
            session.execute(
                update(CommitmentRequest)
                .where(CommitmentRequest.id == request_id)
                .values(
                    event_type=event_type,
                    failures={
                        ref.sop_instance_uid: [f.reason, f.why] for ref, f in failures.items()
                    },
                )
            )

    def reported(self, request_id: int, how: str) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(CommitmentRequest)
                .where(CommitmentRequest.id == request_id)
                .values(
                    state=REPORTED,
                    reported_at=utcnow(),
                    reported_how=how,
                    claimed_by=None,
                    lease_until=None,
                    report_attempts=CommitmentRequest.report_attempts + 1,
                    last_error=None,
                )
            )

    def list_requests(self, pending_only: bool, limit: int = 200) -> list[CommitmentRow]:
        """The newest requests, newest first (as `commitments list` shows them)."""
        return read_plain(
            self.sessions, lambda reader: commitment_requests(reader, pending_only, limit)
        )

    # ------------------------------------------------------------------ the router's own requests

    def add_destination_requests(
        self, server_name: str, transaction_uid: str, instances: Iterable[Referenced]
    ) -> None:
        with self.sessions.begin() as session:
            for ref in instances:
                session.execute(
                    delete(DestinationCommitment).where(
                        DestinationCommitment.server_name == server_name,
                        DestinationCommitment.sop_instance_uid == ref.sop_instance_uid,
                    )
                )
                session.add(
                    DestinationCommitment(
                        server_name=server_name,
                        sop_instance_uid=ref.sop_instance_uid,
                        sop_class_uid=ref.sop_class_uid,
                        transaction_uid=transaction_uid,
                        state="requested",
                    )
                )

    def forget_destination_requests(self, transaction_uid: str) -> None:
        with self.sessions.begin() as session:
            session.execute(
                delete(DestinationCommitment).where(
                    DestinationCommitment.transaction_uid == transaction_uid
                )
            )

    def destination_report(
        self, transaction_uid: str, committed: Iterable[Referenced], failed: dict[Referenced, int]
    ) -> str | None:
        """A server's N-EVENT-REPORT for one of our requests; the server's name, None if the UID is not ours."""
        now = utcnow()
        with self.sessions.begin() as session:
            server = session.scalar(
                select(DestinationCommitment.server_name).where(
                    DestinationCommitment.transaction_uid == transaction_uid
                )
            )
            if server is None:
                return None
            mine = DestinationCommitment.transaction_uid == transaction_uid
            uids = [ref.sop_instance_uid for ref in committed]
            if uids:
                session.execute(
                    update(DestinationCommitment)
                    .where(mine, DestinationCommitment.sop_instance_uid.in_(uids))
                    .values(state="committed", answered_at=now)
                )
            for ref, reason in failed.items():
                session.execute(
                    update(DestinationCommitment)
                    .where(mine, DestinationCommitment.sop_instance_uid == ref.sop_instance_uid)
                    .values(
                        state="failed",
                        answered_at=now,
                        reason=f"{server} failure reason 0x{reason:04X}",
                    )
                )
            return server

    # ------------------------------------------------------------------ the verdict

    def evaluate(
        self, instances: Sequence[Referenced], config: Config, deadline_at: datetime
    ) -> Verdict:
        """Where each instance stands, from the forwarding jobs, instance locations and destination commitments."""
        uids = list({ref.sop_instance_uid for ref in instances})
        jobs: dict[str, dict[str, list[tuple[str, str | None]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        located: dict[str, set[str]] = defaultdict(set)
        known: set[str] = set()
        own: dict[tuple[str, str], tuple[str, str | None]] = {}
        with self.sessions() as session:
            for chunk in _chunks(uids, 500):
                for uid, destination, state, error in session.execute(
                    select(
                        ForwardJob.sop_instance_uid,
                        ForwardJob.destination,
                        ForwardJob.state,
                        ForwardJob.last_error,
                    ).where(ForwardJob.sop_instance_uid.in_(chunk))
                ):
                    jobs[uid][destination].append((state, error))
                for uid, server in session.execute(
                    select(Instance.sop_instance_uid, Server.name)
                    .join(InstanceLocation, InstanceLocation.instance_id == Instance.id)
                    .join(Server, Server.id == InstanceLocation.server_id)
                    .where(Instance.sop_instance_uid.in_(chunk))
                ):
                    located[uid].add(server)
                known.update(
                    session.scalars(
                        select(Instance.sop_instance_uid).where(
                            Instance.sop_instance_uid.in_(chunk)
                        )
                    )
                )
                for row in session.execute(
                    select(
                        DestinationCommitment.server_name,
                        DestinationCommitment.sop_instance_uid,
                        DestinationCommitment.state,
                        DestinationCommitment.reason,
                    ).where(DestinationCommitment.sop_instance_uid.in_(chunk))
                ):
                    own[(row.server_name, row.sop_instance_uid)] = (row.state, row.reason)
        committing = {s.name for s in config.servers if s.storage_commitment and not s.deleted}
        overdue = utcnow() >= deadline_at
        verdict = Verdict()
        for ref in instances:
            uid = ref.sop_instance_uid
            destinations = set(jobs[uid]) | located[uid]
            if not destinations:
                if uid in known:  # catalogued (found or moved), but never stored through the router
                    verdict.failed[ref] = Failure(NO_SUCH_INSTANCE, "not received by the router")
                else:
                    verdict.failed[ref] = Failure(NO_SUCH_INSTANCE, "never received by the router")
                continue
            waiting, failure = [], None
            for destination in sorted(destinations):
                states = [state for state, _ in jobs[uid][destination]]
                if any(state in OPEN_JOB_STATES for state in states):
                    waiting.append(f"delivery to {destination}")
                    continue
                if destination not in located[uid] and "done" not in states:
                    errors = [error for state, error in jobs[uid][destination] if state == "dead"]
                    failure = Failure(
                        PROCESSING_FAILURE,
                        f"dead-lettered for {destination}: {(errors or ['?'])[0]}",
                    )
                    break
                if destination in committing:
                    state, reason = own.get((destination, uid), (None, None))
                    if state == "failed":
                        failure = Failure(
                            PROCESSING_FAILURE, f"{destination} did not commit it ({reason})"
                        )
                        break
                    if state != "committed":
                        waiting.append(f"{destination}'s own commitment")
                        if state is None:
                            verdict.to_request.setdefault(destination, []).append(ref)
            if failure is not None:
                verdict.failed[ref] = failure
            elif waiting and overdue:
                verdict.failed[ref] = Failure(
                    PROCESSING_FAILURE, "still waiting at max_wait for " + ", ".join(waiting)
                )
            elif waiting:
                verdict.pending[ref] = ", ".join(waiting)
            else:
                verdict.committed.append(ref)
        return verdict


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
