"""How large one order may be: a bound on the anonymous routes, so a single
request cannot hold a shop's whole stock or make an order of thousands of
lines (MAX_ORDER_UNITS, MAX_ORDER_LINES)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from domain.errors import InvalidRequest

Lines = Sequence[tuple[str, int]]


class OrderTooLarge(InvalidRequest):
    code = "order_too_large"


@dataclass(frozen=True)
class OrderBounds:
    max_units: int = 100
    max_lines: int = 50

    def check(self, lines: Lines) -> None:
        """Refuse lines (one per SKU) over either bound, naming the bound."""
        if len(lines) > self.max_lines:
            raise OrderTooLarge(
                f"an order holds at most {self.max_lines} lines, not {len(lines)}", max_lines=self.max_lines
            )
        self.check_units(sum(quantity for _, quantity in lines))

    def check_units(self, units: int) -> None:
        if units > self.max_units:
            raise OrderTooLarge(
                f"an order holds at most {self.max_units} units, not {units}", max_units=self.max_units
            )
