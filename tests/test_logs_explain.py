"""Issue 17, point 4: logs that explain. Each test is one thing a new operator could not tell from
the log before: why an upstream failed, that a breaker opened, who sent a request and from where,
which key a 401 tried, what was answered, and what the daemon started with."""

from __future__ import annotations

import functools
import json
from typing import Any

import httpx
import trio

from tests.conftest import AUTH, DEV_KEY, gateway_config, start_gateway
from tests.fakeupstream import FakeUpstream, Raw
from tests.servers import free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def one_backend(url: str, extra: str = "") -> str:
    return gateway_config(f"""
        [[backends]]
        name = "b"
        url = "{url}"
        [[models]]
        name = "m"
        backend = "b"
    """, extra)


async def flushed(gw: Any) -> list[dict[str, Any]]:
    """The access lines once the idle work that writes them has run."""
    for _ in range(200):
        await trio.sleep(0.01)
        gw.daemon.log.flush()
        if gw.log.requests():
            return gw.log.requests()
    return gw.log.requests()


async def test_a_refused_connect_says_so(nursery: trio.Nursery) -> None:
    gw = await start_gateway(nursery, one_backend(f"http://127.0.0.1:{free_port()}"))
    r = await gw.post("/v1/chat/completions", CHAT)
    assert r.status_code == 502
    line = (await flushed(gw))[-1]
    assert "connect refused" in line["cause"] and "ECONNREFUSED" in line["cause"], line
    await gw.stop()


