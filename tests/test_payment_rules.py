"""The payment state machine against the design, with no I/O: money only
moves forward, nothing leaves `succeeded` but a refund, `refunded` is final,
and a refund seen before its success passes through `succeeded` (so the sale
is applied). Every one of the 36 (current, target) pairs is checked against
the tables below, written from DESIGN.md rather than read from the code."""

from __future__ import annotations

import itertools

import pytest

from domain.models import PAYMENT_STATUSES
from domain.payments import TRANSITIONS, can_move, path_to

STATUSES = ("pending", "processing", "succeeded", "failed", "canceled", "refunded")

# The direct moves the design allows. A Stripe payment_failed is not final
# (the customer may retry on the same PaymentIntent), so `failed` can still
# move to processing, succeeded or canceled; money received outranks a cancel
# (canceled -> succeeded) so the money record is never dropped.
ALLOWED = frozenset(
    {
        ("pending", "processing"),
        ("pending", "succeeded"),
        ("pending", "failed"),
        ("pending", "canceled"),
        ("processing", "succeeded"),
        ("processing", "failed"),
        ("processing", "canceled"),
        ("failed", "processing"),
        ("failed", "succeeded"),
        ("failed", "canceled"),
        ("canceled", "succeeded"),
        ("succeeded", "refunded"),
    }
)

# A refund that arrives before the success it undoes: the payment passes
# through succeeded first.
THROUGH_SUCCEEDED = frozenset({"pending", "processing", "failed", "canceled"})

PAIRS = list(itertools.product(STATUSES, STATUSES))


def expected_path(current: str, target: str) -> list[str]:
    if (current, target) in ALLOWED:
        return [target]
    if target == "refunded" and current in THROUGH_SUCCEEDED:
        return ["succeeded", "refunded"]
    return []


def test_the_tables_cover_exactly_the_statuses_the_database_accepts():
    assert set(STATUSES) == set(PAYMENT_STATUSES) == set(TRANSITIONS)
    assert len(PAIRS) == 36


@pytest.mark.parametrize(("current", "target"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_can_move_matches_the_design(current, target):
    assert can_move(current, target) is ((current, target) in ALLOWED)


@pytest.mark.parametrize(("current", "target"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_path_to_matches_the_design(current, target):
    assert path_to(current, target) == expected_path(current, target)


@pytest.mark.parametrize(("current", "target"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_a_path_is_made_of_allowed_steps_and_ends_at_its_target(current, target):
    path = path_to(current, target)
    here = current
    for step in path:
        assert can_move(here, step), f"{here} -> {step} is not an allowed step"
        here = step
    assert here == (target if path else current)


@pytest.mark.parametrize("status", STATUSES)
def test_replaying_a_status_changes_nothing(status):
    assert not can_move(status, status)
    assert path_to(status, status) == []


@pytest.mark.parametrize("target", STATUSES)
def test_nothing_leaves_succeeded_but_a_refund(target):
    assert path_to("succeeded", target) == (["refunded"] if target == "refunded" else [])


@pytest.mark.parametrize("target", STATUSES)
def test_refunded_is_terminal(target):
    assert not can_move("refunded", target)
    assert path_to("refunded", target) == []


@pytest.mark.parametrize("late", ["pending", "processing", "failed", "canceled"])
def test_a_late_event_never_overwrites_succeeded(late):
    assert path_to("succeeded", late) == []


@pytest.mark.parametrize("current", sorted(THROUGH_SUCCEEDED))
def test_a_refund_seen_first_passes_through_succeeded(current):
    assert not can_move(current, "refunded")
    assert path_to(current, "refunded") == ["succeeded", "refunded"]


@pytest.mark.parametrize("status", [s for s in STATUSES if s != "pending"])
def test_nothing_goes_back_to_pending(status):
    assert path_to(status, "pending") == []


def test_every_status_is_reachable_from_pending():
    reached, frontier = {"pending"}, ["pending"]
    while frontier:
        here = frontier.pop()
        for there in STATUSES:
            if there not in reached and path_to(here, there):
                reached.add(there)
                frontier.append(there)
    assert reached == set(STATUSES)
