"""The upstream pool over real loopback sockets, with each HTTP parser: reuse, the connection cap
and what a request refused at it is told."""

from __future__ import annotations

import pytest
import trio

from hxgwd.config.model import Backend, Timeouts
from hxgwd.runtime import Origin
from hxgwd.upstream import PoolFull, UpstreamRequest
from hxgwd.upstream.pool import Pool
from tests.fakeupstream import FakeUpstream, Hang, Stream
from tests.test_gateway import CHAT, single

CHAT_REQUEST = UpstreamRequest("POST", "/v1/chat/completions", [(b"content-type", b"application/json")],
                               b'{"messages": [{"role": "user", "content": "hi"}], "stream": true}')


@pytest.fixture(params=["httptools", "h11"])
def parser(request):
    return request.param


async def read_all(response) -> bytes:
    parts = []
    while piece := await response.receive(trio.current_time() + 30):
        parts.append(piece)
    await response.aclose()
    return b"".join(parts)


def pool_for(up: FakeUpstream, parser: str, max_connections: int = 0) -> Pool:
    return Pool(Origin("http", "127.0.0.1", up.port), max_connections=max_connections, max_idle=64,
                idle_timeout=30.0, ssl_context=None, parser=parser, name="u")


async def test_answers_are_read_and_connections_reused(nursery, parser):
    up = FakeUpstream()
    await nursery.start(up.serve)
    pool = pool_for(up, parser)
    for _ in range(3):
        response = await pool.request(CHAT_REQUEST, Timeouts())
        assert response.status == 200 and (await read_all(response)).endswith(b"data: [DONE]\n\n")
    assert up.connections == 1 and pool.statistics()["idle"] == 1
    got = up.requests[-1]
    assert got.headers["host"] == f"127.0.0.1:{up.port}" and got.headers["content-length"] == str(len(CHAT_REQUEST.body))


async def test_without_a_cap_many_slow_streams_are_all_served(nursery, parser, autojump_clock):
    assert Backend(name="b").max_connections == 0      # the default: no cap (bench/pool_cap.py)
    up = FakeUpstream()
    await nursery.start(up.serve)
    up.default = Stream(words=3, delay=0.5)
    pool = pool_for(up, parser)
    done = []

    async def one() -> None:
        response = await pool.request(CHAT_REQUEST, Timeouts(pool=1.0))
        done.append(await read_all(response))

    async with trio.open_nursery() as clients:
        for _ in range(300):
            clients.start_soon(one)
    assert len(done) == 300 and up.max_in_flight == 300 and pool.refused == 0


async def test_a_request_refused_at_the_cap_is_told_it_was_the_gateways_limit(nursery, parser, autojump_clock):
    up = FakeUpstream()
    await nursery.start(up.serve)
    up.script(Hang())
    pool = pool_for(up, parser, max_connections=1)
    async with trio.open_nursery() as hung:
        hung.start_soon(pool.request, CHAT_REQUEST, Timeouts(first_byte=60))
        await trio.sleep(1)
        began = trio.current_time()
        with pytest.raises(PoolFull) as refused:
            await pool.request(CHAT_REQUEST, Timeouts(pool=5.0))
        assert 5.0 <= trio.current_time() - began < 5.5
        hung.cancel_scope.cancel()
    err = refused.value
    assert (err.status, err.fault, err.code) == (503, "gateway", "upstream_pool_full")
    assert "'u'" in err.message and "backends[].max_connections" in err.message
    assert (b"retry-after", b"1") in err.headers()


async def test_the_cap_refusal_through_the_gateway(nursery, autojump_clock):
    gw, up = await single(nursery, backend_extra="max_connections = 1")
    up.script(Hang())
    async with trio.open_nursery() as hung:
        hung.start_soon(gw.post, "/v1/chat/completions", {**CHAT, "model": "m"})
        await trio.sleep(1)
        r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
        hung.cancel_scope.cancel()
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    error = r.json()["error"]
    assert error["code"] == "upstream_pool_full" and "backends[].max_connections" in error["message"]
    with trio.fail_after(5):
        while not [rec for rec in gw.log.requests() if rec["status"] == 503]:
            await trio.sleep(0.05)
    rec = [rec for rec in gw.log.requests() if rec["status"] == 503][-1]
    assert rec["fault"] == "gateway"
    warning = [line for line in gw.log.lines() if line["level"] == "warning" and line.get("backend") == "u"]
    assert warning and warning[0]["setting"] == "backends[].max_connections" and warning[0]["max_connections"] == 1
    # the backend is not blamed: its breaker stays closed, the next request goes through
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    assert r.status_code == 200
