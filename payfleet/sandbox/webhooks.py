"""Delivering webhooks like the providers: a POST to the shop's endpoint, and
on anything but a 2xx (or no answer at all) the same delivery again later,
with growing waits, until it is accepted or the attempts run out.

The first attempt is made at once and its outcome handed back (the caller
prints it); the retries run on a daemon thread of their own. Stripe signs
each attempt afresh (a new timestamp), so a delivery carries a function
that gives its headers, not the headers themselves."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

log = logging.getLogger(__name__)

# Stripe retries for three days with an exponential back-off; a sandbox waits
# minutes, not days: 1 s, 2 s, 5 s, … 5 min (about ten minutes in all).
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
MAX_LOG = 1000


@dataclass(frozen=True)
class Webhook:
    """One event to deliver. `headers()` is called once per attempt."""

    provider: str
    label: str  # what it is: the event type and id, or the callback status and transaction
    url: str
    body: bytes
    headers: Callable[[], dict[str, str]]


@dataclass(frozen=True)
class Attempt:
    provider: str
    label: str
    url: str
    attempt: int
    status: int | None  # None: no answer (refused, timed out)
    error: str | None = None
    at: float = field(default_factory=time.time)

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def describe(self) -> str:
        outcome = f"HTTP {self.status}" if self.status is not None else f"no answer ({self.error})"
        return f"{self.provider} {self.label} -> {self.url}: {outcome} (attempt {self.attempt})"


class WebhookSender:
    def __init__(self, retry_delays: tuple[float, ...] = RETRY_DELAYS, timeout: float = 10.0) -> None:
        self._delays, self._timeout = retry_delays, timeout
        self._lock = threading.Lock()
        self._log: list[Attempt] = []
        self._stopped = threading.Event()

    def deliver(self, hook: Webhook) -> Attempt:
        """Try once now; on failure keep trying in the background."""
        first = self._attempt(hook, 1)
        if not first.delivered and self._delays:
            threading.Thread(
                target=self._retry, args=(hook,), name="sandbox-webhook-retry", daemon=True
            ).start()
        return first

    @property
    def attempts(self) -> list[Attempt]:
        with self._lock:
            return list(self._log)

    def stop(self) -> None:
        """Pending retries give up (the process is stopping)."""
        self._stopped.set()

    def _retry(self, hook: Webhook) -> None:
        for number, delay in enumerate(self._delays, start=2):
            if self._stopped.wait(delay) or self._attempt(hook, number).delivered:
                return
        log.warning("gave up delivering %s %s to %s", hook.provider, hook.label, hook.url)

    def _attempt(self, hook: Webhook, number: int) -> Attempt:
        try:
            answer = requests.post(
                hook.url, data=hook.body, headers=hook.headers(), timeout=self._timeout, allow_redirects=False
            )
            attempt = Attempt(hook.provider, hook.label, hook.url, number, answer.status_code)
        except requests.RequestException as error:
            attempt = Attempt(hook.provider, hook.label, hook.url, number, None, type(error).__name__)
        with self._lock:
            self._log.append(attempt)
            del self._log[:-MAX_LOG]
        log.info("webhook %s", attempt.describe())
        return attempt
