"""When a cron schedule fires, in a time zone, across daylight-saving changes.

Cron expressions are matched against local wall-clock time (croniter on
naive datetimes is plain calendar arithmetic). What a local time means on the
two days a year the clocks change depends on the job:

- A job that follows real time (its hour field is `*`: every 5 minutes,
  hourly) fires at every real instant whose local time matches. In the spring
  gap the missing local times simply never happen (01:55 → 03:00 is five
  minutes); in the autumn the repeated hour happens twice, and so do its
  slots: intervals stay intervals.
- A wall-clock job (a fixed hour: daily 10:00, Sunday 03:00) fires once per
  matching local day. A time inside the spring gap fires at the same offset
  after it (02:30 → 03:30 summer time); a time of the repeated autumn hour
  fires at its first occurrence only.

Slots are returned as UTC instants.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

_SEARCH_SPANS = tuple(
    timedelta(seconds=s) for s in (60, 3600, 86400, 8 * 86400, 32 * 86400, 367 * 86400, 1462 * 86400)
)


def is_valid(cron: str) -> bool:
    return bool(croniter.is_valid(cron)) and len(cron.split()) in (5, 6)


def follows_real_time(cron: str) -> bool:
    """A cron whose hour field is `*` describes an interval, not a time of day."""
    return cron.split()[1] == "*"


@dataclass(frozen=True)
class Schedule:
    cron: str
    tz: ZoneInfo

    @property
    def real_time(self) -> bool:
        return follows_real_time(self.cron)

    def between(self, after: datetime, until: datetime) -> list[datetime]:
        """Every slot in (after, until], oldest first, as UTC instants."""
        margin = self._margin(after, until)
        start = self._naive(after) - margin - timedelta(seconds=1)
        end = self._naive(until) + margin
        found: set[datetime] = set()
        matches = croniter(self.cron, start)
        while (naive := matches.get_next(datetime)) <= end:
            found.update(i for i in self._instants(naive) if after < i <= until)
        return sorted(found)

    def latest(self, now: datetime) -> datetime | None:
        """The most recent slot at or before `now`."""
        for span in _SEARCH_SPANS:
            if found := self.between(now - span, now):
                return found[-1]
        return None

    def next(self, now: datetime) -> datetime | None:
        """The first slot after `now`."""
        for span in _SEARCH_SPANS:
            if found := self.between(now, now + span):
                return found[0]
        return None

    def _naive(self, instant: datetime) -> datetime:
        return instant.astimezone(self.tz).replace(tzinfo=None)

    def _margin(self, after: datetime, until: datetime) -> timedelta:
        # Local times near either end can sit up to the offset change away
        # from it; off the days the offset changes that is nothing, so
        # second-level test schedules stay cheap.
        day = timedelta(days=1)
        points = (after - day, after, after + day, until - day, until, until + day)
        offsets = [point.astimezone(self.tz).utcoffset() or timedelta(0) for point in points]
        return max(offsets) - min(offsets)

    def _instants(self, naive: datetime) -> list[datetime]:
        if not self.real_time:
            # fold=0: the first occurrence of a repeated time; in the gap, the
            # offset from before the change (02:30 → 03:30 summer time).
            return [naive.replace(tzinfo=self.tz, fold=0).astimezone(UTC)]
        instants: list[datetime] = []
        for fold in (0, 1):
            instant = naive.replace(tzinfo=self.tz, fold=fold).astimezone(UTC)
            # A local time inside the spring gap does not round-trip: it never happens.
            if self._naive(instant) == naive and instant not in instants:
                instants.append(instant)
        return instants
