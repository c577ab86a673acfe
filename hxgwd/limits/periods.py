"""Budget periods: the calendar day or month in a timezone, with keys like "2026-11" and
"2026-11-28" (ISO, so they sort in time order).
"""

from __future__ import annotations

import datetime as dt
import zoneinfo

import attrs


@attrs.frozen
class Period:
    key: str        # "2026-11" or "2026-11-28"
    start: float    # unix time, inclusive
    end: float      # unix time, exclusive


class Calendar:
    """Calendar periods in one timezone; the current one is cached per kind (a hot-path lookup)."""

    def __init__(self, timezone: str = "UTC") -> None:
        self.timezone = timezone
        self.tz = zoneinfo.ZoneInfo(timezone)
        self._current: dict[str, Period] = {}
        self._around: dict[str, tuple[Period, Period, Period]] = {}

    def period(self, kind: str, now: float) -> Period:
        p = self._current.get(kind)
        if p is None or not p.start <= now < p.end:
            p = self._current[kind] = self.compute(kind, now)
        return p

    def around(self, kind: str, now: float) -> tuple[Period, Period, Period]:
        """The previous, current and next period (Redis picks by its own clock at boundaries)."""
        cur = self.period(kind, now)
        three = self._around.get(kind)
        if three is None or three[1] is not cur:
            three = self._around[kind] = (self.compute(kind, cur.start - 1), cur, self.compute(kind, cur.end))
        return three

    def compute(self, kind: str, now: float) -> Period:
        day = dt.datetime.fromtimestamp(now, self.tz).date()
        if kind == "day":
            start, end, key = day, day + dt.timedelta(days=1), day.isoformat()
        else:
            start = day.replace(day=1)
            end = (start + dt.timedelta(days=32)).replace(day=1)
            key = start.isoformat()[:7]
        return Period(key, self._midnight(start), self._midnight(end))

    def _midnight(self, day: dt.date) -> float:
        # A midnight that falls in a DST gap maps (fold=0) to the first instant of that day.
        return dt.datetime(day.year, day.month, day.day, tzinfo=self.tz).timestamp()

