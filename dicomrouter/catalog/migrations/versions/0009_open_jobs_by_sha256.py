"""Open forward jobs by content: a partial index on sha256 for pending and claimed jobs.

Each C-STORE checks that no open job already carries the same bytes to the same destination. By
(state, destination) that read every open job of the destination: during an outage's backlog of
4,000 jobs the receive transaction went from 0.45 to 1.9 ms, paid by every store. The index holds
open jobs only, so finished ones (a million after a busy week) cost it nothing.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 19:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = sa.text("state IN ('pending', 'claimed')")


def upgrade() -> None:
    """Index the open jobs' sha256."""
    op.create_index(
        "ix_forward_jobs_open_sha256", "forward_jobs", ["sha256"], sqlite_where=OPEN, postgresql_where=OPEN
    )


def downgrade() -> None:
    """Drop the index."""
    op.drop_index("ix_forward_jobs_open_sha256", table_name="forward_jobs")
