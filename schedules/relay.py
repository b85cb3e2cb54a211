"""The outbox relay: publishes stored events whose publish never happened
(RabbitMQ was down at ingest, or a process died between commit and publish)."""

from __future__ import annotations

import logging
from datetime import timedelta

from prometheus_client import Counter
from sqlalchemy.orm import Session, sessionmaker

from domain.events import lock_unpublished, mark_published
from payfleet.platform.publishing import Publisher

log = logging.getLogger(__name__)

RELAYED = Counter("payfleet_outbox_relayed_total", "Stored events published by the outbox relay")

BATCH = 500
MAX_BATCHES_PER_TICK = 40


class OutboxRelay:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        publisher: Publisher,
        *,
        grace: float,
        stuck_after: float,
        batch: int = BATCH,
    ) -> None:
        self._sessions, self._publisher, self._batch = sessions, publisher, batch
        self._grace, self._stuck_after = timedelta(seconds=grace), timedelta(seconds=stuck_after)

    def run_once(self) -> int:
        """Publish what waits, a batch at a time, until a batch comes back
        short (or `MAX_BATCHES_PER_TICK` ran, so the tick's other work is not
        starved); returns how many RabbitMQ confirmed. A backlog drains at
        publishing speed, not at one batch per tick."""
        total = 0
        for _ in range(MAX_BATCHES_PER_TICK):
            found, sent = self._relay_batch()
            total += sent
            if sent < self._batch or found > sent:
                break
        return total

    def _relay_batch(self) -> tuple[int, int]:
        """One batch: (found, published). The rows stay locked while
        publishing, so a second scheduler skips them."""
        with self._sessions.begin() as session:
            ids = lock_unpublished(
                session, grace=self._grace, stuck_after=self._stuck_after, limit=self._batch
            )
            sent = self._publisher.send_events(ids) if ids else []
            if sent:
                mark_published(session, sent)
        if sent:
            RELAYED.inc(len(sent))
            log.info("relayed %d stored events", len(sent))
        return len(ids), len(sent)
