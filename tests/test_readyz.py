"""/readyz is cheap and bounded: a real ingress (gunicorn) whose RabbitMQ or
PostgreSQL sits behind a TCP proxy that black-holes on demand."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from ingress.health import CachedCheck
from tests.conftest import eventually, free_port
from tests.support.shop import SECRET
from tests.support.stripe_signing import sign_stripe_payload, stripe_event
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e

TIMEOUT = 1.0  # READYZ_TIMEOUT_SECONDS in these tests
CACHE = 1.0  # READYZ_CACHE_SECONDS
THREADS = 4  # per gunicorn worker, two workers: few, so a held thread shows


@pytest.fixture
def proxied_ingress(env, spawn) -> Iterator[Callable[[str, int], tuple[str, TcpProxy]]]:
    """An ingress whose `variable` (BROKER_URL or DATABASE_URL) goes through a proxy."""
    proxies: list[TcpProxy] = []

    def start(variable: str, port: int) -> tuple[str, TcpProxy]:
        proxy = TcpProxy("127.0.0.1", port).start()
        proxies.append(proxy)
        env.update(
            {
                variable: proxy.url_for(env[variable]),
                "READYZ_TIMEOUT_SECONDS": str(TIMEOUT),
                "READYZ_CACHE_SECONDS": str(CACHE),
                "WEB_THREADS": str(THREADS),
            }
        )
        bind = free_port()
        spawn("ingress", "--bind", f"127.0.0.1:{bind}")
        base = f"http://127.0.0.1:{bind}"
        eventually(lambda: _status(base, "/readyz") == 200, timeout=30, interval=0.2)
        return base, proxy

    yield start
    for proxy in proxies:
        proxy.stop()


def _status(base: str, path: str) -> int | None:
    try:
        return requests.get(f"{base}{path}", timeout=30).status_code
    except (requests.ConnectionError, requests.Timeout):
        return None


def _timed(call: Callable[[], requests.Response]) -> tuple[requests.Response, float]:
    started = time.monotonic()
    answer = call()
    return answer, time.monotonic() - started


def _readyz(base: str) -> tuple[requests.Response, float]:
    return _timed(lambda: requests.get(f"{base}/readyz", timeout=60))


def _not_ready_within_the_timeout(base: str, dependency: str) -> None:
    """Every probe answers within the timeout (plus slack); one that started
    a check after the cut says 503 naming the dependency."""
    deadline = time.monotonic() + CACHE + 3 * TIMEOUT
    while True:
        answer, took = _readyz(base)
        assert took < TIMEOUT + 1.0, f"/readyz took {took:.1f} s"
        if answer.status_code == 503:
            break
        assert time.monotonic() < deadline, "/readyz still 200 with the dependency black-holed"
    check = answer.json()["checks"][dependency]
    assert check.startswith(("timed out", "unreachable")), answer.json()


def test_a_blackholed_rabbitmq_makes_readyz_503_within_the_timeout(proxied_ingress):
    base, proxy = proxied_ingress("BROKER_URL", 5672)
    proxy.blackhole()
    try:
        _not_ready_within_the_timeout(base, "rabbitmq")
    finally:
        proxy.restore()
    eventually(lambda: _status(base, "/readyz") == 200, timeout=20, interval=0.2)


def test_a_blackholed_postgresql_makes_readyz_503_within_the_timeout(proxied_ingress):
    base, proxy = proxied_ingress("DATABASE_URL", 5432)
    proxy.blackhole()
    try:
        _not_ready_within_the_timeout(base, "postgresql")
    finally:
        proxy.restore()
    eventually(lambda: _status(base, "/readyz") == 200, timeout=20, interval=0.2)


def _webhook(base: str) -> requests.Response:
    body = stripe_event("customer.created", {"id": f"cus_{uuid.uuid4().hex}", "object": "customer"})
    headers = {"Stripe-Signature": sign_stripe_payload(body, SECRET), "Content-Type": "application/json"}
    return requests.post(f"{base}/webhooks/stripe", data=body, headers=headers, timeout=60)


def test_a_storm_of_probes_on_a_blackholed_rabbitmq_holds_no_threads(proxied_ingress):
    """Far more probes at once than the ingress has threads: one check per
    process runs, the other probes get the last answer at once, so /healthz
    and a webhook are still answered fast."""
    base, proxy = proxied_ingress("BROKER_URL", 5672)
    time.sleep(CACHE)  # the answer from start-up is stale: the storm starts checks
    proxy.blackhole()
    try:
        with ThreadPoolExecutor(64) as probes:
            storm = [probes.submit(_readyz, base) for _ in range(200)]
            time.sleep(0.2)  # the storm is on
            healthz, healthz_took = _timed(lambda: requests.get(f"{base}/healthz", timeout=60))
            webhook, webhook_took = _timed(lambda: _webhook(base))
            answers = [future.result() for future in storm]
    finally:
        proxy.restore()
    assert (healthz.status_code, webhook.status_code) == (200, 200), webhook.text
    assert healthz_took < 1.0 and webhook_took < 1.0, (healthz_took, webhook_took)
    assert max(took for _, took in answers) < TIMEOUT + 1.5
    assert {answer.status_code for answer, _ in answers} <= {200, 503}


def test_concurrent_probes_start_one_check_and_wait_no_longer_than_the_timeout():
    """Fifty probes at once against a dependency that hangs: one check runs;
    its starter waits the timeout, every other probe answers at once; the
    answer is then kept for the cache period."""
    calls, release = [], threading.Event()

    def hanging() -> None:
        calls.append(time.monotonic())
        release.wait(30)

    check = CachedCheck(hanging, ttl=CACHE, timeout=TIMEOUT)

    def probe() -> tuple[str, float]:
        started = time.monotonic()
        answer = check.answer(check.begin())
        return answer, time.monotonic() - started

    try:
        with ThreadPoolExecutor(50) as probes:
            answers = list(probes.map(lambda _: probe(), range(50)))
        assert len(calls) == 1
        waited = sorted(took for _, took in answers)
        assert waited[-1] < TIMEOUT + 0.5 and waited[-2] < 0.5, waited
        assert answers[0][0] == "not checked yet" or answers[0][0].startswith("timed out")
        assert probe()[0].startswith("timed out") and len(calls) == 1  # cached, and still one check
    finally:
        release.set()
    eventually(lambda: probe()[0] == "ok" or None, timeout=CACHE + TIMEOUT + 2)
