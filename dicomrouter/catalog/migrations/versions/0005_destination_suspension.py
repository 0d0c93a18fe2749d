"""A destination in maintenance: forward_destinations.suspended_at and suspended_by.

`queue suspend DEST` (another process) sets them; the router's lanes stop claiming jobs for it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 15:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the suspension columns."""
    with op.batch_alter_table("forward_destinations") as batch:
        batch.add_column(sa.Column("suspended_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("suspended_by", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop what upgrade added."""
    with op.batch_alter_table("forward_destinations") as batch:
        batch.drop_column("suspended_by")
        batch.drop_column("suspended_at")
