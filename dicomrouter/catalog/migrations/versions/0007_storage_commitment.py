"""Storage commitment: commitment_requests (a client's N-ACTION until its report), destination_commitments.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 16:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out here rather than imported from the models, so this revision never changes.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create commitment_requests and destination_commitments."""
    op.create_table(
        "commitment_requests",
        sa.Column("id", ID, nullable=False),
        sa.Column("transaction_uid", sa.String(), nullable=False),
        sa.Column("calling_ae", sa.String(), nullable=False),
        sa.Column("called_ae", sa.String(), nullable=False),
        sa.Column("address", sa.String(), nullable=False),
        sa.Column("instances", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("received_at", TIMESTAMP, nullable=False),
        sa.Column("deadline_at", TIMESTAMP, nullable=False),
        sa.Column("next_check_at", TIMESTAMP, nullable=False),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.Column("lease_until", TIMESTAMP, nullable=True),
        sa.Column("received_by", sa.Text(), nullable=True),
        sa.Column("failures", sa.JSON(), nullable=True),
        sa.Column("event_type", sa.Integer(), nullable=True),
        sa.Column("report_attempts", sa.Integer(), nullable=False),
        sa.Column("reported_at", TIMESTAMP, nullable=True),
        sa.Column("reported_how", sa.String(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state IN ('waiting', 'reported')", name=op.f("ck_commitment_requests_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commitment_requests")),
        sa.UniqueConstraint("transaction_uid", name=op.f("uq_commitment_requests_transaction_uid")),
    )
    op.create_index(
        op.f("ix_commitment_requests_state_next_check_at"),
        "commitment_requests",
        ["state", "next_check_at"],
    )
    op.create_table(
        "destination_commitments",
        sa.Column("id", ID, nullable=False),
        sa.Column("server_name", sa.String(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(), nullable=False),
        sa.Column("sop_class_uid", sa.String(), nullable=False),
        sa.Column("transaction_uid", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("requested_at", TIMESTAMP, nullable=False),
        sa.Column("answered_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint(
            "state IN ('requested', 'committed', 'failed')",
            name=op.f("ck_destination_commitments_state"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_destination_commitments")),
        sa.UniqueConstraint(
            "server_name",
            "sop_instance_uid",
            name=op.f("uq_destination_commitments_server_name_sop_instance_uid"),
        ),
    )
    op.create_index(
        op.f("ix_destination_commitments_transaction_uid"),
        "destination_commitments",
        ["transaction_uid"],
    )


def downgrade() -> None:
    """Drop both tables."""
    op.drop_table("destination_commitments")
    op.drop_table("commitment_requests")