async def plain_http_server(nursery: trio.Nursery) -> int:
    """A plain-HTTP server as nginx or uvicorn is one: a TLS hello gets a 400 in clear text."""
    async def answer(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await stream.aclose()
    listeners = await nursery.start(functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_https_to_a_plain_http_server_names_the_tls_failure(nursery: trio.Nursery,
                                                                  upstream: FakeUpstream) -> None:
    port = await plain_http_server(nursery)
    gw = await start_gateway(nursery, one_backend(f"https://127.0.0.1:{port}"))
    r = await gw.post("/v1/chat/completions", CHAT)
    assert r.status_code == 502
    line = (await flushed(gw))[-1]
    assert "tls: wrong version number" in line["cause"], line
    await gw.stop()


async def test_https_to_a_server_that_closes_says_so(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    gw = await start_gateway(nursery, one_backend(upstream.url.replace("http://", "https://")))
    r = await gw.post("/v1/chat/completions", CHAT)
    assert r.status_code == 502
    line = (await flushed(gw))[-1]
    assert "tls: closed during handshake" in line["cause"], line
    await gw.stop()


async def test_a_reset_mid_answer_says_after_how_many_bytes(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    upstream.script(Raw(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a\":",
                        then="reset"))
    gw = await start_gateway(nursery, one_backend(upstream.url))
    r = await gw.post("/v1/chat/completions", CHAT)
    assert r.status_code == 502
    line = (await flushed(gw))[-1]
    assert "reset after" in line["cause"] and "bytes" in line["cause"], line
    await gw.stop()


async def test_a_breaker_that_opens_is_an_event(nursery: trio.Nursery) -> None:
    gw = await start_gateway(nursery, one_backend(f"http://127.0.0.1:{free_port()}",
                                                  "[routing]\nbreaker_failures = 3\n"))
    for _ in range(5):
        await gw.post("/v1/chat/completions", CHAT)
    await gw.stop()
    events = [line for line in gw.log.lines() if line.get("event") == "breaker_open"]
    assert len(events) == 1, gw.log.lines()
    assert events[0]["deployment"].startswith("m") and events[0]["backend"] == "b"
    assert "connect refused" in events[0]["cause"]


async def test_access_lines_say_who_and_from_where(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    gw = await start_gateway(nursery, one_backend(upstream.url))
    await gw.post("/v1/chat/completions", CHAT, headers={"User-Agent": "OpenAI/Python 1.2.3",
                                                        "X-Forwarded-For": "203.0.113.9"})
    line = (await flushed(gw))[-1]
    assert line["client"] == "127.0.0.1", line          # not a trusted proxy: its X-Forwarded-For is not believed
    assert line["user_agent"] == "OpenAI/Python 1.2.3"
    await gw.stop()


async def test_x_forwarded_for_is_honoured_from_a_trusted_proxy(nursery: trio.Nursery,
                                                               upstream: FakeUpstream) -> None:
    gw = await start_gateway(nursery, one_backend(upstream.url).replace(
        "[server]\n", '[server]\ntrusted_proxies = ["127.0.0.0/8"]\n'))
    await gw.post("/v1/chat/completions", CHAT, headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.9, 127.0.0.2"})
    line = (await flushed(gw))[-1]
    assert line["client"] == "203.0.113.9", line     # the nearest address no trusted proxy claims
    await gw.stop()


async def test_a_401_names_the_key_prefix_never_the_key(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    gw = await start_gateway(nursery, one_backend(upstream.url))
    tried = "sk-hx-leaked-0123456789abcdef"
    r = await gw.get("/v1/models", headers={"Authorization": f"Bearer {tried}"})
    assert r.status_code == 401
    line = (await flushed(gw))[-1]
    assert line["key_prefix"] == tried[:8], line
    await gw.stop()
    text = gw.log.getvalue().decode()
    assert tried not in text and tried[8:] not in text and DEV_KEY not in text


async def test_a_short_key_gives_no_prefix(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    gw = await start_gateway(nursery, one_backend(upstream.url))
    r = await gw.get("/v1/models", headers={"Authorization": "Bearer abc123"})
    assert r.status_code == 401
    line = (await flushed(gw))[-1]
    assert "key_prefix" not in line and "abc" not in gw.log.getvalue().decode()
    await gw.stop()


async def test_bytes_out_is_what_was_sent(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    gw = await start_gateway(nursery, one_backend(upstream.url))
    models = await gw.get("/v1/models")
    refused = await gw.get("/v1/models", headers={"Authorization": "Bearer nope-nope-nope-nope"})
    for _ in range(100):
        if len(await flushed(gw)) >= 2:
            break
    lines = gw.log.requests()
    assert [line["bytes_out"] for line in lines] == [len(models.content), len(refused.content)]
    await gw.stop()


async def test_the_startup_line_says_what_is_served(nursery: trio.Nursery, upstream: FakeUpstream,
                                                    tmp_path: Any) -> None:
    db = tmp_path / "u.db"
    gw = await start_gateway(nursery, one_backend(upstream.url, f"""
        [redis]
        url = "redis://:hunter2-secret@127.0.0.1:1/0"
        on_redis_error = "local"
    """).replace('url = ""', f'url = "sqlite:///{db}"\nspool_dir = "{tmp_path}/spool"', 1))
    await gw.stop()
    started = [line for line in gw.log.lines() if line.get("event") == "started"]
    assert len(started) == 1, gw.log.lines()
    s = started[0]
    assert s["generation"] == 1 and s["listen"] and s["http_parser"] in ("httptools", "h11")
    assert s["models"] == ["m"] and s["backends"] == {"b": upstream.url}
    assert s["store"].startswith("sqlite:") and s["redis"].startswith("redis://")
    assert "hunter2" not in gw.log.getvalue().decode()


# --- the breaker's whole cycle, and the events' rate ------------------------------------------

def test_each_change_of_a_breaker_is_told_once_with_why() -> None:
    from hxgwd.config.model import Routing
    from hxgwd.routing.breaker import Breaker

    changes: list[tuple[str, str, str]] = []
    settings = Routing(breaker_failures=2, breaker_cooldown=10.0)
    b = Breaker(on_change=lambda old, new, why: changes.append((old, new, why)))
    b.on_failure(0.0, settings)
    b.on_failure(0.1, settings)                  # opens
    assert not b.admits(5.0)
    assert b.admits(10.5)                        # cooldown over: half-open
    b.on_start(10.5)
    b.on_failure(10.6, settings)                 # the probe request failed: open again, 20 s
    b.admits(31.0)
    b.on_start(31.0)
    b.on_success(31.1, settings)                 # closed
    b.on_probe(False, 40.0, settings)            # a health probe failed: open
    b.on_probe(True, 41.0, settings)             # ... and one succeeded: closed
    assert changes == [("closed", "open", "2 consecutive failures"), ("open", "half-open", "cooldown over"),
                       ("half-open", "open", "probe request failed"), ("open", "half-open", "cooldown over"),
                       ("half-open", "closed", "request succeeded"), ("closed", "open", "health probe failed"),
                       ("open", "closed", "health probe ok")]


def test_a_storm_of_events_is_held_to_a_burst_and_counted() -> None:
    import io

    from hxgwd import logs

    out = io.BytesIO()
    log = logs.Logger(out=out)
    written = sum(log.limited("breaker_open", "warning", "x", deployment=str(i)) for i in range(500))
    assert written == logs.EVENT_BURST
    log._buckets["breaker_open"][0] = 1.0        # as after a quiet while
    assert log.limited("breaker_open", "warning", "x", deployment="late")
    last = json.loads(out.getvalue().splitlines()[-1])
    assert last["suppressed"] == 500 - logs.EVENT_BURST and last["event"] == "breaker_open"
    assert log.limited("breaker_closed", "info", "y")        # another event has a rate of its own


async def test_no_secret_reaches_the_log(nursery: trio.Nursery, tmp_path: Any) -> None:
    """An upstream's api key, the database password and the client's key, through failures."""
    port = free_port()
    gw = await start_gateway(nursery, gateway_config(f"""
        [[backends]]
        name = "b"
        url = "https://127.0.0.1:{port}"
        api_key_env = "UPSTREAM_KEY"
        [[models]]
        name = "m"
        backend = "b"
    """, database="postgresql://hx:db-pass-s3cret@127.0.0.1:1/hx?password=db-pass-s3cret").replace(
        "key_refresh = 0.2", f'key_refresh = 0.2\nspool_dir = "{tmp_path}/spool"\nconnect_timeout = 0.2'),
        environ={"UPSTREAM_KEY": "sk-upstream-s3cret", "HXGWD_DB_PASSWORD": ""})
    for _ in range(3):
        await gw.post("/v1/chat/completions", CHAT)
    await gw.get("/v1/models", headers={"Authorization": "Bearer sk-hx-not-a-key-but-long-enough"})
    await gw.stop()
    text = gw.log.getvalue().decode()
    assert "connect refused" in text
    for secret in ("sk-upstream-s3cret", "db-pass-s3cret", DEV_KEY, "not-a-key-but-long-enough"):
        assert secret not in text, secret
