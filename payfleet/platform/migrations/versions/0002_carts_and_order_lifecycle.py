"""carts, order lifecycle, low stock, monetbil reference

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 04:25:56.252436
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "carts",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("order_id", sa.UUID(), nullable=True),
        sa.Column("checked_out_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(order_id IS NULL) = (checked_out_at IS NULL)", name=op.f("ck_carts_checked_out_once")
        ),
        sa.ForeignKeyConstraint(["order_id"], ["orders.id"], name=op.f("fk_carts_order_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_carts")),
    )
    op.create_index("ix_carts_expires_at", "carts", ["expires_at"], unique=False)
    op.create_table(
        "cart_items",
        sa.Column("cart_id", sa.UUID(), nullable=False),
        sa.Column("sku", sa.String(length=64), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.CheckConstraint("quantity > 0", name=op.f("ck_cart_items_quantity_positive")),
        sa.ForeignKeyConstraint(
            ["cart_id"], ["carts.id"], name=op.f("fk_cart_items_cart_id"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["sku"], ["products.sku"], name=op.f("fk_cart_items_sku")),
        sa.PrimaryKeyConstraint("cart_id", "sku", name=op.f("pk_cart_items")),
    )
    op.add_column("orders", sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("orders", sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("payments", sa.Column("provider_reference", sa.String(length=255), nullable=True))
    op.add_column("products", sa.Column("low_stock_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("products", "low_stock_since")
    op.drop_column("payments", "provider_reference")
    op.drop_column("orders", "completed_at")
    op.drop_column("orders", "ready_at")
    op.drop_table("cart_items")
    op.drop_index("ix_carts_expires_at", table_name="carts")
    op.drop_table("carts")
