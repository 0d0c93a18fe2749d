"""Which content each server holds: instance_locations.sha256.

An instance row has one sha256 (the last copy acknowledged by any server); a corrected
re-send is judged per server, so each location keeps the hash of the copy that server has.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 12:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add instance_locations.sha256 (empty for rows written before: the instance's hash stands in)."""
    with op.batch_alter_table("instance_locations") as batch:
        batch.add_column(sa.Column("sha256", sa.String(), nullable=True))


def downgrade() -> None:
    """Drop what upgrade added."""
    with op.batch_alter_table("instance_locations") as batch:
        batch.drop_column("sha256")
