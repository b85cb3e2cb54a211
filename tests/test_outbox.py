"""Publishing and the outbox relay against the real RabbitMQ: an idle
publisher whose connection died reconnects, a broker outage loses nothing,
and two scheduler replicas relay each stored event once."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from domain.events import EventFacts, record_event
from payfleet.platform.broker import build_broker
from payfleet.platform.config import Settings, load_settings
from payfleet.platform.publishing import Publisher
from schedules.relay import OutboxRelay
from tests.conftest import scalar
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", 5672) as running:
        yield running


@pytest.fixture
def settings_via_proxy(env: dict[str, str], proxy: TcpProxy) -> Settings:
    return load_settings({**env, "BROKER_URL": proxy.url_for(env["BROKER_URL"])})


def _store_events(sessions, count: int) -> list[int]:
    with sessions() as session:
        ids = [
            record_event(
                session, EventFacts("stripe", f"evt_{n}", "customer.created", None, {"id": f"evt_{n}"})
            )[0]
            for n in range(count)
        ]
        session.commit()
    return ids


def _ready_messages(settings: Settings) -> int:
    broker = build_broker(settings)
    try:
        return broker.get_queue_message_counts("payments")[0]
    finally:
        broker.close()


def test_an_idle_publisher_whose_connection_died_reconnects_on_the_next_publish(
    sessions, settings, settings_via_proxy, proxy
):
    [first, second] = _store_events(sessions, 2)
    publisher = Publisher(build_broker(settings_via_proxy))
    assert publisher.send_events([first]) == [first]
    proxy.cut()  # what missed heartbeats do to an idle publisher's connection
    proxy.restore()
    assert publisher.send_events([second]) == [second]
    assert _ready_messages(settings) == 2


def test_a_broker_outage_loses_nothing_the_relay_publishes_after_it(
    sessions, settings, settings_via_proxy, proxy
):
    ids = _store_events(sessions, 5)
    publisher = Publisher(build_broker(settings_via_proxy))
    relay = OutboxRelay(sessions, publisher, grace=0, stuck_after=900)
    proxy.cut()
    assert publisher.send_events(ids) == []
    assert relay.run_once() == 0
    assert scalar(sessions, "SELECT count(*) FROM provider_events WHERE published_at IS NULL") == 5

    proxy.restore()
    assert relay.run_once() == 5
    assert relay.run_once() == 0
    assert scalar(sessions, "SELECT count(*) FROM provider_events WHERE published_at IS NULL") == 0
    assert _ready_messages(settings) == 5


def test_the_relay_leaves_fresh_events_to_the_ingress_and_republishes_lost_ones(sessions, settings):
    [fresh, published, lost] = _store_events(sessions, 3)
    with sessions() as session:
        session.execute(
            text("UPDATE provider_events SET published_at = now() WHERE id = :id"), {"id": published}
        )
        session.execute(
            text("UPDATE provider_events SET published_at = now() - interval '1 hour' WHERE id = :id"),
            {"id": lost},
        )
        session.commit()
    relay = OutboxRelay(sessions, Publisher(build_broker(settings)), grace=60, stuck_after=900)
    assert relay.run_once() == 1
    assert _ready_messages(settings) == 1
    recent = scalar(
        sessions,
        "SELECT published_at > now() - interval '1 minute' FROM provider_events WHERE id = :id",
        id=lost,
    )
    assert recent is True
    assert scalar(sessions, "SELECT published_at FROM provider_events WHERE id = :id", id=fresh) is None


def test_two_relays_running_together_publish_each_event_once(sessions, settings):
    _store_events(sessions, 300)
    relays = [
        OutboxRelay(sessions, Publisher(build_broker(settings)), grace=0, stuck_after=900, batch=20)
        for _ in range(2)
    ]
    batches: list[tuple[int, int]] = []
    start = threading.Barrier(len(relays))

    def drain(relay: OutboxRelay) -> None:
        start.wait()
        while sent := relay.run_once():
            batches.append((id(relay), sent))

    threads = [threading.Thread(target=drain, args=(relay,)) for relay in relays]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(sent for _, sent in batches) == 300
    assert len({relay for relay, _ in batches}) == 2, "both replicas took a share"
    assert _ready_messages(settings) == 300


def test_one_tick_drains_a_backlog_larger_than_a_batch(sessions, settings):
    _store_events(sessions, 50)
    relay = OutboxRelay(sessions, Publisher(build_broker(settings)), grace=0, stuck_after=900, batch=20)
    assert relay.run_once() == 50
    assert relay.run_once() == 0
    assert _ready_messages(settings) == 50
