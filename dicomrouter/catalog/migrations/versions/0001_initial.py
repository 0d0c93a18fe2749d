"""Initial catalog: servers, patients/studies/series/instances, locations, forward queue, audit.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 09:05:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out here rather than imported from the models, so this revision never changes.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create every table, constraint and index of the first catalog schema."""
    op.create_table(
        "servers",
        sa.Column("id", ID, nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("ae_title", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("environment", sa.String(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("primary", sa.Boolean(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_servers")),
        sa.UniqueConstraint("name", name=op.f("uq_servers_name")),
    )

    op.create_table(
        "patients",
        sa.Column("id", ID, nullable=False),
        sa.Column("patient_id", sa.String(), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(), nullable=False),
        sa.Column("patient_name", sa.String(), nullable=True),
        sa.Column("birth_date", sa.Date(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patients")),
        sa.UniqueConstraint(
            "patient_id",
            "issuer_of_patient_id",
            name=op.f("uq_patients_patient_id_issuer_of_patient_id"),
        ),
    )

    op.create_table(
        "studies",
        sa.Column("id", ID, nullable=False),
        sa.Column("study_uid", sa.String(), nullable=False),
        sa.Column("patient_id", ID, nullable=True),
        sa.Column("study_date", sa.Date(), nullable=True),
        sa.Column("accession_number", sa.String(), nullable=True),
        sa.Column("description", sa.String(), nullable=True),
        sa.Column("modalities", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["patient_id"],
            ["patients.id"],
            name=op.f("fk_studies_patient_id_patients"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("study_uid", name=op.f("uq_studies_study_uid")),
    )
    op.create_index(op.f("ix_studies_patient_id"), "studies", ["patient_id"])
    op.create_index(op.f("ix_studies_accession_number"), "studies", ["accession_number"])

    op.create_table(
        "series",
        sa.Column("id", ID, nullable=False),
        sa.Column("series_uid", sa.String(), nullable=False),
        sa.Column("study_id", ID, nullable=False),
        sa.Column("modality", sa.String(), nullable=True),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_series_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
        sa.UniqueConstraint("series_uid", name=op.f("uq_series_series_uid")),
    )
    op.create_index(op.f("ix_series_study_id"), "series", ["study_id"])

    op.create_table(
        "instances",
        sa.Column("id", ID, nullable=False),
        sa.Column("sop_instance_uid", sa.String(), nullable=False),
        sa.Column("series_id", ID, nullable=False),
        sa.Column("sop_class_uid", sa.String(), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_instances_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instances_sop_instance_uid")),
    )
    op.create_index(op.f("ix_instances_series_id"), "instances", ["series_id"])

    op.create_table(
        "study_locations",
        sa.Column("id", ID, nullable=False),
        sa.Column("study_id", ID, nullable=False),
        sa.Column("server_id", ID, nullable=False),
        sa.Column("first_seen", TIMESTAMP, nullable=False),
        sa.Column("last_seen", TIMESTAMP, nullable=False),
        sa.Column("learned_by", sa.String(), nullable=False),
        sa.CheckConstraint(
            "learned_by IN ('stored', 'moved', 'found')",
            name=op.f("ck_study_locations_learned_by"),
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_study_locations_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["server_id"],
            ["servers.id"],
            name=op.f("fk_study_locations_server_id_servers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_locations")),
        sa.UniqueConstraint(
            "study_id", "server_id", name=op.f("uq_study_locations_study_id_server_id")
        ),
    )
    op.create_index(op.f("ix_study_locations_server_id"), "study_locations", ["server_id"])

    op.create_table(
        "instance_locations",
        sa.Column("id", ID, nullable=False),
        sa.Column("instance_id", ID, nullable=False),
        sa.Column("server_id", ID, nullable=False),
        sa.Column("acknowledged_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_instance_locations_instance_id_instances"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["server_id"],
            ["servers.id"],
            name=op.f("fk_instance_locations_server_id_servers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance_locations")),
        sa.UniqueConstraint(
            "instance_id", "server_id", name=op.f("uq_instance_locations_instance_id_server_id")
        ),
    )
    op.create_index(op.f("ix_instance_locations_server_id"), "instance_locations", ["server_id"])

    op.create_table(
        "forward_jobs",
        sa.Column("id", ID, nullable=False),
        sa.Column("sop_instance_uid", sa.String(), nullable=False),
        sa.Column("spool_path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("destination", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TIMESTAMP, nullable=False),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.Column("lease_until", TIMESTAMP, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("calling_ae", sa.String(), nullable=True),
        sa.Column("called_ae", sa.String(), nullable=True),
        sa.Column("header", sa.JSON(), nullable=False),
        sa.CheckConstraint(
            "state IN ('pending', 'claimed', 'done', 'dead')", name=op.f("ck_forward_jobs_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forward_jobs")),
    )
    op.create_index(
        op.f("ix_forward_jobs_state_destination_next_attempt_at"),
        "forward_jobs",
        ["state", "destination", "next_attempt_at"],
    )
    op.create_index(op.f("ix_forward_jobs_sop_instance_uid"), "forward_jobs", ["sop_instance_uid"])

    op.create_table(
        "audit_events",
        sa.Column("id", ID, nullable=False),
        sa.Column("at", TIMESTAMP, nullable=False),
        sa.Column("calling_ae", sa.String(), nullable=True),
        sa.Column("address", sa.String(), nullable=True),
        sa.Column("operation", sa.String(), nullable=False),
        sa.Column("servers", sa.Text(), nullable=True),
        sa.Column("study_uid", sa.String(), nullable=True),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("counts", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(op.f("ix_audit_events_at"), "audit_events", ["at"])
    op.create_index(op.f("ix_audit_events_study_uid"), "audit_events", ["study_uid"])


def downgrade() -> None:
    """Drop everything, children before parents (their indexes go with them)."""
    for table in (
        "audit_events",
        "forward_jobs",
        "instance_locations",
        "study_locations",
        "instances",
        "series",
        "studies",
        "patients",
        "servers",
    ):
        op.drop_table(table)
