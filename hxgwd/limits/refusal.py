"""The 429 a limiter answers with, OpenAI's wording, for the limit that binds."""

from __future__ import annotations

import math

from hxgwd.errors import RateLimited
from hxgwd.limits.reservation import NANO

RPM, TPM, BUDGET = "rate_limit_rpm", "rate_limit_tpm", "budget_exceeded"


def refusal(code: str, wait: float, limit: float, used: float, asked: float, period: str = "month") -> RateLimited:
    """The 429 for the limit that binds; `wait` seconds until it would admit (Retry-After)."""
    secs = max(1, math.ceil(wait))
    if code == RPM:
        msg = (f"Rate limit reached for requests per minute (RPM): limit {int(limit)}, used {int(used)}, "
               f"requested 1. Please try again in {secs}s.")
    elif code == TPM:
        msg = (f"Rate limit reached for tokens per minute (TPM): limit {int(limit)}, used {int(used)}, "
               f"requested {int(asked)}. Please try again in {secs}s.")
    else:
        word = "daily" if period == "day" else "monthly"
        msg = (f"Budget exceeded: this key's {word} budget is ${limit / NANO:.2f}, ${used / NANO:.4f} is "
               f"spent or reserved and this request may cost up to ${asked / NANO:.4f}. "
               f"The budget resets in {_human(secs)}.")
    return RateLimited(msg, code=code, retry_after=wait)


def _human(secs: int) -> str:
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60} minutes"
    if secs < 172800:
        return f"{secs // 3600} hours"
    return f"{secs // 86400} days"
