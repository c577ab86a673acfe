"""Routing through the real gateway over loopback sockets: strategies, breaker, Retry-After, reload."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import httpx
import pytest
import trio

from hxgwd.pipeline.route import Router
from tests.conftest import gateway_config, start_gateway
from tests.fakeupstream import FakeUpstream, Reply, Stream

CHAT = {"messages": [{"role": "user", "content": "Return exactly the text: HX-OK"}], "max_tokens": 10}
GROUP = {"X-HX-Model-Group": "g"}


def config(ups: list[FakeUpstream], strategy: str, *, models: str = "", group: str = "",
           routing: str = "") -> str:
    text = "".join(f"""
        [[backends]]
        name = "{u.name}"
        url = "{u.url}"
        """ for u in ups)
    text += "".join(f"""
        [[models]]
        name = "m-{u.name}"
        backend = "{u.name}"
        {models if u is ups[0] else ""}
        """ for u in ups)
    names = ", ".join(f'"m-{u.name}"' for u in ups)
    text += f"""
        [groups.g]
        models = [{names}]
        strategy = "{strategy}"
        {group}
        """
    if routing:
        text += f"""
        [routing]
        {routing}
        """
    return gateway_config(text)


async def fleet(nursery, n: int = 2, **kw) -> list[FakeUpstream]:
    ups = [FakeUpstream(name=chr(ord("a") + i), **kw) for i in range(n)]
    for u in ups:
        await nursery.start(u.serve)
    return ups


async def gateway(nursery, ups, strategy="scored", seed=0, **kw):
    return await start_gateway(nursery, config(ups, strategy, **kw), router=Router(rng=random.Random(seed)))


async def chat(gw, body=None, **kw) -> httpx.Response:
    return await gw.post("/v1/chat/completions", body or CHAT, headers=GROUP, **kw)


def prompt(kib: int) -> dict:
    return {"messages": [{"role": "user", "content": "x" * (kib * 1024)}], "max_tokens": 10}


# --- strategies -----------------------------------------------------------------------------------

async def test_priority_sends_everything_to_the_first_while_it_is_healthy(nursery):
    a, b, c = await fleet(nursery, 3)
    gw = await gateway(nursery, [a, b, c], "priority")
    for _ in range(5):
        r = await chat(gw)
        assert r.headers["x-hx-deployment"] == "m-a@a"
        assert "strategy=priority; attempts=1" in r.headers["x-hx-route"]
    assert len(b.requests) == len(c.requests) == 0


async def test_weighted_splits_by_weight(nursery):
    a, b = await fleet(nursery)
    gw = await gateway(nursery, [a, b], "weighted", models="weight = 4.0")
    seen = Counter()
    for _ in range(60):
        seen[(await chat(gw)).headers["x-hx-deployment"]] += 1
    assert 38 <= seen["m-a@a"] <= 58 and seen["m-b@b"] >= 4


async def test_least_busy_spreads_concurrent_requests(nursery, autojump_clock):
    a, b = await fleet(nursery)
    a.default = b.default = Reply(delay=5.0)
    gw = await gateway(nursery, [a, b], "least-busy")
    async with trio.open_nursery() as n:
        for _ in range(6):
            n.start_soon(chat, gw)
            await trio.sleep(0.01)
    assert a.max_in_flight == 3 and b.max_in_flight == 3


async def test_least_latency_settles_on_the_fastest(nursery, autojump_clock):
    a, b = await fleet(nursery)
    a.default, b.default = Reply(delay=2.0), Reply(delay=0.2)
    gw = await gateway(nursery, [a, b], "least-latency")
    seen = [(await chat(gw)).headers["x-hx-deployment"] for _ in range(8)]
    assert sorted(seen[:2]) == ["m-a@a", "m-b@b"]            # each measured once
    assert seen[2:] == ["m-b@b"] * 6


async def test_scored_learns_latency_by_prompt_size(nursery, autojump_clock):
    # a: 1 s of fixed overhead but fast prefill; b: none, but 0.1 s per KiB of prompt.
    a, b = await fleet(nursery, 2)
    a.default, a.latency_per_kb = Reply(delay=1.0), 0.002
    b.latency_per_kb = 0.1
    gw = await gateway(nursery, [a, b], "scored")
    rng = random.Random(1)
    for _ in range(40):
        await chat(gw, prompt(rng.choice([1, 2, 40, 60])))
    small = Counter([(await chat(gw, prompt(1))).headers["x-hx-deployment"] for _ in range(5)])
    r = await chat(gw, prompt(50))
    assert small == {"m-b@b": 5}
    assert r.headers["x-hx-deployment"] == "m-a@a"
    predicted = float(r.headers["x-hx-route"].split("predicted_ms=")[1]) / 1000
    assert predicted == pytest.approx(1.0 + 0.002 * 50, rel=0.2)


# --- health ---------------------------------------------------------------------------------------

async def test_breaker_opens_then_half_open_probe_closes_it(nursery, autojump_clock):
    a, b = await fleet(nursery)
    gw = await gateway(nursery, [a, b], "priority", routing="breaker_failures = 3\nbreaker_cooldown = 10.0")
    a.script(Reply(500), Reply(500), Reply(500))
    for _ in range(3):
        r = await chat(gw)
        assert r.status_code == 200 and r.headers["x-hx-deployment"] == "m-b@b"   # failed over
    table = gw.daemon.router.table(gw.daemon.holder.current, trio.current_time())
    assert table["g"]["deployments"][0]["breaker"] == "open"
    for _ in range(3):                                   # open: a is not even tried
        assert (await chat(gw)).headers["x-hx-deployment"] == "m-b@b"
    assert len(a.requests) == 3
    await trio.sleep(10.5)                                # cooldown over: half-open
    r = await chat(gw)
    assert r.headers["x-hx-deployment"] == "m-a@a" and len(a.requests) == 4   # the probe, and it worked
    assert (await chat(gw)).headers["x-hx-deployment"] == "m-a@a"              # closed again


async def test_failed_probe_reopens_for_longer(nursery, autojump_clock):
    a, b = await fleet(nursery)
    gw = await gateway(nursery, [a, b], "priority", routing="breaker_failures = 1\nbreaker_cooldown = 10.0")
    a.script(Reply(500), Reply(500))
    await chat(gw)                                        # opens
    await trio.sleep(10.5)
    assert (await chat(gw)).headers["x-hx-deployment"] == "m-b@b"     # probe failed, failed over
    await trio.sleep(10.5)                                # 20 s now: still open
    assert (await chat(gw)).headers["x-hx-deployment"] == "m-b@b" and len(a.requests) == 2
    await trio.sleep(10.0)
    assert (await chat(gw)).headers["x-hx-deployment"] == "m-a@a"


async def test_retry_after_cools_the_deployment_for_that_long(nursery, autojump_clock):
    a, b = await fleet(nursery)
    gw = await gateway(nursery, [a, b], "priority")
    a.script(Reply(429, retry_after=30))
    assert (await chat(gw)).headers["x-hx-deployment"] == "m-b@b"
    for _ in range(3):
        await trio.sleep(9.0)
        assert (await chat(gw)).headers["x-hx-deployment"] == "m-b@b"
    assert len(a.requests) == 1
    await trio.sleep(4.0)                                 # 31 s after the 429
    assert (await chat(gw)).headers["x-hx-deployment"] == "m-a@a"


async def test_nothing_usable_is_503_with_retry_after_and_readyz_says_so(nursery, autojump_clock):
    up = FakeUpstream(name="solo")
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(f"""
        [[backends]]
        name = "solo"
        url = "{up.url}"
        [[models]]
        name = "m"
        backend = "solo"
    """), router=Router(rng=random.Random(0)))
    up.script(Reply(503, retry_after=20))
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    assert r.status_code == 503 and r.headers["retry-after"] == "20"        # the upstream's answer
    await trio.sleep(5.0)
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    assert r.status_code == 503 and r.headers["retry-after"] == "15"        # ours, without asking
    assert r.json()["error"]["type"] == "service_unavailable"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert len(up.requests) == 1
    ready = await gw.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["reason"] == "no usable backend"
    await trio.sleep(15.5)
    assert (await gw.client.get("/readyz")).status_code == 200
    assert (await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})).status_code == 200


async def test_failover_before_first_byte_and_none_after_it(nursery, autojump_clock):
    a, b = await fleet(nursery)
    a.default, b.default = Reply(delay=0.1), Reply(delay=0.5)
    gw = await gateway(nursery, [a, b], "scored")
    for _ in range(10):                                   # learn that a is the faster
        await chat(gw)
    assert (await chat(gw)).headers["x-hx-deployment"] == "m-a@a"
    await a.refuse()
    r = await chat(gw)
    assert r.status_code == 200 and r.headers["x-hx-deployment"] == "m-b@b"
    assert "attempts=2" in r.headers["x-hx-route"]
    await a.accept()
    a.script(Stream(words=5, reset_after=2))
    before = len(b.requests)
    with pytest.raises(httpx.RemoteProtocolError):
        first = await chat(gw, {**CHAT, "stream": True})
        first.raise_for_status()
    assert len(b.requests) == before                     # never retried after the first byte


# --- accounting, reload, admin ------------------------------------------------------------------------

async def test_in_flight_includes_requests_waiting_at_the_cap_and_returns_to_zero(nursery, autojump_clock):
    a, b = await fleet(nursery)
    a.default = Reply(delay=3.0)
    gw = await gateway(nursery, [a, b], "priority", models="max_concurrency = 2\nmax_queue = 8\nqueue_timeout = 20.0")
    router = gw.daemon.router
    async with trio.open_nursery() as n:
        for _ in range(4):
            n.start_soon(chat, gw)
        await trio.sleep(1.0)
        assert router.state("m-a@a").in_flight == 4 and a.in_flight == 2        # 2 upstream, 2 waiting
    assert router.state("m-a@a").in_flight == 0 and a.max_in_flight == 2
    assert router.state("m-a@a").requests == 4


async def test_reload_keeps_what_was_learned(nursery, tmp_path, autojump_clock):
    a, b, c = await fleet(nursery, 3)
    a.default, b.default = Reply(delay=0.3), Reply(delay=0.6)
    text = config([a, b, c], "scored")
    gw = await start_gateway(nursery, text, router=Router(rng=random.Random(0)))
    path = tmp_path / "hxgwd.toml"
    path.write_text(config([a, b], "least-busy"))           # c is gone, the strategy changes
    gw.daemon.config_path = str(path)
    for _ in range(20):
        await chat(gw)
    router = gw.daemon.router
    before = router.state("m-a@a").latency.params(), router.state("m-a@a").requests
    autojump_clock.autojump_threshold = math.inf    # the file is read in a thread, in real time: no
    assert await gw.daemon.reload()                 # jumping past the reload's time limit meanwhile
    autojump_clock.autojump_threshold = 0
    assert gw.daemon.holder.current.generation == 2
    assert (router.state("m-a@a").latency.params(), router.state("m-a@a").requests) == before
    assert "m-c@c" not in router.states
    r = await chat(gw)
    assert "strategy=least-busy" in r.headers["x-hx-route"]


async def test_admin_table_is_the_live_routing_state(nursery, autojump_clock):
    a, b = await fleet(nursery)
    text = config([a, b], "scored", routing="breaker_failures = 2").replace('sha256 = ', 'admin = true\nsha256 = ')
    gw = await start_gateway(nursery, text, router=Router(rng=random.Random(0)))
    a.default, b.default = Reply(delay=0.1), Reply(delay=0.2)
    for _ in range(6):
        await chat(gw)
    a.script(Reply(500), Reply(500))
    b.script(Reply(500), Reply(500))
    await chat(gw)
    await chat(gw)
    r = await gw.get("/admin/routing")
    assert r.status_code == 200
    g = r.json()["targets"]["g"]
    assert g["strategy"] == "scored" and len(g["deployments"]) == 2
    rows = {row["deployment"]: row for row in g["deployments"]}
    assert {row["breaker"] for row in rows.values()} == {"open"}
    for row in rows.values():
        assert row["failures"] == 2 and row["error_rate"] > 0.2 and row["in_flight"] == 0
        assert row["observations"] >= 1 and row["latency"]["intercept_s"] != 0
        json.dumps(row)
