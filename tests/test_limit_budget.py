"""Budgets through the running gateway: what one request may cost (n, best_of, items), and the
day's spend surviving a restart of the daemon and a loss of the Redis data."""

from __future__ import annotations

import sqlite3
import time

import pytest
import trio

from hxgwd.store import open_store
from tests.conftest import gateway_config, start_gateway
from tests.fakeupstream import FakeUpstream, Reply
from tests.test_store_support import database, new_pg_url, store_url  # noqa: F401  (fixtures)

DAILY_DOLLAR = 'budget_usd = 1.0\nbudget_period = "day"\nsha256 ='


def priced(up: FakeUpstream) -> str:
    """One chat model at $1 per 1000 completion tokens, prompts free."""
    return f"""
        [[backends]]
        name = "u"
        url = "{up.url}"
        [[models]]
        name = "m"
        backend = "u"
        output_cost_per_1k = 1.0
    """


def answer(choices: int, completion_tokens: int) -> dict:
    """What an upstream answers to `n = choices`: every choice billed, the prompt once."""
    return {"id": "chatcmpl-n", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": i, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}
                        for i in range(choices)],
            "usage": {"prompt_tokens": 5, "completion_tokens": completion_tokens,
                      "total_tokens": 5 + completion_tokens}}


async def test_n_choices_are_reserved_so_concurrent_requests_cannot_overrun_a_daily_budget(nursery, upstream):
    # The report: a $1/day key, requests with n = 10 in flight together, $7.175 recorded. Here each
    # costs $0.41 (10 choices x 41 tokens); a reservation of one choice ($0.041) admits all seven.
    upstream.default = Reply(delay=0.5, body=answer(10, 410))
    gw = await start_gateway(nursery, gateway_config(priced(upstream)).replace("sha256 =", DAILY_DOLLAR))
    body = {"model": "m", "max_tokens": 41, "n": 10, "messages": [{"role": "user", "content": "hi"}]}
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await gw.post("/v1/chat/completions", body)).status_code)

    async with trio.open_nursery() as clients:
        for _ in range(7):
            clients.start_soon(one)
    assert sorted(statuses) == [200, 200] + [429] * 5
    assert (await gw.post("/v1/chat/completions", body)).status_code == 429   # $0.82 spent, $0.41 asked
    await gw.stop()
    costs = [line["cost_usd"] for line in gw.log.requests() if line["status"] == 200]
    assert costs == [pytest.approx(0.41)] * 2
    # settled to what was recorded: the reservations of all ten choices gave back nothing
    assert gw.daemon.services.limiter.local.usage("dev", time.time())["spent_usd"] == pytest.approx(sum(costs))


def ask(max_tokens: int) -> dict:
    return {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}


async def spend_ninety_cents(gw, upstream: FakeUpstream) -> None:
    upstream.default = Reply(body=answer(1, 300))        # $0.30 each, as reserved
    for _ in range(3):
        assert (await gw.post("/v1/chat/completions", ask(300))).status_code == 200


async def test_a_restarted_daemon_remembers_the_days_spend_from_the_store(nursery, tmp_path, upstream, store_url):
    if store_url.startswith("postgresql"):               # the daemon checks a shared schema, never migrates it
        store = open_store(database(store_url))
        await store.migrate()
        await store.aclose()
    cfg = gateway_config(priced(upstream), database=store_url).replace("sha256 =", DAILY_DOLLAR).replace(
        "key_refresh = 0.2", f'key_refresh = 0.2\nspool_dir = "{tmp_path / "spool"}"')
    first = await start_gateway(nursery, cfg)
    await spend_ninety_cents(first, upstream)
    await first.stop()                                    # SIGTERM's path: the records are flushed

    second = await start_gateway(nursery, cfg)
    r = await second.post("/v1/chat/completions", ask(300))   # $0.90 + $0.30 > $1
    assert (r.status_code, r.json()["error"]["code"]) == (429, "budget_exceeded")
    assert "$0.9000 is spent or reserved" in r.json()["error"]["message"]
    upstream.default = Reply(body=answer(1, 50))
    assert (await second.post("/v1/chat/completions", ask(50))).status_code == 200   # $0.95: fits
    seeded = [line for line in second.log.lines() if line["msg"] == "limits: budgets seeded from the usage store"]
    assert {line["period"] for line in seeded} == {time.strftime("%Y-%m-%d", time.gmtime()),
                                                   time.strftime("%Y-%m", time.gmtime())}
    await second.stop()


async def test_the_budget_holds_when_redis_loses_its_data_while_the_gateway_runs(nursery, tmp_path, upstream,
                                                                                  redis_server):
    import coredis

    db = tmp_path / "hxgwd.db"
    redis = coredis.Redis.from_url(redis_server.url)
    async with redis:
        await redis.flushall()                            # the session's Redis: no counters of other tests
        cfg = gateway_config(priced(upstream), f'[redis]\nurl = "{redis_server.url}"\n',
                             database=f"sqlite:///{db}").replace("sha256 =", DAILY_DOLLAR)
        gw = await start_gateway(nursery, cfg)
        await spend_ninety_cents(gw, upstream)

        def recorded() -> float:
            with sqlite3.connect(db) as conn:
                return conn.execute("SELECT coalesce(sum(cost_usd), 0) FROM usage").fetchone()[0]

        with trio.fail_after(10):                         # in the store within the writer's linger
            while recorded() < 0.9 - 1e-9:
                await trio.sleep(0.05)

        def seedings() -> int:
            return sum(line["msg"] == "limits: budgets seeded from the usage store" for line in gw.log.lines())

        before = seedings()
        await redis.flushall()                            # a Redis restarted empty, as far as we can tell
        with trio.fail_after(10):
            while seedings() < before + 2:                # the day's and the month's counters, again
                await trio.sleep(0.05)
        day = time.strftime("%Y-%m-%d", time.gmtime())
        assert int(await redis.get(f"hxgwd:{{dev}}:usd:{day}")) == 900_000_000    # from the store
        r = await gw.post("/v1/chat/completions", ask(300))
        assert (r.status_code, r.json()["error"]["code"]) == (429, "budget_exceeded")
        upstream.default = Reply(body=answer(1, 50))
        assert (await gw.post("/v1/chat/completions", ask(50))).status_code == 200
        await gw.stop()


async def test_a_store_that_does_not_answer_does_not_stop_the_gateway(nursery, tmp_path, upstream):
    from tests.servers import free_port

    cfg = gateway_config(priced(upstream), database=f"postgresql://nobody@127.0.0.1:{free_port()}/none").replace(
        "key_refresh = 0.2", f'key_refresh = 0.2\nconnect_timeout = 0.5\nspool_dir = "{tmp_path}/spool"').replace(
        "sha256 =", DAILY_DOLLAR)
    gw = await start_gateway(nursery, cfg)
    upstream.default = Reply(body=answer(1, 300))
    assert (await gw.post("/v1/chat/completions", ask(300))).status_code == 200
    with trio.fail_after(10):
        while not any(line["msg"].startswith("limits: cannot seed budgets") for line in gw.log.lines()):
            await trio.sleep(0.05)
    assert (await gw.post("/v1/chat/completions", ask(300))).status_code == 200
    await gw.stop()
