"""Audit trail: the called AE and the writing node, an index to filter by calling AE.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add audit_events.called_ae and .node, index audit_events.calling_ae."""
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("called_ae", sa.String(), nullable=True))
        batch.add_column(sa.Column("node", sa.String(), nullable=True))
    op.create_index(op.f("ix_audit_events_calling_ae"), "audit_events", ["calling_ae"])


def downgrade() -> None:
    """Drop what upgrade added."""
    op.drop_index(op.f("ix_audit_events_calling_ae"), table_name="audit_events")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("node")
        batch.drop_column("called_ae")
