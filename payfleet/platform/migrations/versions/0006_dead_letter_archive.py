"""dead letter archive: letters moved out of `<queue>.XQ` before their TTL

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 06:00:00.000000
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letter_archive",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("message_id", sa.String(length=255), nullable=False),
        sa.Column("queue", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("headers", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("archived_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letter_archive")),
        sa.UniqueConstraint("message_id", name=op.f("uq_dead_letter_archive_message_id")),
    )
    op.create_index("ix_dead_letter_archive_queue_id", "dead_letter_archive", ["queue", "id"], unique=False)


def downgrade() -> None:
    # The archived letters go with the table: requeue or export them first.
    op.drop_index("ix_dead_letter_archive_queue_id", table_name="dead_letter_archive")
    op.drop_table("dead_letter_archive")
