"""What an admission holds until it is settled, with money in integer nano-USD: sums are exact,
and Redis adds them atomically (INCRBY) in the same unit.
"""

from __future__ import annotations

import math

import attrs

NANO = 1_000_000_000     # nano-USD per USD
MAX_NANO = 1 << 62       # a reservation is at most this (INCRBY's int64); refused by any sane budget


@attrs.frozen
class Reservation:
    """What admission took; `settle()` gives back the difference to the real usage."""

    key: str
    bucket: int                  # the whole second (limiter's clock) the request counts in
    tokens: int | None           # reserved in the tpm window; None: the key has no tpm
    nano_usd: int | None         # reserved on the budget; None: the key has no budget
    period: str | None = None    # budget period key, e.g. "2026-11"
    period_end: float = 0.0      # unix time the period ends
    where: str = "local"         # the store holding it: "local" or "redis"

    @property
    def cost_usd(self) -> float:
        return (self.nano_usd or 0) / NANO


def to_nano(usd: float, up: bool = False) -> int:
    """USD -> integer nano-USD; reservations round up, real costs to nearest."""
    return min(MAX_NANO, max(0, math.ceil(usd * NANO - 1e-6) if up else round(usd * NANO)))
