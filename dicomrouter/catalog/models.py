"""Catalog tables: servers, the DICOM hierarchy, where studies live, the forward queue, audit."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from dicomrouter.catalog.plain import utc_moment
from dicomrouter.catalog.states import COMMITMENT_STATES, JOB_STATES

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Strongest evidence first: a study we stored ourselves beats one a server delivered
# on C-MOVE, which beats one a server merely listed in a C-FIND answer.
LEARNED_BY = ("stored", "moved", "found")

# 64-bit keys on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
ID = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite as on PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive datetimes; store UTC (naive text on SQLite, timestamptz elsewhere)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware datetime (UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach or convert to UTC (as the plain read path does, catalog/plain.py)."""
        return utc_moment(value)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    """Declarative base whose metadata names every constraint and index."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), str: String(), dict[str, Any]: JSON()}


class Server(Base):
    """A PACS from the YAML config, mirrored by name; never deleted, only marked deleted."""

    __tablename__ = "servers"

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    ae_title: Mapped[str]
    host: Mapped[str]
    port: Mapped[int] = mapped_column(Integer)
    environment: Mapped[str]
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    primary: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Patient(Base):
    """A patient; `patient_id` is the DICOM PatientID, the issuer is '' when unknown."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    patient_id: Mapped[str]
    issuer_of_patient_id: Mapped[str] = mapped_column(default="")
    patient_name: Mapped[str | None]
    birth_date: Mapped[date | None] = mapped_column(Date)


class Study(Base):
    """A study; `patient_id` here is the key of the patients row, not the DICOM PatientID."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    study_uid: Mapped[str] = mapped_column(unique=True)
    patient_id: Mapped[int | None] = mapped_column(
        ID, ForeignKey("patients.id", ondelete="SET NULL"), index=True
    )
    study_date: Mapped[date | None] = mapped_column(Date)
    accession_number: Mapped[str | None] = mapped_column(index=True)
    description: Mapped[str | None]
    modalities: Mapped[str | None]  # backslash-separated, sorted, like ModalitiesInStudy

    patient: Mapped[Patient | None] = relationship()


class Series(Base):
    """A series of one study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    series_uid: Mapped[str] = mapped_column(unique=True)
    study_id: Mapped[int] = mapped_column(
        ID, ForeignKey("studies.id", ondelete="CASCADE"), index=True
    )
    modality: Mapped[str | None]
    series_number: Mapped[int | None] = mapped_column(Integer)

    study: Mapped[Study] = relationship()


class Instance(Base):
    """A SOP instance, with the digest and size of the last copy the router stored."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(unique=True)
    series_id: Mapped[int] = mapped_column(
        ID, ForeignKey("series.id", ondelete="CASCADE"), index=True
    )
    sop_class_uid: Mapped[str | None]
    transfer_syntax_uid: Mapped[str | None]
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None]

    series: Mapped[Series] = relationship()


class StudyLocation(Base):
    """A server known to hold (part of) a study, and how we learned it."""

    __tablename__ = "study_locations"
    __table_args__ = (
        UniqueConstraint("study_id", "server_id"),
        CheckConstraint(_in("learned_by", LEARNED_BY), name="learned_by"),
    )

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    study_id: Mapped[int] = mapped_column(ID, ForeignKey("studies.id", ondelete="CASCADE"))
    server_id: Mapped[int] = mapped_column(
        ID, ForeignKey("servers.id", ondelete="CASCADE"), index=True
    )
    first_seen: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
    learned_by: Mapped[str]

    study: Mapped[Study] = relationship()
    server: Mapped[Server] = relationship()


class InstanceLocation(Base):
    """A server that acknowledged (C-STORE success) an instance the router sent it."""

    __tablename__ = "instance_locations"
    __table_args__ = (UniqueConstraint("instance_id", "server_id"),)

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ID, ForeignKey("instances.id", ondelete="CASCADE"))
    server_id: Mapped[int] = mapped_column(
        ID, ForeignKey("servers.id", ondelete="CASCADE"), index=True
    )
    acknowledged_at: Mapped[datetime] = mapped_column(default=utcnow)
    sha256: Mapped[str | None]  # of the copy this server acknowledged (None: written before 0003)

    instance: Mapped[Instance] = relationship()
    server: Mapped[Server] = relationship()


class ForwardJob(Base):
    """One spooled instance waiting to be stored on one destination server."""

    __tablename__ = "forward_jobs"
    __table_args__ = (
        Index(None, "state", "destination", "next_attempt_at"),
        # Finished jobs by age, for the pruner: only done rows, so queueing and claiming never touch it
        # (`state` leads so that SQLite, without statistics, prefers it to the index above).
        Index(
            "ix_forward_jobs_done_updated_at",
            "state",
            "updated_at",
            sqlite_where=text("state = 'done'"),
            postgresql_where=text("state = 'done'"),
        ),
        # Open jobs by content, for the duplicate check every C-STORE makes (migration 0009).
        Index(
            "ix_forward_jobs_open_sha256",
            "sha256",
            sqlite_where=text("state IN ('pending', 'claimed')"),
            postgresql_where=text("state IN ('pending', 'claimed')"),
        ),
        CheckConstraint(_in("state", JOB_STATES), name="state"),
    )

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(index=True)
    spool_path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str]
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    destination: Mapped[str]  # server name; not a foreign key, jobs outlive renames
    state: Mapped[str] = mapped_column(default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    calling_ae: Mapped[str | None]
    called_ae: Mapped[str | None]
    # Attributes the forwarder needs without reopening the file (SOPClassUID, TransferSyntaxUID...).
    header: Mapped[dict[str, Any]] = mapped_column(default=dict)
    study_uid: Mapped[str | None] = mapped_column(index=True)  # header's StudyInstanceUID, to find by


class ForwardDestination(Base):
    """How forwarding to one destination goes: since when it cannot be reached, and why.

    Written when a lane finds the destination down and when it answers again, so that the CLI
    (another process) and a restarted router can tell how long an outage has lasted.
    """

    __tablename__ = "forward_destinations"

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    destination: Mapped[str] = mapped_column(unique=True)  # server name, like forward_jobs.destination
    unreachable_since: Mapped[datetime | None]
    failed_connects: Mapped[int] = mapped_column(Integer, default=0)  # in the current outage
    last_error: Mapped[str | None] = mapped_column(Text)
    last_failure_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]
    recovered_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # In maintenance (`queue suspend`): its jobs wait, no attempt is spent; who suspended it.
    suspended_at: Mapped[datetime | None]
    suspended_by: Mapped[str | None] = mapped_column(Text)


class AuditEvent(Base):
    """One association, DICOM operation, CLI config change or dead letter, for the audit trail."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    calling_ae: Mapped[str | None] = mapped_column(index=True)
    called_ae: Mapped[str | None]
    address: Mapped[str | None]
    node: Mapped[str | None]  # the router node (host:pid) or "cli user@host" that wrote it
    operation: Mapped[str]
    servers: Mapped[str | None] = mapped_column(Text)  # comma-separated server names
    study_uid: Mapped[str | None] = mapped_column(index=True)
    outcome: Mapped[str]
    detail: Mapped[str | None] = mapped_column(Text)
    counts: Mapped[dict[str, Any] | None]


