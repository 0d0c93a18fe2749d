"""What each destination accepts: destination_capabilities (SOP class, transfer syntax, verdict).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 15:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out here rather than imported from the models, so this revision never changes.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create destination_capabilities."""
    op.create_table(
        "destination_capabilities",
        sa.Column("id", ID, nullable=False),
        sa.Column("server_name", sa.String(), nullable=False),
        sa.Column("sop_class_uid", sa.String(), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(), nullable=False),
        sa.Column("accepted", sa.Boolean(), nullable=False),
        sa.Column("peer", sa.String(), nullable=False),
        sa.Column("learned_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_destination_capabilities")),
        sa.UniqueConstraint(
            "server_name",
            "sop_class_uid",
            "transfer_syntax_uid",
            name=op.f("uq_destination_capabilities_server_name_sop_class_uid_transfer_syntax_uid"),
        ),
    )


def downgrade() -> None:
    """Drop destination_capabilities."""
    op.drop_table("destination_capabilities")
