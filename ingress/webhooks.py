"""Provider webhooks: verify, store and commit, publish, answer."""

from __future__ import annotations

import logging

import falcon
from prometheus_client import Counter
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from domain.events import EventFacts, mark_published, record_event, stripe_event_facts
from ingress import stripe_signature
from ingress.parsing import parse_json, read_body
from workers.publisher import EventPublisher

log = logging.getLogger(__name__)

WEBHOOKS = Counter("payfleet_webhooks_total", "Provider webhooks answered", ["provider", "outcome"])


class EventInbox:
    """Persist first: the event is committed before anything is published or
    answered, so a 2xx always means the event is in PostgreSQL."""

    def __init__(self, sessions: sessionmaker[Session], publisher: EventPublisher) -> None:
        self._sessions = sessions
        self._publisher = publisher

    def accept(self, facts: EventFacts) -> bool:
        """Store and publish one event; returns whether it was a duplicate."""
        with self._sessions() as session:
            event_id, duplicate = record_event(session, facts)
            session.commit()
        if not duplicate and self._publisher.send([event_id]):
            self._mark_published(event_id)
        WEBHOOKS.labels(facts.provider, "duplicate" if duplicate else "stored").inc()
        return duplicate

    def _mark_published(self, event_id: int) -> None:
        # Losing this mark only means the relay publishes the event once more,
        # which the worker treats as a duplicate: not worth failing the answer.
        try:
            with self._sessions() as session:
                mark_published(session, [event_id])
                session.commit()
        except SQLAlchemyError as error:
            log.warning("event %s published but not marked: %s", event_id, error)


class StripeWebhook:
    def __init__(self, inbox: EventInbox, secrets: tuple[str, ...], tolerance: int, max_body: int) -> None:
        self._inbox, self._secrets, self._tolerance, self._max_body = inbox, secrets, tolerance, max_body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        payload = read_body(req, self._max_body)
        stripe_signature.verify(payload, req.get_header("Stripe-Signature"), self._secrets, self._tolerance)
        duplicate = self._inbox.accept(stripe_event_facts(parse_json(payload)))
        resp.media = {"received": True, "duplicate": duplicate}
