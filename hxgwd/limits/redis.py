"""Limits shared by every host: `RedisLimiter` keeps the counters of `LocalLimiter` (local.py) in
Redis. Each admit and each settle is ONE EVALSHA of a Lua script that reads the server clock
(TIME), so hosts with skewed clocks agree, and checks every limit of the key before reserving any
(all or nothing). Keys carry the hash tag `{name}` (one Cluster slot per client key) and TTLs:
windows expire 61 s after their last use, budget counters a day after their period ends.

    hxgwd:{name}:rpm           hash: unix second -> requests admitted in it
    hxgwd:{name}:tpm           hash: unix second -> tokens reserved / settled in it
    hxgwd:{name}:usd:2026-11   integer nano-USD spent or reserved in the period
    hxgwd:{budgets}:seeded:2026-11   set once the period's counters were seeded from the usage
                               store (seed.py); gone: Redis lost them, seed again

The client computes the budget period from its clock and the timezone (Lua has no zoneinfo) and
passes the previous, current and next period; the script picks by the server clock, so hosts also
agree at midnight.

Redis errors and timeouts (`[redis] timeout` per call) follow `on_redis_error`:
- "local": admit from this host's in-memory counters (limits then hold per host). Their rpm and
  tpm windows count what Redis admitted through this host as well (each admission and its
  settled tokens, mirrored; they decide nothing while Redis answers), so a key that had used its
  minute does not get a fresh one when the fallback begins. Budgets start from the spend Redis
  last reported, and what is spent meanwhile is added to Redis with the key's next admission there.
- "deny": refuse with 503 `limits_unavailable`, Retry-After 1. A 503 rather than a 429: the client
  did nothing wrong, the gateway cannot check; SDKs retry both.
An outage is logged once when it starts and once when it ends (with counts). While Redis is
down, one request at a time probes it, at most once a second; the rest do not wait for it.

A Redis that comes back without its data (restarted without persistence, flushed): a key's budget
counter starts again from the spend this host last saw in the period (or the store's, once seeded),
not from 0; and seed.py raises every key's counter to the usage store's sum within a second.

A timeout is ambiguous: the script may still have run. A lost admission then stays reserved (it
leaves the windows within a minute; on a budget it overcounts, never undercounts), and corrections
that cannot be known to have been applied are only carried over when they add spend.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

import attrs
import trio

from hxgwd.config import model as m
from hxgwd.errors import Unavailable
from hxgwd.limits.estimate import Estimate
from hxgwd.limits.local import LocalLimiter
from hxgwd.limits.periods import Period
from hxgwd.limits.refusal import BUDGET, RPM, TPM, refusal
from hxgwd.limits.reservation import Reservation, to_nano
from hxgwd.limits.scripts import ADMIT, SEED, SETTLE
from hxgwd.runtime import Principal

if TYPE_CHECKING:                 # coredis is optional: imported when [redis] url is set
    from coredis import Redis
    from coredis.commands import Script
    from coredis.typing import ResponseType, ValueT

    from hxgwd.logs import Logger

PREFIX = "hxgwd:"
PROBE_INTERVAL = 1.0          # seconds between attempts to reach Redis while it is down
BUDGET_GRACE = 86400          # budget counters outlive their period by this (late settles)
SAFE_NAME = re.compile(r"^[A-Za-z0-9._:@+~-]{1,100}$")


class LimitsUnavailable(Unavailable):
    code = "limits_unavailable"
    fault = "gateway"


CODES = {1: RPM, 2: TPM, 3: BUDGET}


@attrs.frozen
class RedisReservation(Reservation):
    """What Redis admitted; `bucket` is Redis's second, `local_bucket` the second (this host's
    clock) its mirror counts in, in the local windows the fallback uses."""

    local_bucket: int = 0


def _tag(name: str) -> str:
    return name if SAFE_NAME.match(name) else "h-" + hashlib.sha256(name.encode()).hexdigest()[:32]


class RedisLimiter:
    """Shared limits in Redis, with this host's `LocalLimiter` as the "local" fallback."""

    def __init__(self, client: Redis[bytes], config: m.Config, log: Logger, *,
                 clock: Callable[[], float] = time.time, prefix: str = PREFIX) -> None:
        from coredis.exceptions import RedisError

        self.client = client
        self.log = log
        self.clock = clock
        self.prefix = prefix
        self.probe_interval = PROBE_INTERVAL
        self.local = LocalLimiter(config.limits.timezone)
        self.configure(config)
        self._admit = client.register_script(ADMIT)
        self._settle = client.register_script(SETTLE)
        self._seed = client.register_script(SEED)
        self._errors = (RedisError, OSError, trio.TooSlowError)
        self._keys: dict[str, tuple[str, str, str]] = {}
        self._pending: dict[str, tuple[str, int]] = {}   # key -> (period, nano-USD not yet in Redis)
        self._seen: dict[str, tuple[str, int]] = {}      # key -> (period, spend Redis last reported)
        self._down_since: float | None = None            # trio clock
        self._retry_at = 0.0
        self._probing = False
        self._outage_counts = [0, 0]                     # fallback admits, denials in this outage
        self.stats = {"calls": 0, "errors": 0, "outages": 0, "fallback_admits": 0, "denied": 0,
                      "settles_deferred": 0, "admitted": 0}
        self.refused = {RPM: 0, TPM: 0, BUDGET: 0}

    def configure(self, config: m.Config) -> None:
        """A reload: timezone, policy and timeout apply at once; a new url needs a restart."""
        self.policy = config.redis.on_redis_error
        self.timeout = config.redis.timeout
        self.local.set_timezone(config.limits.timezone)

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def statistics(self) -> dict[str, Any]:
        return {"backend": "redis", "policy": self.policy, "down": self.down, **self.stats,
                "refused": dict(self.refused), "local": self.local.statistics()}

    # --- admission -------------------------------------------------------------------------------

    async def admit(self, principal: Principal, est: Estimate) -> Reservation | None:
        rpm, tpm, budget = principal.rpm, principal.tpm, principal.budget_usd
        if rpm is None and tpm is None and budget is None:
            return None
        now = self.clock()
        if self._skip():
            return self._fallback(principal, est, now)
        name = principal.key_name
        keys = self._names(name)
        cost = to_nano(est.cost_usd, up=True)
        carry = 0
        if budget is not None:
            prev, cur, nxt = self.local.calendar.around(principal.budget_period, now)
            periods = (prev, cur, nxt)
            pending = self._pending.pop(name, None)
            if pending is not None and pending[0] == cur.key:
                carry = pending[1]
            # should Redis have lost the counter since (restarted empty, flushed), it starts again
            # from the spend this host knows, not from 0, until the store's is seeded (seed.py)
            seen = self._seen.get(name)
            floor = max(self.local.seeded.get(cur.key, {}).get(name, 0),
                        seen[1] if seen is not None and seen[0] == cur.key else 0)
            bkeys = [keys[2] + p.key for p in periods]
            budget_args = [to_nano(budget), cost, *(p.end for p in periods),
                           *(int(p.end) + BUDGET_GRACE for p in periods), carry, floor]
        else:
            bkeys = [keys[2] + "-"] * 3
            budget_args = [-1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        args = [-1 if rpm is None else rpm, -1 if tpm is None else tpm, est.tokens, *budget_args]
        self._probing = self._down_since is not None
        try:
            # ADMIT answers a Lua table of integers: a list of ints
            reply = cast("list[int]", await self._call(self._admit, [keys[0], keys[1], *bkeys], args))
        except self._errors as exc:
            if carry > 0:    # it may or may not have landed: keep only what can overcount
                self._carry(name, cur.key, carry)
            self._failed(exc)
            return self._fallback(principal, est, now)
        finally:
            self._probing = False
        if self._down_since is not None:
            self._recovered()
        if reply[0] == 0:
            _, which, wait_ms, used, asked, pi = reply
            code = CODES[int(which)]
            self.refused[code] += 1
            lim = {RPM: rpm, TPM: tpm, BUDGET: to_nano(budget or 0)}[code]
            assert lim is not None               # the script refuses only on a limit the key has
            raise refusal(code, int(wait_ms) / 1000, lim, int(used), int(asked), principal.budget_period)
        _, bucket, pi, spent = reply
        self.stats["admitted"] += 1
        period = None
        if budget is not None:
            period = periods[int(pi) - 1]
            self._seen[name] = (period.key, int(spent))
        # counted here too: should Redis go away, the fallback begins with the minute as used,
        # not with a fresh one on every host
        local_bucket = self.local.count_admitted_elsewhere(name, rpm is not None,
                                                           est.tokens if tpm is not None else None, self.clock())
        return RedisReservation(name, int(bucket), est.tokens if tpm is not None else None,
                                cost if budget is not None else None, period.key if period else None,
                                period.end if period else 0.0, "redis", local_bucket)

    def _names(self, name: str) -> tuple[str, str, str]:
        """The rpm and tpm hashes of a key, and its budget counters' name without the period."""
        keys = self._keys.get(name)
        if keys is None:
            tag = f"{self.prefix}{{{_tag(name)}}}:"
            keys = self._keys[name] = (f"{tag}rpm", f"{tag}tpm", f"{tag}usd:")
        return keys

    def _fallback(self, principal: Principal, est: Estimate, now: float) -> Reservation | None:
        if self.policy == "deny":
            self.stats["denied"] += 1
            self._outage_counts[1] += 1
            raise LimitsUnavailable("Usage limits cannot be checked right now. Please try again shortly.",
                                    retry_after=1)
        reservation = self.local.admit(principal, est, now)   # RateLimited: not an admission
        self.stats["fallback_admits"] += 1
        self._outage_counts[0] += 1
        return reservation

    # --- settlement ------------------------------------------------------------------------------

    async def settle(self, res: Reservation | None, tokens: int | None, cost_usd: float | None) -> None:
        """Correct a reservation; never raises, and bounded by the timeout even when cancelled."""
        if res is None:
            return
        now = self.clock()
        actual = None if res.nano_usd is None else (res.nano_usd if cost_usd is None else to_nano(cost_usd))
        if res.where == "local":
            self.local.settle(res, tokens, cost_usd, now)
            if actual and res.period:      # spent while Redis was away: add it there later
                self._carry(res.key, res.period, actual)
            return
        delta = None if actual is None or res.nano_usd is None else actual - res.nano_usd
        tok = res.tokens is not None and tokens is not None and tokens != res.tokens
        reserved_tokens, settled_tokens = res.tokens or 0, tokens or 0     # what they are when tok
        if tok and isinstance(res, RedisReservation):
            self.local.correct_tokens(res.key, res.local_bucket, reserved_tokens, settled_tokens, now)
        if not tok and not delta:
            return
        if self._skip():
            if delta:                      # not sent at all: carry it exactly
                self._carry(res.key, res.period, delta)
            self.stats["settles_deferred"] += 1
            return
        tag = f"{self.prefix}{{{_tag(res.key)}}}:"
        args: list[ValueT] = [res.bucket if tok else "", (settled_tokens - reserved_tokens) if tok else 0,
                              settled_tokens if tok else 0,
                              "" if delta is None else delta, actual or 0, res.period_end,
                              int(res.period_end) + BUDGET_GRACE]
        self._probing = self._down_since is not None
        try:
            await self._call(self._settle, [f"{tag}tpm", f"{tag}usd:{res.period}"], args)
        except self._errors as exc:
            if delta and delta > 0:
                self._carry(res.key, res.period, delta)
            self.stats["settles_deferred"] += 1
            self._failed(exc)
            return
        finally:
            self._probing = False
        if self._down_since is not None:
            self._recovered()

    async def _call(self, script: Script[bytes], keys: list[str], args: Sequence[ValueT]) -> ResponseType:
        """One EVALSHA, shielded and bounded by the timeout: a client hanging up cannot leave it
        half done (an admission completes and is returned, so the caller settles it)."""
        self.stats["calls"] += 1
        with trio.move_on_after(self.timeout, shield=True):
            return await script(keys=keys, args=args)
        raise trio.TooSlowError

    def _carry(self, key: str, period: str | None, nano: int) -> None:
        if period is None:
            return
        old = self._pending.get(key)
        self._pending[key] = (period, nano + (old[1] if old and old[0] == period else 0))

    # --- seeding from the usage store (seed.py) --------------------------------------------------

    async def unseeded(self, periods: list[Period]) -> list[Period]:
        """Periods whose counters in Redis were not seeded from the store: a period that began
        since, or Redis lost its data (restarted empty, flushed): their markers are gone. While
        Redis does not answer: those the local fallback has not been seeded for."""
        markers = [self._marker(p) for p in periods]
        try:
            with trio.fail_after(self.timeout):
                found = await self.client.mget(markers)
        except self._errors:
            return [p for p in periods if p.key not in self.local.seeded]
        return [p for p, marker in zip(periods, found) if marker is None]

    async def seed(self, period: Period, spend: dict[str, int]) -> None:
        """Raise the period's counters, here and in Redis, to the store's spend, then set the
        marker; a Redis error leaves the marker unset, so the next check tries again."""
        self.local.seed_period(period.key, spend)
        expire = int(period.end) + BUDGET_GRACE
        try:
            for name, nano in spend.items():
                if not nano:
                    continue
                with trio.fail_after(self.timeout):
                    await self._seed(keys=[self._names(name)[2] + period.key], args=[nano, expire])
            with trio.fail_after(self.timeout):
                await self.client.set(self._marker(period), "1", exat=expire)
        except self._errors as exc:
            self.log.warning("limits: seeding redis budgets failed; trying again", period=period.key,
                             error=type(exc).__name__)

    def _marker(self, period: Period) -> str:
        # one hash tag for all markers: MGET of the day's and the month's is one slot in a Cluster
        return f"{self.prefix}{{budgets}}:seeded:{period.key}"

    # --- outage bookkeeping ----------------------------------------------------------------------

    def _skip(self) -> bool:
        """Redis is down and not due for a probe (or another task is probing it)."""
        return self._down_since is not None and (self._probing or trio.current_time() < self._retry_at)

    def _failed(self, exc: BaseException) -> None:
        self.stats["errors"] += 1
        now = trio.current_time()
        self._retry_at = now + self.probe_interval
        if self._down_since is not None:
            return
        self._down_since = now
        self._outage_counts = [0, 0]
        self.stats["outages"] += 1
        self.log.warning("limits: redis unavailable", event="redis_lost", policy=self.policy, error=type(exc).__name__,
                         detail=str(exc)[:200])
        for key, (period, spent) in self._seen.items():
            pending = self._pending.get(key)
            extra = pending[1] if pending and pending[0] == period else 0
            self.local.seed_spend(key, period, spent + max(0, extra))

    def _recovered(self) -> None:
        down = trio.current_time() - (self._down_since or 0.0)
        self._down_since = None
        fallback, denied = self._outage_counts
        self.log.info("limits: redis recovered", event="redis_back", down_seconds=round(down, 3), policy=self.policy,
                      fallback_admits=fallback, denied=denied)
