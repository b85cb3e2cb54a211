"""trace ids: the id that ties a webhook to its worker attempts, the job
runs and review sends, and the provider calls they make

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 07:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Nullable and without a default: rows stored before this revision have no
# trace, and adding the column rewrites nothing (no index either: the hot
# INSERT of every webhook pays nothing more than the value).
TABLES = ("provider_events", "scheduled_runs", "review_requests")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("trace_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        op.drop_column(table, "trace_id")
