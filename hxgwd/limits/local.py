"""Stage 4, limit: per-key requests per minute, tokens per minute and a calendar budget.

Admission reserves an estimate and `settle()` corrects it to the real usage when the request ends,
so a reservation counts from the moment it is made: concurrent requests cannot overrun a budget
(as long as the estimate is an upper bound of the real cost; see `estimate`).

Windows. rpm and tpm count what was admitted in a sliding 60 s window of 1 s buckets: a request
admitted at unix time t counts until floor(t) + 60, i.e. for 59 to 60 s. This is a true "per
minute" limit (never more than the limit in any window), unlike GCRA / token buckets with a burst
of the per-minute amount, which allow up to twice the limit within one minute. It also lets
`settle()` correct a tpm reservation in the bucket it was made in. The same layout is used by the
Redis scripts (`hxgwd.limits.redis`), so a key behaves the same with or without Redis. Memory: at
most 60 buckets per key and window.

A request larger than the whole tpm allowance is admitted when the window is otherwise empty (it
runs alone): estimates lean high (max_tokens), and refusing it forever would help nobody. Budgets
have no such exception: a budget is a hard cap.

Budgets are USD spent in the current calendar day or month in `[limits] timezone`, counted in
integer nano-USD (exact sums; atomic INCRBY in Redis). Period keys look like "2026-11" and
"2026-11-28"; a refusal's Retry-After is the start of the next period. A period that began before
this process starts from what the usage store recorded in it (`seed_period`, seed.py).

Pure: no I/O; time comes in as unix seconds.
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from typing import Any, Iterable

import attrs

from hxgwd.config.model import Model
from hxgwd.errors import RateLimited
from hxgwd.runtime import Deployment, Principal

WINDOW = 60                                       # seconds; rpm and tpm windows, in 1 s buckets
NANO = 1_000_000_000                              # nano-USD per USD
DEFAULT_MAX_TOKENS = {"chat": 256, "embedding": 0}  # completion tokens assumed when max_tokens is absent
BYTES_PER_TOKEN = 4                               # prompt tokens ~= request body bytes / 4
MAX_TOKENS_ESTIMATED = 1 << 24     # more output than any model's context window holds today
MAX_CHOICES = 128                  # n and best_of counted up to this (OpenAI's own cap on n)
MAX_GENERATIONS = 1 << 16          # choices x prompts counted up to this: sums stay in int64 (Redis)
MAX_NANO = 1 << 62                 # a reservation is at most this (INCRBY's int64); refused by any sane budget

RPM, TPM, BUDGET = "rate_limit_rpm", "rate_limit_tpm", "budget_exceeded"


@attrs.frozen
class Estimate:
    tokens: int        # prompt + completion tokens, an upper bound in practice
    cost_usd: float    # worst case over the deployments that may serve the request


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


def limited(principal: Principal) -> bool:
    return principal.rpm is not None or principal.tpm is not None or principal.budget_usd is not None


def estimate(kind: str, prompt_bytes: int, max_tokens: int | None, deployments: Iterable[Deployment],
             choices: int = 1, prompt_tokens: int = 0) -> Estimate:
    """`kind` "chat" or "embedding"; `max_tokens` 0 or None when the request gives none, per
    choice; `choices` completions generated (n, best_of, prompts); `prompt_tokens` a floor for the
    prompt that the bytes may not show (token arrays, items)."""
    prompt = max(-(-prompt_bytes // BYTES_PER_TOKEN), prompt_tokens)
    output = 0 if kind == "embedding" else (max_tokens or DEFAULT_MAX_TOKENS.get(kind, 0)) * choices
    cost = max((usage_cost(d.config, prompt, output) for d in deployments), default=0.0)
    return Estimate(prompt + output, cost)


def estimate_request(kind: str, payload: dict[str, Any], prompt_bytes: int,
                     deployments: Iterable[Deployment]) -> Estimate:
    """The admission estimate of a parsed request body: what it may cost at most, as far as the
    body tells. An upstream bills every choice it generates (`n`, `best_of`, each prompt of a
    completions list), and an embeddings or completions prompt given as token arrays holds more
    tokens than its bytes / 4. Without max_tokens, DEFAULT_MAX_TOKENS per choice is a guess, not a
    bound: such a request may settle above its reservation, past the budget by that much."""
    # embeddings: `input`, or `prompt` as single-prompt (Ollama) backends spell it; completions: `prompt`
    given = payload.get("input", payload.get("prompt")) if kind == "embedding" else payload.get("prompt")
    items, item_tokens = _prompt_items(given)
    choices = max(_choices(payload.get("n")), _choices(payload.get("best_of")))
    return estimate(kind, prompt_bytes, max_tokens(payload), deployments,
                    choices=min(choices * max(items, 1), MAX_GENERATIONS), prompt_tokens=item_tokens)


def max_tokens(payload: dict[str, Any]) -> int:
    """Output tokens asked for per choice, 0 when not said: bounded, so that one request's absurd
    value cannot overflow a cost or skew what others are routed on."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, MAX_TOKENS_ESTIMATED)
    return 0


