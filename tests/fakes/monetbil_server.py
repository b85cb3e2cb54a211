"""The tests' fake Monetbil is the sandbox's Monetbil API (payfleet/sandbox/monetbil_api.py,
whose docstring says what it serves and how failures are injected), on
127.0.0.1 and a port the OS picks."""

from __future__ import annotations

from payfleet.sandbox.monetbil_api import (
    CALLBACK_CHECK_STATUSES,
    CHECK_PATH,
    WIDGET_PREFIX,
    MonetbilApi,
    RecordedRequest,
)

__all__ = [
    "CALLBACK_CHECK_STATUSES",
    "CHECK_PATH",
    "WIDGET_PREFIX",
    "FakeMonetbil",
    "RecordedRequest",
]


class FakeMonetbil(MonetbilApi):
    thread_name = "fake-monetbil"
