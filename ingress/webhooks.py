"""Provider webhooks: verify, store and commit, publish, answer."""

from __future__ import annotations

import falcon
from prometheus_client import Counter

from domain.events import stripe_event_facts
from ingress import stripe_signature
from ingress.parsing import parse_json, read_body
from workers.publisher import EventInbox

WEBHOOKS = Counter("payfleet_webhooks_total", "Provider webhooks answered", ["provider", "outcome"])


class StripeWebhook:
    def __init__(self, inbox: EventInbox, secrets: tuple[str, ...], tolerance: int, max_body: int) -> None:
        self._inbox, self._secrets, self._tolerance, self._max_body = inbox, secrets, tolerance, max_body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        payload = read_body(req, self._max_body)
        stripe_signature.verify(payload, req.get_header("Stripe-Signature"), self._secrets, self._tolerance)
        duplicate = self._inbox.accept(stripe_event_facts(parse_json(payload)))
        WEBHOOKS.labels("stripe", "duplicate" if duplicate else "stored").inc()
        resp.media = {"received": True, "duplicate": duplicate}
