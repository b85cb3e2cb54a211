"""review requests: a `sending` claim, committed before the WhatsApp call

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint(op.f("ck_review_requests_status"), "review_requests", type_="check")
    op.create_check_constraint(
        op.f("ck_review_requests_status"),
        "review_requests",
        "status IN ('pending', 'sending', 'sent', 'failed', 'skipped')",
    )
    op.add_column("review_requests", sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # A send whose outcome was never recorded may have reached the customer.
    op.execute(
        "UPDATE review_requests SET status = 'failed', last_error = 'outcome unknown (downgrade)' "
        "WHERE status = 'sending'"
    )
    op.drop_column("review_requests", "claimed_at")
    op.drop_constraint(op.f("ck_review_requests_status"), "review_requests", type_="check")
    op.create_check_constraint(
        op.f("ck_review_requests_status"),
        "review_requests",
        "status IN ('pending', 'sent', 'failed', 'skipped')",
    )
