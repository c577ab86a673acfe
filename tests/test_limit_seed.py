"""Budget counters seeded from the usage store: the query on both engines, and what a limiter
does with its answer."""

from __future__ import annotations

import pytest

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
