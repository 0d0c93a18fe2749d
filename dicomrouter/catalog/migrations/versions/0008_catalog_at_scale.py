"""The catalog at scale: forward_jobs.study_uid (indexed), and an index of finished jobs by age.

`catalog where` and `queue list --study` found a study's jobs by the StudyInstanceUID inside the
header JSON, reading every job ever queued (a million after a busy week); the pruner read every
finished job to find the old ones, holding SQLite's write lock. The partial index holds finished
jobs only, so the C-STORE path pays for it once per job, when the job is done.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 18:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DONE = sa.text("state = 'done'")
STUDY_UID_OF_HEADER = {
    "sqlite": "json_extract(header, '$.StudyInstanceUID')",
    "postgresql": "header ->> 'StudyInstanceUID'",
}


def upgrade() -> None:
    """Add and fill forward_jobs.study_uid; index it and the finished jobs' updated_at."""
    with op.batch_alter_table("forward_jobs") as batch:
        batch.add_column(sa.Column("study_uid", sa.String(), nullable=True))
    dialect = op.get_bind().dialect.name
    op.execute(f"UPDATE forward_jobs SET study_uid = {STUDY_UID_OF_HEADER[dialect]}")
    op.create_index("ix_forward_jobs_study_uid", "forward_jobs", ["study_uid"])
    op.create_index(
        "ix_forward_jobs_done_updated_at",
        "forward_jobs",
        ["state", "updated_at"],
        sqlite_where=DONE,
        postgresql_where=DONE,
    )


def downgrade() -> None:
    """Drop what upgrade added."""
    op.drop_index("ix_forward_jobs_done_updated_at", table_name="forward_jobs")
    op.drop_index("ix_forward_jobs_study_uid", table_name="forward_jobs")
    with op.batch_alter_table("forward_jobs") as batch:
        batch.drop_column("study_uid")