def _choices(value: Any) -> int:
    """n or best_of as the client gave it: an int in [1, MAX_CHOICES]; anything else counts as 1
    (the upstream rejects it, or takes its default of 1)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 1:
        return min(value, MAX_CHOICES)
    return 1


def _prompt_items(given: Any) -> tuple[int, int]:
    """-> (prompts, tokens at least) of an `input` / `prompt`: a string, a token array, or a list
    of either. Each item is at least one token, a token array exactly its length."""
    if isinstance(given, str):
        return 1, 1
    if not isinstance(given, list) or not given:
        return 0, 0
    if all(isinstance(t, int) for t in given):                 # one token array
        return 1, len(given)
    return len(given), sum(len(i) if isinstance(i, list) else 1 for i in given)


def usage_cost(model: Model, prompt_tokens: int, completion_tokens: int) -> float:
    """USD for a usage at a deployment's prices (what settle() wants for a finished request)."""
    return (prompt_tokens * model.input_cost_per_1k + completion_tokens * model.output_cost_per_1k) / 1000


def to_nano(usd: float, up: bool = False) -> int:
    """USD -> integer nano-USD; reservations round up, real costs to nearest."""
    return min(MAX_NANO, max(0, math.ceil(usd * NANO - 1e-6) if up else round(usd * NANO)))


# --- refusals ----------------------------------------------------------------------------------

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


# --- calendar ----------------------------------------------------------------------------------

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


# --- the in-memory limiter ---------------------------------------------------------------------

