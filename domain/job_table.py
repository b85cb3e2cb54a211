"""The one table of scheduled jobs: what runs, when, in which time zone, and
how late a missed slot may still be caught up.

Change a schedule with `JOB_SCHEDULES="name=cron;name=cron"` (5 fields, or
6 with seconds last) and the time zone with `SCHEDULE_TZ`; see the README.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from domain.job_slots import Schedule, is_valid


@dataclass(frozen=True)
class Job:
    name: str
    cron: str
    # A slot found later than this after its time is recorded as skipped, not run.
    catch_up: timedelta
    actor: str
    summary: str

    def schedule(self, tz: ZoneInfo) -> Schedule:
        return Schedule(self.cron, tz)


JOBS: tuple[Job, ...] = (
    Job(
        "expire-stale-orders",
        "*/5 * * * *",
        timedelta(minutes=5),
        "expire_stale_orders",
        "unpaid orders past their payment window expire; their PaymentIntent is cancelled and stock released",
    ),
    Job(
        "cleanup-stale-payment-intents",
        "0 3 * * 0",
        timedelta(days=1),
        "cleanup_stale_payment_intents",
        "PaymentIntents left open are synced with Stripe: succeeded ones repair their order, "
        "abandoned ones are cancelled",
    ),
    Job(
        "clean-expired-carts",
        "0 * * * *",
        timedelta(hours=1),
        "clean_expired_carts",
        "carts past their expiry are deleted",
    ),
    Job(
        "request-reviews",
        "0 10 * * *",
        timedelta(hours=12),
        "request_reviews",
        "customers of orders completed at least 7 days ago (and less than 14) are asked for a review "
        "over WhatsApp, once",
    ),
    Job(
        "release-expired-reservations",
        "*/15 * * * *",
        timedelta(minutes=15),
        "release_expired_reservations",
        "stock reservations older than RESERVATION_TTL_SECONDS whose order is not paid are released",
    ),
    Job(
        "archive-dead-letters",
        "45 * * * *",
        timedelta(hours=1),
        "archive_dead_letters",
        "dead letters older than DEAD_LETTER_ARCHIVE_AFTER_SECONDS are moved into PostgreSQL "
        "(dead_letter_archive), so none expires unseen",
    ),
)


@dataclass(frozen=True)
class JobTable:
    jobs: tuple[Job, ...]
    tz: ZoneInfo

    def get(self, name: str) -> Job | None:
        return next((job for job in self.jobs if job.name == name), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(job.name for job in self.jobs)


class ScheduleError(ValueError):
    """A schedule override or time zone that cannot be used."""


def job_table(time_zone: str, overrides: Iterable[tuple[str, str]] = ()) -> JobTable:
    """The jobs with the schedule overrides applied; a bad override is an
    error at start-up, not a silent non-schedule."""
    try:
        tz = ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"SCHEDULE_TZ is not a known time zone: {time_zone!r}") from None
    crons = dict(overrides)
    unknown = set(crons) - {job.name for job in JOBS}
    if unknown:
        raise ScheduleError(f"JOB_SCHEDULES names unknown jobs: {', '.join(sorted(unknown))}")
    for name, cron in crons.items():
        if not is_valid(cron):
            raise ScheduleError(f"JOB_SCHEDULES: {cron!r} is not a cron expression (job {name})")
    return JobTable(tuple(replace(job, cron=crons.get(job.name, job.cron)) for job in JOBS), tz)
