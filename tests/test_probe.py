"""Active health probes against the fake upstream: what is asked, verdicts, pacing, reloads."""

from __future__ import annotations

import random
import ssl
import textwrap

import trio

from hxgwd.config import load
from hxgwd.pipeline.route import RequestFeatures, Router
from hxgwd.runtime import RuntimeHolder, compile_config
from hxgwd.upstream.probe import probe_loop
from tests.conftest import gateway_config, start_gateway
from tests.fakeupstream import FakeUpstream, Hang, Reply
from tests.test_gateway import tls_files  # noqa: F401  (a fixture)


class Recorder:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool, float]] = []

    def probe_result(self, backend: str, ok: bool, now: float) -> None:
        self.results.append((backend, ok, now))


def runtime(up: FakeUpstream, *, probe: str | None = '"/health"', interval: float = 10.0,
            generation: int = 1, other_url: str = "http://127.0.0.1:9"):
    probe_line = f"probe_path = {probe}" if probe else ""
    text = textwrap.dedent(f"""
        [database]
        url = ""
        [[backends]]
        name = "up"
        url = "{up.url}/v1"
        api_key_env = "UP_KEY"
        {probe_line}
        probe_interval = {interval}
        probe_timeout = 2.0
        [[backends]]
        name = "unprobed"
        url = "{other_url}"
        [[backends]]
        name = "local"
        kind = "echo"
        probe_path = "/health"
        [[models]]
        name = "m"
        backend = "up"
        [[models]]
        name = "n"
        backend = "unprobed"
        [[models]]
        name = "e"
        backend = "local"
    """)
    return compile_config(load.loads(text), generation, environ={"UP_KEY": "sk-upstream"})


async def start(nursery, up, **kw):
    holder = RuntimeHolder(runtime(up, **kw))
    rec = Recorder()
    nursery.start_soon(probe_loop, holder, rec)
    return holder, rec


async def test_probes_only_backends_with_a_probe_path_with_their_key(nursery, autojump_clock):
    up = FakeUpstream()
    await nursery.start(up.serve)
    holder, rec = await start(nursery, up)
    await trio.sleep(1.0)
    assert [(b, ok) for b, ok, _ in rec.results] == [("up", True)]    # not the echo, not the unprobed
    got = up.requests[-1]
    assert got.method == "GET" and got.path == "/health"               # from the origin's root
    assert got.headers["authorization"] == "Bearer sk-upstream"


async def test_probe_interval_paces_them(nursery, autojump_clock):
    up = FakeUpstream()
    await nursery.start(up.serve)
    holder, rec = await start(nursery, up, interval=10.0)
    await trio.sleep(35.0)
    times = [t for _, _, t in rec.results]
    assert len(times) == 4
    assert all(9.9 < b - a < 10.5 for a, b in zip(times, times[1:]))


async def test_error_status_refusal_and_hang_are_down(nursery, autojump_clock):
    up = FakeUpstream()
    await nursery.start(up.serve)
    up.script(Reply(503), Hang())
    holder, rec = await start(nursery, up, interval=5.0)
    await trio.sleep(11.0)                                  # 503, hang (timeout 2 s), ok
    assert [ok for _, ok, _ in rec.results] == [False, False, True]
    assert rec.results[1][2] - rec.results[0][2] > 6.9     # the hang took its 2 s timeout
    await up.refuse()
    await trio.sleep(5.0)
    assert rec.results[-1][1] is False


async def test_reload_changes_and_removes_probes(nursery, autojump_clock):
    up = FakeUpstream()
    await nursery.start(up.serve)
    holder, rec = await start(nursery, up, interval=60.0)
    await trio.sleep(1.0)
    assert len(rec.results) == 1
    holder.swap(runtime(up, interval=2.0, generation=2))    # shorter: applies at once
    await trio.sleep(5.0)
    assert len(rec.results) >= 3
    holder.swap(runtime(up, probe=None, generation=3))      # switched off
    count = len(rec.results)
    await trio.sleep(30.0)
    assert len(rec.results) <= count + 1                      # at most one already under way


async def test_probes_drive_the_breaker_and_readiness(nursery, autojump_clock):
    up = FakeUpstream()
    await nursery.start(up.serve)
    holder = RuntimeHolder(runtime(up, interval=1.0))
    rt = holder.current
    router = Router(rng=random.Random(0))
    nursery.start_soon(probe_loop, holder, router)
    await trio.sleep(0.5)
    target = rt.targets["m"]
    assert router.usable(rt, trio.current_time())
    await up.refuse()
    await trio.sleep(2.0)
    features = RequestFeatures(100, 10, False)
    assert router.plan(target, features, trio.current_time()).order == ()
    await up.accept()
    await trio.sleep(2.0)
    assert [d.id for d in router.plan(target, features, trio.current_time()).order] == ["m@up"]


async def test_a_backend_on_a_private_ca_passes_probes_as_it_passes_traffic(nursery, tls_files):
    # Probes (httpx) trusted certifi's bundle while traffic trusted the system's store: a backend
    # on a CA installed in the system store served requests and failed every probe, which opened
    # its breaker. Now a probe goes through the backend's own pool: same context, same connections.
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    up = FakeUpstream(tls=server_ctx)
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(f"""
        [[backends]]
        name = "private"
        url = "{up.url}/v1"
        ca_file = "{cert}"
        probe_path = "/health"
        probe_interval = 1.0
        [[models]]
        name = "m"
        backend = "private"
    """))
    r = await gw.post("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    rec = Recorder()
    holder = gw.daemon.holder
    nursery.start_soon(probe_loop, holder, rec, gw.daemon.transports)
    with trio.fail_after(10):
        while not rec.results:
            await trio.sleep(0.05)
    assert rec.results[0][:2] == ("private", True)
    assert [r.path for r in up.requests].count("/health") >= 1
    # the daemon's own probes, through the same pool: no connection beyond the pool's idle ones
    pool, = gw.daemon.transports.pools()
    assert up.connections == pool.statistics()["opened"]
    await trio.sleep(2.5)
    assert (await gw.client.get("/readyz")).status_code == 200
