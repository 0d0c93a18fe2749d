"""Forwarding health per destination: forward_destinations.

`queue list` and a restarted router read since when a destination has been unreachable.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 15:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create forward_destinations."""
    op.create_table(
        "forward_destinations",
        sa.Column("id", ID, nullable=False),
        sa.Column("destination", sa.String(), nullable=False),
        sa.Column("unreachable_since", TIMESTAMP, nullable=True),
        sa.Column("failed_connects", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_failure_at", TIMESTAMP, nullable=True),
        sa.Column("next_attempt_at", TIMESTAMP, nullable=True),
        sa.Column("recovered_at", TIMESTAMP, nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forward_destinations")),
        sa.UniqueConstraint("destination", name=op.f("uq_forward_destinations_destination")),
    )


def downgrade() -> None:
    """Drop what upgrade added."""
    op.drop_table("forward_destinations")