class DestinationCapability(Base):
    """What one destination server answered when offered a SOP class in one transfer syntax.

    Learned from the associations the router opens to it (forwarding, probes). `peer` is the
    server's address and calling AE at the time: a row for another address is not believed.
    """

    __tablename__ = "destination_capabilities"
    __table_args__ = (UniqueConstraint("server_name", "sop_class_uid", "transfer_syntax_uid"),)

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    server_name: Mapped[str]  # not a foreign key: the config names servers, the catalog follows
    sop_class_uid: Mapped[str]
    transfer_syntax_uid: Mapped[str]
    accepted: Mapped[bool] = mapped_column(Boolean)
    peer: Mapped[str]
    learned_at: Mapped[datetime] = mapped_column(default=utcnow)


DESTINATION_COMMITMENT_STATES = ("requested", "committed", "failed")


class CommitmentRequest(Base):
    """A client's Storage Commitment request (N-ACTION), until its N-EVENT-REPORT went out.

    `instances` is the request's list of [SOP Class UID, SOP Instance UID]; `failures` (once
    decided) maps a failed SOP Instance UID to [failure reason, why]. Claimed by one node at a time
    (`claimed_by` until `lease_until`), looked at again at `next_check_at`.
    """

    __tablename__ = "commitment_requests"
    __table_args__ = (
        Index(None, "state", "next_check_at"),
        CheckConstraint(_in("state", COMMITMENT_STATES), name="state"),
    )

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(unique=True)
    calling_ae: Mapped[str]
    called_ae: Mapped[str]
    address: Mapped[str]
    instances: Mapped[list[Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(default="waiting")
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    deadline_at: Mapped[datetime]
    next_check_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None]
    received_by: Mapped[str | None] = mapped_column(Text)  # the node whose association it came on
    failures: Mapped[dict[str, Any] | None]
    event_type: Mapped[int | None] = mapped_column(Integer)  # 1 all committed, 2 some failed
    report_attempts: Mapped[int] = mapped_column(Integer, default=0)
    reported_at: Mapped[datetime | None]
    reported_how: Mapped[str | None]  # "same association" or "new association"
    last_error: Mapped[str | None] = mapped_column(Text)


class DestinationCommitment(Base):
    """The router's own commitment request to a `storage_commitment: true` server, per instance."""

    __tablename__ = "destination_commitments"
    __table_args__ = (
        UniqueConstraint("server_name", "sop_instance_uid"),
        CheckConstraint(_in("state", DESTINATION_COMMITMENT_STATES), name="state"),
    )

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    server_name: Mapped[str]
    sop_instance_uid: Mapped[str]
    sop_class_uid: Mapped[str]
    transaction_uid: Mapped[str] = mapped_column(index=True)
    state: Mapped[str] = mapped_column(default="requested")
    reason: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    answered_at: Mapped[datetime | None]
