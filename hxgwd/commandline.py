"""What both command lines (`hxgwd` in cli.py, its store commands in store/cli.py) and the admin API
share: exit codes and the way a point in time is written. A module of its own, importing nothing
of hxgwd, so that neither CLI imports the other and the admin API imports no CLI."""

from __future__ import annotations

import re

EXIT_USAGE = 2            # as argparse exits on a bad command line
EXIT_FORCED = 3
EXIT_LISTEN = 71
EXIT_CANTCREAT = 73
EXIT_TEMPFAIL = 75         # workers: the program file changed under the supervisor (an upgrade)
EXIT_CONFIG = 78

WHEN_FORMS = "YYYY-MM-DD (midnight in [limits] timezone), an ISO 8601 time (that zone unless it has an offset)"
WHEN_HELP = f"{WHEN_FORMS}, or an age like 30m, 12h, 7d, 4w"
EXPIRES_HELP = f"{WHEN_FORMS}, or a time from now like 30d, 12h"
_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: float, future: bool = False, tz: str = "UTC") -> float:
    """A point in time as unix seconds: "now", an age ("7d": 7 days ago; with future=True, 7 days
    from now), a date (its midnight), or an ISO 8601 time; a date or time without an offset is in
    the time zone `tz` ([limits] timezone, as budgets and `--by day` are). ValueError otherwise."""
    import datetime as dt     # here: `hxgwd --version` imports this module and should start fast
    import zoneinfo

    text = text.strip()
    if text == "now":
        return now
    match = _AGE.fullmatch(text)
    if match:
        seconds = float(match.group(1)) * _SECONDS[match.group(2)]
        return now + seconds if future else now - seconds
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r}: not a time; use {EXPIRES_HELP if future else WHEN_HELP}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=zoneinfo.ZoneInfo(tz))
    return when.timestamp()
