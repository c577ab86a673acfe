"""Budget counters seeded from the usage store: the query on both engines, and what a limiter
does with its answer."""

from __future__ import annotations

import time

import pytest

from hxgwd.errors import RateLimited
from hxgwd.limits.estimate import Estimate
from tests.test_limit_redis import key, limiter, spent_in_redis
from tests.test_store_support import make_record, new_pg_url, store, store_url  # noqa: F401

T0 = 1_800_000_000.0        # 2027-01-15T08:00:00Z


async def test_spend_by_key_sums_each_keys_cost_since_a_time(store):
    await store.insert_usage([
        make_record(1, key="a", ts=T0 - 1, cost_usd=5.0),         # before: not counted
        make_record(2, key="a", ts=T0, cost_usd=0.25),
        make_record(3, key="a", ts=T0 + 3600, cost_usd=0.125, status=500),   # an error that cost
        make_record(4, key="b", ts=T0 + 10, cost_usd=None),       # unpriced
        make_record(5, key="c", ts=T0 + 10, cost_usd=0.5),
        make_record(6, key=None, ts=T0 + 10, cost_usd=9.0),       # unauthenticated: nobody's
    ])
    spend = await store.spend_by_key(T0)
    assert spend == {"a": pytest.approx(0.375), "b": 0.0, "c": pytest.approx(0.5)}
    assert await store.spend_by_key(T0 + 7200) == {}


async def test_redis_counters_are_raised_to_the_store_and_a_flush_is_seen(redis_server):
    async with limiter(redis_server.url) as (lim, _log):
        p, q = key(budget_usd=1.0, budget_period="day"), key(budget_usd=1.0, budget_period="day")
        day, month = (lim.local.calendar.period(kind, time.time()) for kind in ("day", "month"))
        await lim.client.delete([lim._marker(day), lim._marker(month)])
        assert await lim.unseeded([day, month]) == [day, month]
        res = await lim.admit(p, Estimate(1, 0.5))       # counted in Redis before the seeding
        await lim.seed(day, {p.key_name: 300_000_000, q.key_name: 900_000_000})
        assert await lim.unseeded([day, month]) == [month]
        assert await spent_in_redis(lim, res) == pytest.approx(0.5)      # raised, never lowered
        with pytest.raises(RateLimited):
            await lim.admit(q, Estimate(1, 0.2))
        await lim.client.flushall()
        assert await lim.unseeded([day, month]) == [day, month]


async def test_a_counter_redis_lost_restarts_from_what_this_host_last_saw(redis_server):
    # between the loss and the next check of the markers, the keys this host served keep their spend
    async with limiter(redis_server.url) as (lim, _log):
        p = key(budget_usd=1.0, budget_period="day")
        await lim.settle(await lim.admit(p, Estimate(1, 0.8)), 1, 0.7)
        await lim.admit(p, Estimate(1, 0.05))             # Redis says 0.75 spent
        await lim.client.flushall()
        with pytest.raises(RateLimited) as info:
            await lim.admit(p, Estimate(1, 0.3))
        assert "$0.7500 is spent or reserved" in info.value.message
        res = await lim.admit(p, Estimate(1, 0.2))
        assert await spent_in_redis(lim, res) == pytest.approx(0.95)
        fresh = key(budget_usd=1.0, budget_period="day")  # never seen: nothing to restart from
        assert await spent_in_redis(lim, await lim.admit(fresh, Estimate(1, 0.9))) == pytest.approx(0.9)
