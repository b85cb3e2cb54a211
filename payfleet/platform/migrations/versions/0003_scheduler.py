"""scheduled runs (the scheduler's slot claims) and review requests

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 04:32:15.124968
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scheduled_runs",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column("slot", sa.DateTime(timezone=True), nullable=True),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("counts", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "(trigger = 'scheduled') = (slot IS NOT NULL)", name=op.f("ck_scheduled_runs_slot_when_scheduled")
        ),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed', 'skipped')",
            name=op.f("ck_scheduled_runs_state"),
        ),
        sa.CheckConstraint("trigger IN ('scheduled', 'manual')", name=op.f("ck_scheduled_runs_trigger")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduled_runs")),
        sa.UniqueConstraint("job", "slot", name=op.f("uq_scheduled_runs_job")),
    )
    op.create_index("ix_scheduled_runs_job_id", "scheduled_runs", ["job", "id"], unique=False)
    op.create_index(
        "ix_scheduled_runs_unpublished",
        "scheduled_runs",
        ["created_at"],
        unique=False,
        postgresql_where="state = 'queued' AND published_at IS NULL",
    )
    op.create_table(
        "review_requests",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("order_id", sa.UUID(), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=True),
        sa.Column("phone", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("provider_message_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'failed', 'skipped')", name=op.f("ck_review_requests_status")
        ),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.id"], name=op.f("fk_review_requests_order_id"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["scheduled_runs.id"], name=op.f("fk_review_requests_run_id"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_requests")),
        sa.UniqueConstraint("order_id", name=op.f("uq_review_requests_order_id")),
    )
    op.create_index("ix_review_requests_status", "review_requests", ["status", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_review_requests_status", table_name="review_requests")
    op.drop_table("review_requests")
    op.drop_index(
        "ix_scheduled_runs_unpublished",
        table_name="scheduled_runs",
        postgresql_where="state = 'queued' AND published_at IS NULL",
    )
    op.drop_index("ix_scheduled_runs_job_id", table_name="scheduled_runs")
    op.drop_table("scheduled_runs")
