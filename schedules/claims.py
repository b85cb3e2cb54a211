"""The scheduler's job tick: claim each job's due slot, publish what was
claimed, and republish claims whose publish never happened.

Any number of replicas tick side by side. A slot is claimed by inserting its
`(job, slot)` row; the unique key lets exactly one replica's INSERT in, and
only that replica publishes. Slots missed while no scheduler ran are
coalesced: the latest due slot runs once (if it is within the job's catch-up
window) and the older ones are recorded as skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter
from sqlalchemy.orm import Session, sessionmaker

from domain import job_runs
from domain.events import new_trace_id
from domain.job_table import Job, JobTable
from payfleet.platform.config import Settings, job_table
from payfleet.platform.publishing import Publisher, run_message

log = logging.getLogger(__name__)

CLAIMED = Counter("payfleet_job_slots_claimed_total", "Job slots this scheduler claimed", ["job", "state"])

# A run still `running` this long after its time limit lost its worker.
ABANDON_MARGIN_SECONDS = 300.0
SWEEP_INTERVAL_SECONDS = 60.0

# How far back missed slots are recorded as skipped after an outage.
SKIP_LOOKBACK = timedelta(days=35)


class SlotClaimer:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        table: JobTable,
        sender: Publisher,
        *,
        republish_after: float,
        abandon_after: float = 3600.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._sessions, self._table, self._sender = sessions, table, sender
        self._republish_after = timedelta(seconds=republish_after)
        self._abandon_after = timedelta(seconds=abandon_after)
        self._swept_at = 0.0
        self._clock = clock
        # The slot each job was last seen recorded at: ticks between two
        # slots touch no table.
        self._seen: dict[str, datetime] = {}
        # Each job's current slot and the one after it: no cron arithmetic
        # until the clock passes the next slot.
        self._current: dict[str, tuple[datetime, datetime | None]] = {}

    def run_once(self, now: datetime | None = None) -> list[int]:
        """One tick; returns the ids of the runs it published."""
        now = now or self._clock()
        self.sweep_abandoned()
        claimed = [found for job in self._table.jobs if (found := self._claim(job, now)) is not None]
        published = self._publish(claimed)
        return published + self.republish()

    def _claim(self, job: Job, now: datetime) -> tuple[int, str, str] | None:
        schedule = job.schedule(self._table.tz)
        slot = self._latest(job, now)
        if slot is None or self._seen.get(job.name) == slot:
            return None
        with self._sessions.begin() as session:
            if job_runs.slot_recorded(session, job.name, slot):
                self._seen[job.name] = slot
                return None
            previous = job_runs.last_slot(session, job.name)
            late = now - slot
            state = "queued" if late <= job.catch_up else "skipped"
            note = (
                None if state == "queued" else f"found {late} late, past the {job.catch_up} catch-up window"
            )
            trace_id = new_trace_id()
            run_id = job_runs.claim(session, job.name, slot, state, note, trace_id=trace_id)
            if run_id is None:
                self._seen[job.name] = slot
                return None  # another replica holds this slot
            if previous is not None and previous < slot:
                missed = schedule.between(max(previous, slot - SKIP_LOOKBACK), slot)[:-1]
                job_runs.record_skipped(
                    session, job.name, missed, f"missed while no scheduler ran; coalesced into run {run_id}"
                )
        self._seen[job.name] = slot
        CLAIMED.labels(job.name, state).inc()
        log.info("job %s slot %s claimed as run %s (%s)", job.name, slot.isoformat(), run_id, state)
        return (run_id, job.actor, trace_id) if state == "queued" else None

    def _latest(self, job: Job, now: datetime) -> datetime | None:
        known = self._current.get(job.name)
        if known and known[0] <= now and (known[1] is None or now < known[1]):
            return known[0]
        schedule = job.schedule(self._table.tz)
        slot = schedule.latest(now)
        if slot is not None:
            self._current[job.name] = (slot, schedule.next(slot))
        return slot

    def _publish(self, claimed: list[tuple[int, str, str]]) -> list[int]:
        if not claimed:
            return []
        messages = [(run_id, run_message(actor, run_id, trace_id)) for run_id, actor, trace_id in claimed]
        sent = self._sender.send(messages)
        if sent:
            with self._sessions.begin() as session:
                job_runs.mark_published(session, sent)
        return sent

    def republish(self) -> list[int]:
        """Publish queued runs whose publish never happened, each job's newest
        slot only (older ones are skipped: one catch-up run, not a pile); the
        rows stay locked while publishing, so two schedulers never both send one."""
        with self._sessions.begin() as session:
            if superseded := job_runs.supersede_unpublished(session):
                log.info("%d unpublished job run(s) superseded by a later slot of their job", superseded)
            waiting = job_runs.lock_unpublished(session, grace=self._republish_after)
            messages = [
                (run_id, run_message(job.actor, run_id, trace_id))
                for run_id, name, trace_id in waiting
                if (job := self._table.get(name)) is not None
            ]
            sent = self._sender.send(messages) if messages else []
            job_runs.mark_published(session, sent)
        if sent:
            log.info("republished job runs %s", sent)
        return sent

    def sweep_abandoned(self) -> list[int]:
        """Runs left `running` by a dead worker are recorded failed; once a
        minute is plenty."""
        if time.monotonic() - self._swept_at < SWEEP_INTERVAL_SECONDS:
            return []
        with self._sessions.begin() as session:
            failed = job_runs.fail_abandoned(session, older_than=self._abandon_after)
        self._swept_at = time.monotonic()
        if failed:
            log.warning("job runs %s abandoned while running; recorded failed", failed)
        return failed


def claimer_for(settings: Settings, sessions: sessionmaker[Session], publisher: Publisher) -> SlotClaimer:
    return SlotClaimer(
        sessions,
        job_table(settings),
        publisher,
        republish_after=settings.outbox_relay_grace_seconds,
        abandon_after=settings.job_time_limit_seconds + ABANDON_MARGIN_SECONDS,
    )
