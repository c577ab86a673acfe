"""Stage 4, limit, on one host: per-key requests per minute, tokens per minute and a calendar
budget, counted in memory.

Admission reserves an estimate (estimate.py) and `settle()` corrects it to the real usage when the
request ends, so a reservation counts from the moment it is made: concurrent requests cannot
overrun a budget (as long as the estimate is an upper bound of the real cost).

Windows. rpm and tpm count what was admitted in a sliding 60 s window of 1 s buckets: a request
admitted at unix time t counts until floor(t) + 60, i.e. for 59 to 60 s. This is a true "per
minute" limit (never more than the limit in any window), unlike GCRA / token buckets with a burst
of the per-minute amount, which allow up to twice the limit within one minute. It also lets
`settle()` correct a tpm reservation in the bucket it was made in. The same layout is used by the
Redis scripts (scripts.py), so a key behaves the same with or without Redis. Memory: at most 60
buckets per key and window.

A request larger than the whole tpm allowance is admitted when the window is otherwise empty (it
runs alone): estimates lean high (max_tokens), and refusing it forever would help nobody. Budgets
have no such exception: a budget is a hard cap.

Budgets are USD spent in the current calendar day or month in `[limits] timezone` (periods.py),
counted in integer nano-USD (exact sums; atomic INCRBY in Redis). A refusal's Retry-After is the
start of the next period. A period that began before this process starts from what the usage
store recorded in it (`seed_period`, seed.py).

Pure: no I/O; time comes in as unix seconds.
"""

from __future__ import annotations

from hxgwd.errors import RateLimited
from hxgwd.limits.estimate import Estimate
from hxgwd.limits.periods import Calendar
from hxgwd.limits.refusal import BUDGET, RPM, TPM, refusal
from hxgwd.limits.reservation import NANO, Reservation, to_nano
from hxgwd.runtime import Principal

WINDOW = 60                                       # seconds; rpm and tpm windows, in 1 s buckets


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
        worst_wait = 0.0                 # worst's Retry-After
        if rpm is not None:
            st.rpm.prune(bucket)
            wait = st.rpm.wait(1, rpm, now)
            if wait:
                worst, worst_wait = refusal(RPM, wait, rpm, st.rpm.total, 1), wait
        if tpm is not None:
            st.tpm.prune(bucket)
            wait = st.tpm.wait(est.tokens, tpm, now)
            if wait and (worst is None or wait > worst_wait):
                worst, worst_wait = refusal(TPM, wait, tpm, st.tpm.total, est.tokens), wait
        period = None
        cost = 0
        if budget is not None:
            period = self.calendar.period(principal.budget_period, now)
            if st.period != period.key:
                self._enter(st, principal.key_name, period.key)
            cost, cap = to_nano(est.cost_usd, up=True), to_nano(budget)
            if st.spent + cost > cap:
                wait = period.end - now
                if worst is None or wait > worst_wait:
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
