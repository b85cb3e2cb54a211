"""Keeping to a provider's rate limit: requests spaced to at most N a second,
and a 429 answered by waiting and asking again, never by skipping the work."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import requests
import stripe


class RateLimiter:
    """Spaces calls at least 1/rate seconds apart, across threads. A rate of
    0 means no limit."""

    def __init__(
        self,
        per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._spacing = 1.0 / per_second if per_second > 0 else 0.0
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self) -> None:
        if not self._spacing:
            return
        with self._lock:
            now = self._clock()
            turn = max(now, self._next)
            self._next = turn + self._spacing
        if turn > now:
            self._sleep(turn - now)


class ThrottledRequestsClient(stripe.RequestsClient):
    """The stripe library's HTTP client, paced by a RateLimiter. A 429 is
    retried after a growing wait (the same request, so the same
    Idempotency-Key); only after `max_waits` waits is it given back to the
    library, which raises RateLimitError."""

    def __init__(
        self,
        limiter: RateLimiter,
        *,
        timeout: float,
        base_url: str | None = None,
        max_waits: int = 10,
        first_wait: float = 0.25,
        longest_wait: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(timeout=timeout, session=_session_for(base_url) if base_url else None)
        self._limiter, self._max_waits, self._sleep = limiter, max_waits, sleep
        self._first_wait, self._longest_wait = first_wait, longest_wait

    def request(  # type: ignore[override]
        self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        waits = 0
        while True:
            self._limiter.wait()
            content, status, answer_headers = super().request(method, url, headers, post_data)
            if status != 429 or waits >= self._max_waits:
                return content, status, answer_headers
            self._sleep(min(self._longest_wait, self._first_wait * 2**waits))
            waits += 1


def _session_for(base_url: str) -> requests.Session:
    """One session for every call to `base_url` (the library shares a
    session it is given between threads), with what requests would read
    from the environment on every call read once: a job's calls spent about
    a tenth of their CPU looking up proxies and ~/.netrc. The proxies the
    environment names for `base_url` (NO_PROXY included) still apply; the
    library sends its own CA bundle and Authorization header either way."""
    session = requests.Session()
    session.proxies.update(requests.utils.get_environ_proxies(base_url))
    session.trust_env = False
    return session
