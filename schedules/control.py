"""What the admin API and the command line do with jobs: show the table
with next and last runs, and start a run by hand."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from schedules import runs
from schedules.jobs import JobTable
from workers.job_messages import MessageSender, run_message


def job_overview(session: Session, table: JobTable, now: datetime) -> list[dict[str, Any]]:
    """Each job's schedule, next run (local and UTC) and last run."""
    last = runs.last_runs(session)
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


def start_run(
    sessions: sessionmaker[Session], sender: MessageSender, table: JobTable, name: str
) -> tuple[int, bool]:
    """Record a manual run and publish it; returns (run id, published). An
    unpublished run is published by the scheduler's next tick."""
    job = table.get(name)
    if job is None:
        raise KeyError(name)
    with sessions() as session:
        run_id = runs.create_manual(session, job.name)
        session.commit()
    published = bool(sender.send([(run_id, run_message(job.actor, run_id))]))
    if published:
        with sessions() as session:
            runs.mark_published(session, [run_id])
            session.commit()
    return run_id, published
