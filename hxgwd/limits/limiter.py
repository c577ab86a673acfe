"""The limiter the request path uses: in memory on one host, or shared across hosts in Redis.

    async with open_limiter(config, log, password) as limiter:
        res = await limiter.admit(principal, estimate)       # RateLimited 429 / LimitsUnavailable 503
        ...
        await limiter.settle(res, total_tokens, cost_usd)    # once, whatever the outcome

`HostLimiter` wraps the pure `LocalLimiter` (local.py); `RedisLimiter` (redis.py) keeps the same
counters in Redis.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Protocol

from hxgwd.config import model as m
from hxgwd.limits.estimate import Estimate
from hxgwd.limits.local import LocalLimiter
from hxgwd.limits.periods import Period
from hxgwd.limits.redis import RedisLimiter
from hxgwd.limits.reservation import Reservation
from hxgwd.runtime import Principal

if TYPE_CHECKING:
    from hxgwd.logs import Logger

MAX_CONNECTIONS = 64          # of the Redis client's pool


class Limiter(Protocol):
    local: LocalLimiter              # this host's counters (the fallback's, with Redis)
    clock: Callable[[], float]
    async def admit(self, principal: Principal, est: Estimate) -> Reservation | None: ...
    async def settle(self, res: Reservation | None, tokens: int | None, cost_usd: float | None) -> None: ...
    def configure(self, config: m.Config) -> None: ...
    def statistics(self) -> dict[str, Any]: ...
    async def unseeded(self, periods: list[Period]) -> list[Period]: ...
    async def seed(self, period: Period, spend: dict[str, int]) -> None: ...


class HostLimiter:
    """The in-memory limiter behind the async interface; admit never awaits, so it is atomic."""

    def __init__(self, limits: m.Limits, clock: Callable[[], float] = time.time) -> None:
        self.local = LocalLimiter(limits.timezone)
        self.clock = clock
        self.started = clock()      # periods that began since were counted here whole

    async def admit(self, principal: Principal, est: Estimate) -> Reservation | None:
        return self.local.admit(principal, est, self.clock())

    async def settle(self, res: Reservation | None, tokens: int | None, cost_usd: float | None) -> None:
        self.local.settle(res, tokens, cost_usd, self.clock())

    def configure(self, config: m.Config) -> None:
        self.local.set_timezone(config.limits.timezone)

    def statistics(self) -> dict[str, Any]:
        return {"backend": "local", **self.local.statistics()}

    async def unseeded(self, periods: list[Period]) -> list[Period]:
        """The periods whose spend before this process is still to be seeded (seed.py)."""
        return [p for p in periods if p.start < self.started and p.key not in self.local.seeded]

    async def seed(self, period: Period, spend: dict[str, int]) -> None:
        self.local.seed_period(period.key, spend)


@contextlib.asynccontextmanager
async def open_limiter(config: m.Config, log: Logger, password: str | None = None) -> AsyncIterator[Limiter]:
    """The limiter for `config`: Redis when `[redis] url` is set, else in memory. Open it once at
    daemon scope: the coredis client (and its pool) lives exactly as long as this context."""
    if not config.redis.url:
        yield HostLimiter(config.limits)
        return
    import coredis
    from coredis.retry import NoRetryPolicy

    t = config.redis.timeout
    kwargs: dict[str, Any] = {} if password is None else {"password": password}
    client = coredis.Redis.from_url(config.redis.url, stream_timeout=t, connect_timeout=t, pool_timeout=t,
                                    max_connections=MAX_CONNECTIONS, retry_policy=NoRetryPolicy(), **kwargs)
    raised: BaseException | None = None
    try:
        async with client:
            try:
                yield RedisLimiter(client, config, log)
            except BaseException as exc:
                raised = exc
                raise
    except BaseExceptionGroup as group:
        # coredis's pool runs a task group: an error of the daemon's own would come out wrapped
        if raised is not None and len(group.exceptions) == 1 and group.exceptions[0] is raised:
            raise raised from None
        raise
