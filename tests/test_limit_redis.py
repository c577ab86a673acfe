"""Limits under trio: concurrency against a budget, two "hosts" sharing one real Redis, and Redis
outages under both `on_redis_error` policies. Redis is started by the tests (`redis_server`)."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
from typing import AsyncIterator

import pytest
import trio

from hxgwd.config import model as m
from hxgwd.errors import GatewayError, RateLimited
from hxgwd.limits.limiter import HostLimiter, open_limiter
from hxgwd.limits.redis import LimitsUnavailable, RedisLimiter
from hxgwd.logs import Logger
from hxgwd.limits.estimate import Estimate
from hxgwd.limits.reservation import NANO
from hxgwd.runtime import Principal
from tests.conftest import CapturedLog

_names = itertools.count()


def key(**limits) -> Principal:
    """A fresh key name per use: tests share one Redis server."""
    return Principal(key_name=f"t{os.getpid()}-{next(_names)}", allowed=None, **limits)


def config(url: str | None, policy: str = "local", timeout: float = 0.25) -> m.Config:
    return m.Config(redis=m.Redis(url=url, on_redis_error=policy, timeout=timeout))


@contextlib.asynccontextmanager
async def limiter(url: str | None, policy: str = "local", timeout: float = 0.25
                  ) -> AsyncIterator[tuple[HostLimiter | RedisLimiter, CapturedLog]]:
    log = CapturedLog()
    async with open_limiter(config(url, policy, timeout), Logger(out=log)) as lim:
        if isinstance(lim, RedisLimiter):
            lim.probe_interval = 0.1
        yield lim, log


async def spent_in_redis(lim: RedisLimiter, res) -> float:
    value = await lim.client.get(f"hxgwd:{{{res.key}}}:usd:{res.period}")
    return int(value or 0) / NANO


async def until(predicate, timeout: float = 5.0, step: float = 0.05):
    """Poll an async predicate, bounded."""
    with trio.fail_after(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(step)


@pytest.fixture(params=["local", "redis"])
def url(request) -> str | None:
    if request.param == "local":
        return None
    return request.getfixturevalue("redis_server").url


# --- concurrency --------------------------------------------------------------------------------

async def test_fifty_concurrent_requests_never_overrun_a_budget(url):
    p = key(budget_usd=1.0, budget_period="day", tpm=10**6)
    rng = random.Random(3)
    settled: list[float] = []
    admitted = refused = 0
    in_flight = [0.0]                 # reserved and not yet settled, as the callers see it
    last = []

    async with limiter(url) as (lim, _log):
        async def one_client(seed: int) -> None:
            nonlocal admitted, refused
            r = random.Random(seed)
            for _ in range(10):
                try:
                    res = await lim.admit(p, Estimate(500, 0.05))
                except RateLimited as err:
                    assert err.code == "budget_exceeded"
                    refused += 1
                    return
                admitted += 1
                last.append(res)
                in_flight[0] += res.cost_usd
                assert sum(settled) + in_flight[0] <= 1.0 + 1e-9
                await trio.sleep(r.random() * 0.01)
                cost = r.uniform(0.01, 0.05)          # the estimate is an upper bound
                in_flight[0] -= res.cost_usd
                await lim.settle(res, 400, cost)
                settled.append(cost)

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one_client, rng.randrange(10**9))

        assert admitted >= 20 and refused > 0
        assert sum(settled) <= 1.0 + 1e-9
        if isinstance(lim, RedisLimiter):
            assert lim.stats["admitted"] == admitted and not lim.down
            assert lim.local.statistics()["admitted"] == 0
            assert await spent_in_redis(lim, last[-1]) == pytest.approx(sum(settled), abs=1e-6)


async def test_a_key_without_limits_costs_no_redis_call(redis_server):
    async with limiter(redis_server.url) as (lim, _log):
        assert await lim.admit(key(), Estimate(10**6, 10**3)) is None
        await lim.settle(None, 5, 1.0)
        assert lim.stats["calls"] == 0


# --- two hosts on one Redis ---------------------------------------------------------------------

async def test_two_limiters_share_rpm_tpm_and_budget(redis_server):
    async with limiter(redis_server.url) as (a, _), limiter(redis_server.url) as (b, _):
        assert a.client is not b.client
        p = key(rpm=4)
        for lim in (a, b, a, b):
            await lim.admit(p, Estimate(1, 0.0))
        for lim in (a, b):
            with pytest.raises(RateLimited) as info:
                await lim.admit(p, Estimate(1, 0.0))
            assert info.value.code == "rate_limit_rpm" and 0 < info.value.retry_after <= 60
            assert "limit 4, used 4" in info.value.message

        p = key(tpm=1000)
        first = await a.admit(p, Estimate(600, 0.0))
        with pytest.raises(RateLimited) as info:
            await b.admit(p, Estimate(600, 0.0))
        assert info.value.code == "rate_limit_tpm" and "used 600, requested 600" in info.value.message
        await a.settle(first, 100, None)
        await b.admit(p, Estimate(600, 0.0))
        with pytest.raises(RateLimited):
            await a.admit(p, Estimate(301, 0.0))

        p = key(budget_usd=1.0)                  # month
        res = await a.admit(p, Estimate(1, 0.6))
        with pytest.raises(RateLimited) as info:
            await b.admit(p, Estimate(1, 0.6))
        assert info.value.code == "budget_exceeded" and info.value.retry_after > 60
        assert "monthly budget is $1.00, $0.6000" in info.value.message
        await a.settle(res, 1, 0.25)
        res2 = await b.admit(p, Estimate(1, 0.6))
        assert res2.period == res.period and res2.where == "redis"
        assert await spent_in_redis(b, res2) == pytest.approx(0.85)


async def test_redis_keys_carry_ttls_and_hash_tags(redis_server):
    async with limiter(redis_server.url) as (lim, _):
        p = key(rpm=10, tpm=100, budget_usd=5.0, budget_period="day")
        res = await lim.admit(p, Estimate(10, 0.1))
        tag = f"hxgwd:{{{p.key_name}}}"
        assert 0 < await lim.client.ttl(f"{tag}:rpm") <= 61
        assert 0 < await lim.client.ttl(f"{tag}:tpm") <= 61
        ttl = await lim.client.ttl(f"{tag}:usd:{res.period}")
        assert 86400 < ttl <= 2 * 86400 + 3600
        odd = Principal(key_name="team {a}", allowed=None, rpm=1)
        await lim.admit(odd, Estimate(1, 0.0))
        assert not await lim.client.exists(["hxgwd:{team {a}}:rpm"])


async def test_settle_survives_the_caller_being_cancelled(redis_server):
    async with limiter(redis_server.url) as (lim, _):
        p = key(budget_usd=1.0, budget_period="day")
        res = await lim.admit(p, Estimate(1, 0.5))
        with trio.CancelScope() as scope:
            scope.cancel()                      # e.g. the client hung up
            await lim.settle(res, 1, 0.125)
        assert await spent_in_redis(lim, res) == pytest.approx(0.125)


# --- outages ------------------------------------------------------------------------------------

async def test_redis_down_with_policy_local_falls_back_and_recovers(redis_server):
    async with limiter(redis_server.url, "local") as (lim, log):
        p = key(rpm=100, budget_usd=1.0, budget_period="day")
        await lim.settle(await lim.admit(p, Estimate(1, 0.8)), 1, 0.8)
        redis_server.stop()
        try:
            with trio.fail_after(2):
                res = await lim.admit(p, Estimate(1, 0.1))
            assert res.where == "local" and lim.down
            with pytest.raises(RateLimited) as info:     # the local count starts from Redis's 0.8
                await lim.admit(p, Estimate(1, 0.2))
            assert info.value.code == "budget_exceeded"
            await lim.settle(res, 1, 0.05)               # spent while away: carried to Redis later
            for _ in range(20):
                await lim.admit(key(rpm=1000), Estimate(1, 0.0))
            assert await lim.admit(key(), Estimate(1, 1.0)) is None
            down = [line for line in log.lines() if line["msg"] == "limits: redis unavailable"]
            assert len(down) == 1 and down[0]["level"] == "warning" and down[0]["policy"] == "local"
            assert lim.stats["outages"] == 1 and lim.stats["fallback_admits"] == 21    # the refused one is not
        finally:
            redis_server.restart()

        async def back_in_redis():
            return (await lim.admit(p, Estimate(1, 0.01))).where == "redis"
        await until(back_in_redis)
        assert not lim.down
        up = [line for line in log.lines() if line["msg"] == "limits: redis recovered"]
        assert len(up) == 1 and up[0]["fallback_admits"] >= 21 and up[0]["down_seconds"] > 0
        # Redis lost its data in the restart (no persistence): the counter starts again from the 0.8
        # this host saw spent before, and the outage's spend was carried over
        res = await lim.admit(p, Estimate(1, 0.0))
        assert await spent_in_redis(lim, res) == pytest.approx(0.8 + 0.05 + 0.01)


async def test_redis_down_with_policy_deny_refuses_with_503_and_recovers(redis_server):
    async with limiter(redis_server.url, "deny") as (lim, log):
        p = key(rpm=100)
        await lim.admit(p, Estimate(1, 0.0))
        redis_server.stop()
        try:
            for _ in range(5):
                with trio.fail_after(1), pytest.raises(LimitsUnavailable) as info:
                    await lim.admit(p, Estimate(1, 0.0))
                err = info.value
                assert (err.status, err.code, err.type, err.fault) == (503, "limits_unavailable",
                                                                      "service_unavailable", "gateway")
                assert err.headers() == [(b"retry-after", b"1")]
            assert await lim.admit(key(), Estimate(1, 0.0)) is None     # no limits: no Redis needed
            assert lim.stats["denied"] == 5 and lim.stats["outages"] == 1
            down = [line for line in log.lines() if line["msg"] == "limits: redis unavailable"]
            assert len(down) == 1 and down[0]["policy"] == "deny"
        finally:
            redis_server.restart()

        async def admitted():
            try:
                return await lim.admit(p, Estimate(1, 0.0))
            except LimitsUnavailable:
                return None
        assert (await until(admitted)).where == "redis"
        assert [line["denied"] for line in log.lines() if line["msg"] == "limits: redis recovered"] == [
            lim.stats["denied"]]


async def test_a_hung_redis_costs_one_timeout_then_probes_once_a_second(redis_server):
    async with limiter(redis_server.url, "local", timeout=0.1) as (lim, log):
        lim.probe_interval = 0.5
        p = key(rpm=1000, tpm=10**6, budget_usd=100.0)
        warm = await lim.admit(p, Estimate(1, 0.01))
        os.kill(redis_server.proc.pid, signal.SIGSTOP)       # accepts nothing, answers nothing
        try:
            start = trio.current_time()
            first = await lim.admit(p, Estimate(1, 0.01))
            assert first.where == "local" and 0.09 < trio.current_time() - start < 0.5
            start = trio.current_time()
            async with trio.open_nursery() as nursery:       # while down: no waiting on Redis
                for _ in range(20):
                    nursery.start_soon(lim.admit, p, Estimate(1, 0.01))
            await lim.settle(warm, 1, 0.02)                  # deferred, not waited for
            assert trio.current_time() - start < 0.05
            assert lim.stats["calls"] == 2 and lim.stats["settles_deferred"] == 1
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        await trio.sleep(0.5)

        async def back():
            return (await lim.admit(p, Estimate(1, 0.01))).where == "redis"
        await until(back)
        assert [line["msg"] for line in log.lines()] == ["limits: redis unavailable", "limits: redis recovered"]


async def test_redis_down_at_start_does_not_stop_the_daemon(redis_server):
    from tests.servers import free_port

    async with limiter(f"redis://127.0.0.1:{free_port()}/0", "local") as (lim, log):
        res = await lim.admit(key(rpm=1), Estimate(1, 0.0))
        assert res.where == "local" and lim.down


async def test_without_a_url_the_limiter_is_in_memory():
    async with limiter(None) as (lim, _):
        assert isinstance(lim, HostLimiter)
        p = key(rpm=1)
        res = await lim.admit(p, Estimate(1, 0.0))
        assert res.where == "local"
        with pytest.raises(GatewayError) as info:
            await lim.admit(p, Estimate(1, 0.0))
        assert info.value.status == 429
        assert lim.statistics()["backend"] == "local"


async def test_redis_picks_the_budget_period_by_its_own_clock(redis_server):
    import time

    async with limiter(redis_server.url) as (lim, _):
        p = key(budget_usd=1.0, budget_period="day")
        today = lim.local.calendar.period("day", time.time())
        for skew in (-86400, 0, 86400):              # this host's clock a day behind / right / ahead
            lim.clock = lambda skew=skew: time.time() + skew
            res = await lim.admit(p, Estimate(1, 0.25))
            if res.period != today.key:              # the test ran across midnight: retry once
                today = lim.local.calendar.period("day", time.time())
            assert (res.period, res.period_end) == (today.key, today.end)
        with pytest.raises(RateLimited) as info:
            await lim.admit(p, Estimate(1, 0.5))
        assert info.value.retry_after == pytest.approx(today.end - time.time(), abs=5)


async def test_redis_zero_limits_refuse(redis_server):
    async with limiter(redis_server.url) as (lim, _):
        with pytest.raises(RateLimited) as info:
            await lim.admit(key(rpm=0), Estimate(1, 0.0))
        assert info.value.code == "rate_limit_rpm" and info.value.retry_after == 60
        with pytest.raises(RateLimited) as info:
            await lim.admit(key(budget_usd=0.0), Estimate(1, 0.001))
        assert info.value.code == "budget_exceeded"
        assert (await lim.admit(key(budget_usd=0.0), Estimate(1, 0.0))).nano_usd == 0


async def test_the_local_fallback_begins_with_the_minute_redis_admitted(redis_server):
    async with limiter(redis_server.url, "local") as (lim, _log):
        by_requests, by_tokens = key(rpm=3), key(tpm=1000)
        for _ in range(3):
            assert (await lim.admit(by_requests, Estimate(1, 0.0))).where == "redis"
        res = await lim.admit(by_tokens, Estimate(900, 0.0))
        await lim.settle(res, 300, None)                 # 300 used of 1000 in this minute
        assert lim.local.statistics()["admitted"] == 0   # while Redis answers, it decides alone
        redis_server.stop()
        try:
            with trio.fail_after(2), pytest.raises(RateLimited) as info:
                await lim.admit(by_requests, Estimate(1, 0.0))
            assert info.value.code == "rate_limit_rpm" and "limit 3, used 3" in info.value.message and lim.down
            assert (await lim.admit(by_tokens, Estimate(700, 0.0))).where == "local"
            with pytest.raises(RateLimited) as info:
                await lim.admit(by_tokens, Estimate(1, 0.0))
            assert info.value.code == "rate_limit_tpm" and "used 1000" in info.value.message
        finally:
            redis_server.restart()