class Window:
    """Amounts per whole second over the last WINDOW seconds."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}   # insertion order is bucket order (the clock is clamped)
        self.total = 0

    def prune(self, bucket: int) -> None:
        cutoff = bucket - WINDOW
        buckets = self.buckets
        while buckets:
            first = next(iter(buckets))
            if first > cutoff:
                break
            self.total -= buckets.pop(first)

    def wait(self, need: int, limit: int, now: float) -> float:
        """0 if `need` fits now (after prune), else seconds until enough has left the window."""
        need = min(need, max(limit, 1))      # a limit of 0 refuses everything
        if self.total + need <= limit:
            return 0.0
        left = self.total
        for b, amount in self.buckets.items():
            left -= amount
            if left + need <= limit:
                return b + WINDOW - now
        return WINDOW

    def add(self, bucket: int, amount: int) -> None:
        self.buckets[bucket] = self.buckets.get(bucket, 0) + amount
        self.total += amount

    def correct(self, bucket: int, reserved: int, actual: int, now_bucket: int) -> None:
        delta = actual - reserved
        if bucket > now_bucket - WINDOW and bucket in self.buckets:
            old = self.buckets[bucket]
            new = max(0, old + delta)
            self.buckets[bucket] = new
            self.total += new - old
        elif delta > 0:          # out of the window already: the excess counts now
            self.prune(now_bucket)
            self.add(now_bucket, delta)


class KeyState:
    __slots__ = ("rpm", "tpm", "period", "spent", "last")

    def __init__(self) -> None:
        self.rpm = Window()
        self.tpm = Window()
        self.period: str | None = None   # the budget period `spent` belongs to
        self.spent = 0                   # nano-USD spent or reserved in `period`
        self.last = 0                    # latest bucket seen: a clock stepping back cannot reorder

    def bucket(self, now: float) -> int:
        b = int(now)
        if b < self.last:
            return self.last
        self.last = b
        return b


class LocalLimiter:
    """Counters of one host. Not thread-safe; under trio, admit() is atomic (it never awaits)."""

    def __init__(self, timezone: str = "UTC") -> None:
        self.calendar = Calendar(timezone)
        self.keys: dict[str, KeyState] = {}
        self.admitted = 0
        self.settled = 0
        self.refused = {RPM: 0, TPM: 0, BUDGET: 0}
        # period key -> key -> nano-USD recorded in the usage store before this limiter counted
        self.seeded: dict[str, dict[str, int]] = {}

    def set_timezone(self, timezone: str) -> None:
        if timezone != self.calendar.timezone:
            self.calendar = Calendar(timezone)

    def admit(self, principal: Principal, est: Estimate, now: float) -> Reservation | None:
        """Reserve `est` on every limit of the key, or raise RateLimited for the one that binds
        longest. None: the key has no limits and nothing was reserved."""
        rpm, tpm, budget = principal.rpm, principal.tpm, principal.budget_usd
        if rpm is None and tpm is None and budget is None:
            return None
        st = self.keys.get(principal.key_name)
        if st is None:
            st = self.keys[principal.key_name] = KeyState()
        bucket = st.bucket(now)
        worst: RateLimited | None = None
        if rpm is not None:
            st.rpm.prune(bucket)
            wait = st.rpm.wait(1, rpm, now)
            if wait:
                worst = refusal(RPM, wait, rpm, st.rpm.total, 1)
        if tpm is not None:
            st.tpm.prune(bucket)
            wait = st.tpm.wait(est.tokens, tpm, now)
            if wait and (worst is None or wait > worst.retry_after):
                worst = refusal(TPM, wait, tpm, st.tpm.total, est.tokens)
        period = None
        cost = 0
        if budget is not None:
            period = self.calendar.period(principal.budget_period, now)
            if st.period != period.key:
                self._enter(st, principal.key_name, period.key)
            cost, cap = to_nano(est.cost_usd, up=True), to_nano(budget)
            if st.spent + cost > cap:
                wait = period.end - now
                if worst is None or wait > worst.retry_after:
                    worst = refusal(BUDGET, wait, cap, st.spent, cost, principal.budget_period)
        if worst is not None:
            self.refused[worst.code] += 1
            raise worst
        if rpm is not None:
            st.rpm.add(bucket, 1)
        if tpm is not None:
            st.tpm.add(bucket, est.tokens)
        if period is not None:
            st.spent += cost
        self.admitted += 1
        return Reservation(principal.key_name, bucket, est.tokens if tpm is not None else None,
                           cost if period is not None else None,
                           period.key if period else None, period.end if period else 0.0)

    def settle(self, res: Reservation | None, tokens: int | None, cost_usd: float | None, now: float) -> None:
        """Correct a reservation to the real usage (total tokens, USD). None for either: unknown,
        keep what was reserved. Call once per admitted request, whatever its outcome."""
        if res is None:
            return
        st = self.keys.get(res.key)
        if st is None:
            return
        self.settled += 1
        if res.tokens is not None and tokens is not None:
            st.tpm.correct(res.bucket, res.tokens, tokens, st.bucket(now))
        if res.nano_usd is not None and cost_usd is not None and st.period == res.period:
            st.spent = max(0, st.spent + to_nano(cost_usd) - res.nano_usd)

    def count_admitted_elsewhere(self, key: str, request: bool, tokens: int | None, now: float) -> int:
        """Count in this host's rpm/tpm windows a request another limiter (Redis) admitted, so that
        a fallback to these counters begins with the minute as used; `admitted` stays as it is.
        -> the bucket it was counted in, for `correct_tokens`."""
        st = self.keys.get(key)
        if st is None:
            st = self.keys[key] = KeyState()
        bucket = st.bucket(now)
        if request:
            st.rpm.prune(bucket)     # as admit() does: at most a minute of buckets
            st.rpm.add(bucket, 1)
        if tokens is not None:
            st.tpm.prune(bucket)
            st.tpm.add(bucket, tokens)
        return bucket

    def correct_tokens(self, key: str, bucket: int, reserved: int, actual: int, now: float) -> None:
        """A settle's token correction for what `count_admitted_elsewhere` counted."""
        st = self.keys.get(key)
        if st is not None:
            st.tpm.correct(bucket, reserved, actual, st.bucket(now))

    def seed_spend(self, key: str, period: str, nano_usd: int) -> None:
        """Raise a key's local budget count to what another store (Redis) last reported."""
        st = self.keys.get(key)
        if st is None:
            st = self.keys[key] = KeyState()
        if st.period is not None and st.period > period:   # ISO keys: an older report is stale
            return
        if st.period != period:
            self._enter(st, key, period)
        st.spent = max(st.spent, nano_usd)

    def seed_period(self, period: str, spend: dict[str, int]) -> None:
        """What each key spent in `period` by the usage store (nano-USD), before this limiter
        counted: a key's count in that period is at least that from now on. The store's total
        includes what this limiter counted since, so the count is raised to it, not added to."""
        # one table per kind of period (day keys are the longer): an older one of its kind is done
        self.seeded = {p: t for p, t in self.seeded.items() if len(p) != len(period)}
        self.seeded[period] = spend
        for key, nano in spend.items():
            st = self.keys.get(key)
            if st is not None and st.period == period:
                st.spent = max(st.spent, nano)

    def _enter(self, st: KeyState, key: str, period: str) -> None:
        st.period, st.spent = period, self.seeded.get(period, {}).get(key, 0)

    def usage(self, key: str, now: float) -> dict[str, object]:
        """What a key has used in its windows and budget period (for tests and the admin API)."""
        st = self.keys.get(key)
        if st is None:
            return {"rpm": 0, "tpm": 0, "period": None, "spent_usd": 0.0}
        st.rpm.prune(st.bucket(now))
        st.tpm.prune(st.bucket(now))
        return {"rpm": st.rpm.total, "tpm": st.tpm.total, "period": st.period, "spent_usd": st.spent / NANO}

    def statistics(self) -> dict[str, object]:
        return {"keys": len(self.keys), "admitted": self.admitted, "settled": self.settled,
                "refused": dict(self.refused)}
