"""Run records: the scheduler's claims and the history of every job run.

A scheduled run's `(job, slot)` row is its claim (unique): the replica whose
INSERT went in publishes it, every other replica's INSERT does nothing. A run
moves queued → running → succeeded/failed once; skipped runs never start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

from sqlalchemy import Integer, cast, exists, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, aliased

from domain.job_table import JobTable
from domain.models import ScheduledRun

FINISHED = frozenset({"succeeded", "failed", "skipped"})
# Most skipped rows written for one gap, newest first (a scheduler down for
# a month must not write a row per 5-minute slot).
MAX_SKIPPED_ROWS = 1000


@dataclass(frozen=True)
class StartedRun:
    id: int
    job: str
    slot: datetime | None
    trigger: str
    attempts: int
    trace_id: str | None = None


def claim(
    session: Session,
    job: str,
    slot: datetime,
    state: str,
    error: str | None = None,
    *,
    trace_id: str | None = None,
) -> int | None:
    """Insert the slot's row; returns its id, or None if another replica
    (or an earlier tick) already holds the slot. The run's trace id is
    `trace_id`, or a fresh one."""
    return session.execute(
        insert(ScheduledRun)
        .values(
            job=job,
            slot=slot,
            trigger="scheduled",
            state=state,
            counts={},
            attempts=0,
            error=error,
            trace_id=trace_id or uuid4().hex,
        )
        .on_conflict_do_nothing(index_elements=["job", "slot"])
        .returning(ScheduledRun.id)
    ).scalar()


def record_skipped(session: Session, job: str, slots: Iterable[datetime], note: str) -> int:
    rows = [
        {
            "job": job,
            "slot": slot,
            "trigger": "scheduled",
            "state": "skipped",
            "counts": {},
            "attempts": 0,
            "error": note,
        }
        for slot in list(slots)[-MAX_SKIPPED_ROWS:]
    ]
    if not rows:
        return 0
    return len(
        session.execute(
            insert(ScheduledRun)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["job", "slot"])
            .returning(ScheduledRun.id)
        ).all()
    )


def slot_recorded(session: Session, job: str, slot: datetime) -> bool:
    found = session.scalar(select(ScheduledRun.id).where(ScheduledRun.job == job, ScheduledRun.slot == slot))
    return found is not None


def last_slot(session: Session, job: str) -> datetime | None:
    return session.scalar(select(func.max(ScheduledRun.slot)).where(ScheduledRun.job == job))


def create_manual(session: Session, job: str, *, trace_id: str | None = None) -> int:
    """A manual run; its trace id is `trace_id`, or a fresh one."""
    run = ScheduledRun(
        job=job,
        slot=None,
        trigger="manual",
        state="queued",
        counts={},
        attempts=0,
        trace_id=trace_id or uuid4().hex,
    )
    session.add(run)
    session.flush()
    return run.id


def mark_published(session: Session, run_ids: Iterable[int]) -> None:
    ids = list(run_ids)
    if ids:
        session.execute(update(ScheduledRun).where(ScheduledRun.id.in_(ids)).values(published_at=func.now()))


def supersede_unpublished(session: Session) -> int:
    """Scheduled runs never published whose job has a later slot claimed
    (RabbitMQ was down while the slots came and went) are skipped: on
    recovery each job runs once, for its newest slot, not once per slot
    missed. Rows another scheduler is publishing right now are left to it."""
    later = aliased(ScheduledRun)
    locked = (
        select(ScheduledRun.id)
        .where(
            ScheduledRun.state == "queued",
            ScheduledRun.trigger == "scheduled",
            ScheduledRun.published_at.is_(None),
            exists().where(
                later.job == ScheduledRun.job,
                later.slot > ScheduledRun.slot,
                later.state != "skipped",
            ),
        )
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    superseded = session.execute(
        update(ScheduledRun)
        .where(ScheduledRun.id.in_(locked))
        .values(state="skipped", error="superseded by a later slot", finished_at=func.now())
        .returning(ScheduledRun.id)
    ).all()
    return len(superseded)


def lock_unpublished(
    session: Session, *, grace: timedelta, limit: int = 100
) -> list[tuple[int, str, str | None]]:
    """Queued runs whose publish never happened (the claimer died between
    commit and publish, or RabbitMQ was down), older than `grace`, locked so
    two schedulers split them. Call supersede_unpublished first: only each
    job's newest slot is left to publish. (id, job, trace id) each."""
    query = (
        select(ScheduledRun.id, ScheduledRun.job, ScheduledRun.trace_id)
        .where(
            ScheduledRun.state == "queued",
            ScheduledRun.published_at.is_(None),
            ScheduledRun.created_at < func.now() - grace,
        )
        .order_by(ScheduledRun.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [(run_id, job, trace_id) for run_id, job, trace_id in session.execute(query).all()]


def lock_state(session: Session, run_id: int) -> tuple[str, str] | None:
    """(job, state) of a run, its row locked until the transaction ends."""
    row = session.execute(
        select(ScheduledRun.job, ScheduledRun.state).where(ScheduledRun.id == run_id).with_for_update()
    ).first()
    return (row[0], row[1]) if row else None


def begin(session: Session, run_id: int) -> StartedRun | None:
    """Mark a run running (the caller holds the job's lock, and the row's
    since `lock_state`). A finished run is left alone and None returned: a
    redelivered message does nothing. A run found `running` while its job's
    lock is free was started by a worker that died; it runs again."""
    run = session.get(ScheduledRun, run_id, with_for_update=True)
    if run is None or run.state in FINISHED:
        return None
    run.state = "running"
    run.started_at = datetime.now(UTC)
    run.attempts += 1
    return StartedRun(run.id, run.job, run.slot, run.trigger, run.attempts, run.trace_id)


def skip_if_queued(session: Session, run_id: int, note: str) -> bool:
    """Another run of the job holds its lock: a queued run is skipped rather
    than overlapping it. A running one is a duplicate delivery: untouched."""
    skipped = session.execute(
        update(ScheduledRun)
        .where(ScheduledRun.id == run_id, ScheduledRun.state == "queued")
        .values(state="skipped", error=note, finished_at=func.now())
        .returning(ScheduledRun.id)
    ).first()
    return skipped is not None


def fail_abandoned(session: Session, *, older_than: timedelta) -> list[int]:
    """Runs `running` longer than any delivery may last: their worker died
    without recording the outcome (and its redelivery did not come). Each
    is recorded failed, so the job's history does not show it running forever."""
    failed = session.execute(
        update(ScheduledRun)
        .where(ScheduledRun.state == "running", ScheduledRun.started_at < func.now() - older_than)
        .values(
            state="failed",
            error=f"abandoned: running for more than {older_than} without an outcome",
            finished_at=func.now(),
        )
        .returning(ScheduledRun.id)
    ).all()
    return [run_id for (run_id,) in failed]


def finish(session: Session, run_id: int, state: str, counts: Mapping[str, int], error: str | None) -> None:
    run = session.get_one(ScheduledRun, run_id, with_for_update=True)
    run.state = state
    run.counts = {key: int(value) for key, value in sorted(counts.items())}
    run.error = error[:4000] if error else None
    run.finished_at = datetime.now(UTC)
    if run.started_at is not None:
        run.duration_ms = int((run.finished_at - run.started_at).total_seconds() * 1000)


# --- views -------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def view(run: ScheduledRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "job": run.job,
        "slot": _iso(run.slot),
        "trigger": run.trigger,
        "state": run.state,
        "counts": run.counts,
        "error": run.error,
        "attempts": run.attempts,
        "created_at": _iso(run.created_at),
        "published_at": _iso(run.published_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "duration_seconds": run.duration_ms / 1000 if run.duration_ms is not None else None,
        "trace_id": run.trace_id,
    }


def get(session: Session, run_id: int) -> dict[str, Any] | None:
    run = session.get(ScheduledRun, run_id)
    return view(run) if run else None


def list_runs(session: Session, *, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    query = select(ScheduledRun).order_by(ScheduledRun.id.desc()).limit(limit)
    if job:
        query = query.where(ScheduledRun.job == job)
    return [view(run) for run in session.scalars(query)]


def last_runs(session: Session) -> dict[str, dict[str, Any]]:
    """Each job's most recent run that is not a skipped slot."""
    latest = (
        select(func.max(ScheduledRun.id))
        .where(ScheduledRun.state != "skipped")
        .group_by(ScheduledRun.job)
        .scalar_subquery()
    )
    return {
        run.job: view(run) for run in session.scalars(select(ScheduledRun).where(ScheduledRun.id.in_(latest)))
    }


def _sum_count(session: Session, key: str) -> int:
    total = session.scalar(select(func.coalesce(func.sum(cast(ScheduledRun.counts[key].astext, Integer)), 0)))
    return int(total or 0)


def metrics(session: Session) -> dict[str, Any]:
    """The jobs' figures, from the run records: fleet-wide, and they survive
    restarts. Times are seconds; lastExecutionTime is when the job's last
    run finished."""
    finished = (
        select(func.max(ScheduledRun.id))
        .where(ScheduledRun.state.in_(("succeeded", "failed")))
        .group_by(ScheduledRun.job)
        .scalar_subquery()
    )
    last = list(
        session.scalars(select(ScheduledRun).where(ScheduledRun.id.in_(finished)).order_by(ScheduledRun.job))
    )
    return {
        "paymentsExpiredTotal": _sum_count(session, "expired"),
        "paymentIntentsCanceledTotal": _sum_count(session, "payment_intents_canceled"),
        "stockReleasedTotal": _sum_count(session, "units_released"),
        "jobExecutionTime": {run.job: (run.duration_ms or 0) / 1000 for run in last},
        "lastExecutionTime": {run.job: _iso(run.finished_at) for run in last},
    }


def job_overview(session: Session, table: JobTable, now: datetime) -> list[dict[str, Any]]:
    """Each job's schedule, next run (local and UTC) and last run."""
    last = last_runs(session)
    overview = []
    for job in table.jobs:
        upcoming = job.schedule(table.tz).next(now)
        overview.append(
            {
                "name": job.name,
                "cron": job.cron,
                "time_zone": str(table.tz),
                "follows_real_time": job.schedule(table.tz).real_time,
                "catch_up_seconds": int(job.catch_up.total_seconds()),
                "summary": job.summary,
                "next_run": {
                    "local": upcoming.astimezone(table.tz).isoformat() if upcoming else None,
                    "utc": upcoming.isoformat() if upcoming else None,
                },
                "last_run": last.get(job.name),
            }
        )
    return overview


def reopen_failed(session: Session, run_id: int) -> str | None:
    """A failed run made runnable again: its dead-lettered message was
    requeued by an operator, who has fixed the cause. The run goes back to
    `queued` (the runner skips a finished run, so without this the requeued
    message would do nothing); the failure it had is kept in `error` until
    the run finishes again, and `attempts` keeps counting. It is marked
    published: the requeue is publishing it now, and the relay must neither
    publish it a second time nor skip it for a later slot. Returns None, or
    why the run is left as it is (a queued or running run needs nothing)."""
    run = session.get(ScheduledRun, run_id, with_for_update=True)
    if run is None:
        return f"no run {run_id}"
    if run.state in ("queued", "running"):
        return None
    if run.state != "failed":
        return f"run {run_id} is {run.state}; only a failed run is run again"
    run.state = "queued"
    run.error = f"requeued after a failure: {run.error or 'unknown'}"[:4000]
    run.finished_at, run.duration_ms = None, None
    run.published_at = datetime.now(UTC)
    return None
