"""Slot computation, without I/O: each of the five schedules across the two
days of 2026 the clocks change in Europe/Paris, no slot lost, none doubled."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from domain.job_slots import Schedule
from domain.job_table import JOBS
from payfleet.platform.config import ConfigError, job_table, load_settings

PARIS = ZoneInfo("Europe/Paris")
JOB = {job.name: job for job in JOBS}


def local_day(year: int, month: int, day: int) -> tuple[datetime, datetime]:
    """The local day as a (start, end] window of real instants (just before
    its midnight, so the midnight slot is in)."""
    start = datetime(year, month, day, tzinfo=PARIS).astimezone(UTC)
    end = (datetime(year, month, day, tzinfo=PARIS) + timedelta(days=1)).astimezone(UTC)
    return start - timedelta(microseconds=1), end - timedelta(microseconds=1)


def slots(name: str, year: int, month: int, day: int) -> list[datetime]:
    return JOB[name].schedule(PARIS).between(*local_day(year, month, day))


def local(instants: list[datetime]) -> list[str]:
    return [i.astimezone(PARIS).strftime("%H:%M%z") for i in instants]


def gaps(instants: list[datetime]) -> set[timedelta]:
    return {b - a for a, b in itertools.pairwise(instants)}


def test_the_spring_day_has_23_real_hours_and_interval_jobs_follow_them():
    five = slots("expire-stale-orders", 2026, 3, 29)
    assert len(five) == 23 * 12 and gaps(five) == {timedelta(minutes=5)}
    assert local(five)[23:26] == ["01:55+0100", "03:00+0200", "03:05+0200"]
    fifteen = slots("release-expired-reservations", 2026, 3, 29)
    assert len(fifteen) == 23 * 4 and gaps(fifteen) == {timedelta(minutes=15)}
    hourly = slots("clean-expired-carts", 2026, 3, 29)
    assert len(hourly) == 23 and gaps(hourly) == {timedelta(hours=1)}
    assert local(hourly)[:4] == ["00:00+0100", "01:00+0100", "03:00+0200", "04:00+0200"]


def test_the_autumn_day_has_25_real_hours_and_the_repeated_hour_fires_twice():
    five = slots("expire-stale-orders", 2026, 10, 25)
    assert len(five) == 25 * 12 and gaps(five) == {timedelta(minutes=5)}
    assert local(five).count("02:30+0200") == 1 and local(five).count("02:30+0100") == 1
    fifteen = slots("release-expired-reservations", 2026, 10, 25)
    assert len(fifteen) == 25 * 4 and gaps(fifteen) == {timedelta(minutes=15)}
    hourly = slots("clean-expired-carts", 2026, 10, 25)
    assert len(hourly) == 25 and gaps(hourly) == {timedelta(hours=1)}
    assert local(hourly)[1:5] == ["01:00+0200", "02:00+0200", "02:00+0100", "03:00+0100"]


@pytest.mark.parametrize("day", [(2026, 3, 29), (2026, 10, 25)])
def test_wall_clock_jobs_fire_once_on_the_days_the_clocks_change(day):
    assert local(slots("request-reviews", *day)) == ["10:00+0200" if day[1] == 3 else "10:00+0100"]
    # Both days are Sundays: the weekly sweep fires once, at 03:00 local.
    assert local(slots("cleanup-stale-payment-intents", *day)) == [
        "03:00+0200" if day[1] == 3 else "03:00+0100"
    ]


def every(start: datetime, end: datetime, minutes: int) -> list[datetime]:
    """Instants `minutes` apart in real time from `start` through `end`:
    computed in UTC, without cron or time zones."""
    found, at = [], start
    while at <= end:
        found.append(at)
        at += timedelta(minutes=minutes)
    return found


def utc(year: int, month: int, day: int, hour: int) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


# The day before, of and after each change, from midnight Paris of the day
# before to midnight UTC three days on: every slot written out by hand.
AROUND = {
    (2026, 3, 29): (
        utc(2026, 3, 27, 23),
        utc(2026, 3, 31, 0),
        [utc(2026, 3, 28, 9), utc(2026, 3, 29, 8), utc(2026, 3, 30, 8)],  # 10:00 Paris, +01 then +02
        [utc(2026, 3, 29, 1)],  # Sunday 03:00 Paris, just after the gap (+02)
    ),
    (2026, 10, 25): (
        utc(2026, 10, 23, 22),
        utc(2026, 10, 27, 0),
        [utc(2026, 10, 24, 8), utc(2026, 10, 25, 9), utc(2026, 10, 26, 9)],  # +02 then +01
        [utc(2026, 10, 25, 2)],  # Sunday 03:00 Paris, the first one after the repeated hour (+01)
    ),
}


@pytest.mark.parametrize("day", [(2026, 3, 29), (2026, 10, 25)])
def test_no_slot_is_lost_or_doubled_around_the_change(day):
    """The days before, of and after the change, as one window and hour by
    hour: exactly the instants written out by hand, each once."""
    first, last, daily, weekly = AROUND[day]
    expected = {
        "expire-stale-orders": every(first, last, 5),
        "release-expired-reservations": every(first, last, 15),
        "clean-expired-carts": every(first, last, 60),
        "request-reviews": daily,
        "cleanup-stale-payment-intents": weekly,
        "archive-dead-letters": every(first + timedelta(minutes=45), last, 60),
    }
    start, end = first - timedelta(microseconds=1), last
    for job in JOBS:
        schedule = job.schedule(PARIS)
        pieces: list[datetime] = []
        cursor = start
        while cursor < end:
            step = min(end, cursor + timedelta(hours=1))
            pieces += schedule.between(cursor, step)
            cursor = step
        assert schedule.between(start, end) == expected[job.name], job.name
        assert pieces == expected[job.name], job.name


def test_a_wall_clock_time_inside_the_gap_fires_after_it_and_a_repeated_one_fires_once():
    daily_0230 = Schedule("30 2 * * *", PARIS)
    spring = daily_0230.between(*local_day(2026, 3, 29))
    autumn = daily_0230.between(*local_day(2026, 10, 25))
    assert local(spring) == ["03:30+0200"]
    assert local(autumn) == ["02:30+0200"]


def test_latest_and_next_slot_across_the_spring_gap():
    five = JOB["expire-stale-orders"].schedule(PARIS)
    just_after = datetime(2026, 3, 29, 1, 0, 30, tzinfo=UTC)  # 03:00:30 summer time
    assert five.latest(just_after) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert five.next(datetime(2026, 3, 29, 0, 57, tzinfo=UTC)) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    weekly = JOB["cleanup-stale-payment-intents"].schedule(PARIS)
    assert weekly.next(just_after) == datetime(2026, 4, 5, 1, 0, tzinfo=UTC)
    assert weekly.latest(just_after) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)


def test_schedules_and_time_zone_are_configurable_and_checked():
    table = job_table(
        load_settings({"JOB_SCHEDULES": "clean-expired-carts=*/30 * * * *", "SCHEDULE_TZ": "UTC"})
    )
    carts = table.get("clean-expired-carts")
    assert carts is not None and carts.cron == "*/30 * * * *" and str(table.tz) == "UTC"
    with pytest.raises(ConfigError, match="unknown jobs"):
        job_table(load_settings({"JOB_SCHEDULES": "no-such-job=* * * * *"}))
    with pytest.raises(ConfigError, match="not a cron"):
        job_table(load_settings({"JOB_SCHEDULES": "clean-expired-carts=every hour"}))
    with pytest.raises(ConfigError, match="time zone"):
        job_table(load_settings({"SCHEDULE_TZ": "Mars/Olympus"}))
