"""Provider webhooks: verify, store and commit, publish, answer."""

from __future__ import annotations

import falcon
from prometheus_client import Counter

from domain.events import EventFacts, monetbil_event_facts, stripe_event_facts
from ingress import monetbil_signature, stripe_signature
from ingress.parsing import parse_form, parse_json, read_body
from payfleet.platform import logs
from payfleet.platform.outbox import EventInbox

WEBHOOKS = Counter("payfleet_webhooks_total", "Provider webhooks answered", ["provider", "outcome"])


class StripeWebhook:
    def __init__(self, inbox: EventInbox, secrets: tuple[str, ...], tolerance: int, max_body: int) -> None:
        self._inbox, self._secrets, self._tolerance, self._max_body = inbox, secrets, tolerance, max_body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        payload = read_body(req, self._max_body)
        stripe_signature.verify(payload, req.get_header("Stripe-Signature"), self._secrets, self._tolerance)
        facts = stripe_event_facts(parse_json(payload))
        duplicate = _accept(self._inbox, facts, req)
        WEBHOOKS.labels("stripe", "duplicate" if duplicate else "stored").inc()
        resp.media = {"received": True, "duplicate": duplicate}


class MonetbilWebhook:
    """Monetbil's payment callback: form-encoded, answered `received`."""

    def __init__(self, inbox: EventInbox, secret: str, max_body: int) -> None:
        self._inbox, self._secret, self._max_body = inbox, secret, max_body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        fields = parse_form(read_body(req, self._max_body))
        monetbil_signature.verify(fields, self._secret)
        facts = monetbil_event_facts(fields)
        duplicate = _accept(self._inbox, facts, req)
        WEBHOOKS.labels("monetbil", "duplicate" if duplicate else "stored").inc()
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = "received"


def _accept(inbox: EventInbox, facts: EventFacts, req: falcon.Request) -> bool:
    """Store the event; the request's access line names it: its provider and
    key, the stored row's id, whether this delivery was a duplicate, and the
    trace id its worker's lines will carry. A duplicate's stored event keeps
    the trace of its first delivery, so the line gives no trace id then."""
    # The lines logged while storing it carry the trace its worker's will.
    with logs.log_context(trace_id=facts.trace_id):
        event_id, duplicate = inbox.accept(facts)
    logs.add_access_fields(
        req.env,
        provider=facts.provider,
        event_key=facts.event_key,
        event_id=event_id,
        duplicate=duplicate,
        trace_id=None if duplicate else facts.trace_id,
    )
    return duplicate
