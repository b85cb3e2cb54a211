"""The payment state machine. Money state only moves forward: events arrive
duplicated and out of order, and this table, not arrival order, decides."""

from __future__ import annotations

# A Stripe `payment_failed` is not final (the customer may retry on the same
# PaymentIntent), so `failed` can still move to processing or succeeded. Money
# actually received outranks a cancel: `canceled -> succeeded` is kept so the
# money record is never dropped. Nothing leaves `succeeded` but a refund.
TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"processing", "succeeded", "failed", "canceled"}),
    "processing": frozenset({"succeeded", "failed", "canceled"}),
    "failed": frozenset({"processing", "succeeded", "canceled"}),
    "canceled": frozenset({"succeeded"}),
    "succeeded": frozenset({"refunded"}),
    "refunded": frozenset(),
}


def can_move(current: str, target: str) -> bool:
    return target in TRANSITIONS[current]


def path_to(current: str, target: str) -> list[str]:
    """The statuses to pass through from `current` to `target`; empty when the
    move would go backwards or nowhere. A refund seen before its success
    (out of order) passes through `succeeded` first, so the sale is applied."""
    if can_move(current, target):
        return [target]
    if target == "refunded" and can_move(current, "succeeded"):
        return ["succeeded", "refunded"]
    return []
