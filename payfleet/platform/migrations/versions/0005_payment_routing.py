"""payment routing: the operator's rule lists (every change kept) and each
provider's circuit, shared by every ingress process

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 06:00:00.000000
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per change: the newest row is the rule list in force, the
    # older ones are its history.
    op.create_table(
        "routing_rule_sets",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("rules", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("jsonb_typeof(rules) = 'array'", name=op.f("ck_routing_rule_sets_rules_array")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routing_rule_sets")),
    )
    op.create_table(
        "provider_circuits",
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column(
            "failures",
            postgresql.ARRAY(sa.DateTime(timezone=True)),
            server_default=sa.text("'{}'"),
            nullable=False,
        ),
        sa.Column("open_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("provider", name=op.f("pk_provider_circuits")),
    )


def downgrade() -> None:
    op.drop_table("provider_circuits")
    op.drop_table("routing_rule_sets")
