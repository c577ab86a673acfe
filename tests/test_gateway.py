"""The request path end to end, over real loopback sockets: endpoints, auth, transforms, failover."""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import struct
import subprocess

import httpx
import pytest
import trio

from tests.conftest import AUTH, gateway_config, start_gateway
from tests.fakeupstream import FakeUpstream, Hang, Reply, Reset, Stream


def two_backends(a: FakeUpstream, b: FakeUpstream, strategy: str = "priority", extra: str = "") -> str:
    return gateway_config(f"""
        [[backends]]
        name = "a"
        url = "{a.url}/v1"
        api_key_env = "A_KEY"
        [[backends]]
        name = "b"
        url = "{b.url}"
        [[models]]
        name = "m-a"
        backend = "a"
        upstream_model = "real-a"
        [[models]]
        name = "m-b"
        backend = "b"
        upstream_model = "real-b"
        [groups.hx-chat]
        models = ["m-a", "m-b"]
        strategy = "{strategy}"
    """, extra)


async def single(nursery, backend_extra: str = "", model_extra: str = "", key_extra: str = "",
                 environ: dict | None = None, server_extra: str = ""):
    """The gateway in front of one fresh upstream: backend "u", model "m"."""
    up = FakeUpstream()
    await nursery.start(up.serve)
    config = gateway_config(f"""
        {key_extra}
        [[backends]]
        name = "u"
        url = "{up.url}"
        {backend_extra}
        [[models]]
        name = "m"
        backend = "u"
        {model_extra}
    """).replace('listen = ["127.0.0.1:0"]\n', f'listen = ["127.0.0.1:0"]\n{server_extra}\n', 1)
    return await start_gateway(nursery, config, environ=environ), up


async def raw_stream_request(gw) -> trio.SocketStream:
    """A streamed chat request for model "m" on a plain socket, so the test controls the reading."""
    stream = await trio.open_tcp_stream("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))
    body = json.dumps({**CHAT, "model": "m", "stream": True}).encode()
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-hx-dev-1234\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return stream


async def two(nursery, **kw):
    a, b = FakeUpstream(name="a"), FakeUpstream(name="b")
    await nursery.start(a.serve)
    await nursery.start(b.serve)
    gw = await start_gateway(nursery, two_backends(a, b, **kw), environ={"A_KEY": "sk-backend-a"})
    return gw, a, b


CHAT = {"messages": [{"role": "user", "content": "Return exactly the text: HX-OK"}], "max_tokens": 10}


async def last_record(gw, status: int | None = None, endpoint: str | None = None) -> dict:
    """The newest access-log record (of that status, of that endpoint); the line is written at the
    loop's first quiet moment after the last byte is sent (hxgwd/idle.py)."""
    with trio.fail_after(5):
        while True:
            recs = [r for r in gw.log.requests() if (status is None or r["status"] == status)
                    and (endpoint is None or r["endpoint"] == endpoint)]
            if recs:
                return recs[-1]
            await trio.sleep(0.01)


async def test_chat_through_group_header_sends_upstream_name_and_backend_key(nursery):
    gw, a, b = await two(nursery)
    r = await gw.post("/v1/chat/completions", CHAT, headers={"X-HX-Model-Group": "hx-chat", "X-Request-ID": "abc-1"})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "HX-OK"
    assert r.headers["x-request-id"] == "abc-1"
    assert r.headers["x-hx-deployment"] == "m-a@a"
    assert "strategy=priority" in r.headers["x-hx-route"]
    assert float(r.headers["x-hx-overhead-ms"]) >= 0
    got = a.requests[-1]
    assert got.path == "/v1/chat/completions"
    assert got.json["model"] == "real-a"
    assert got.headers["authorization"] == "Bearer sk-backend-a"   # the backend's key, not the client's
    assert got.headers["x-request-id"] == "abc-1"
    assert "x-hx-model-group" not in got.headers


async def test_client_key_never_goes_upstream(nursery):
    gw, a, b = await two(nursery)
    await gw.post("/v1/chat/completions", {**CHAT, "model": "m-b"}, headers={"api-key": "whatever"})
    got = b.requests[-1]
    assert "authorization" not in got.headers and "api-key" not in got.headers
    assert got.path == "/v1/chat/completions"          # url without /v1 gets it appended


async def test_header_wins_over_body_model(nursery):
    gw, a, b = await two(nursery)
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m-b"}, headers={"X-HX-Model-Group": "m-a"})
    assert r.headers["x-hx-deployment"] == "m-a@a"


async def test_auth_errors_are_openai_shaped(nursery):
    gw, a, b = await two(nursery)
    r = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = await gw.client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    for header in ({"api-key": "sk-hx-dev-1234"}, {"x-api-key": "sk-hx-dev-1234"}):
        r = await gw.client.post("/v1/chat/completions", json={**CHAT, "model": "m-a"}, headers=header)
        assert r.status_code == 200
    assert not [line for line in gw.log.lines() if "sk-hx-dev-1234" in json.dumps(line)]


async def test_key_limited_to_some_models(nursery):
    up = FakeUpstream()
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(f"""
        [[keys]]
        name = "narrow"
        key_env = "NARROW"
        models = ["m1"]
        [[backends]]
        name = "u"
        url = "{up.url}"
        [[models]]
        name = "m1"
        backend = "u"
        [[models]]
        name = "m2"
        backend = "u"
    """), environ={"NARROW": "sk-narrow"})
    h = {"Authorization": "Bearer sk-narrow"}
    r = await gw.client.post("/v1/chat/completions", json={**CHAT, "model": "m2"}, headers=h)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = await gw.client.post("/v1/chat/completions", json={**CHAT, "model": "m1"}, headers=h)
    assert r.status_code == 200
    r = await gw.client.get("/v1/models", headers=h)
    assert [m["id"] for m in r.json()["data"]] == ["m1"]


async def test_models_from_registry_even_with_upstream_down(nursery):
    gw, a, b = await two(nursery)
    await a.refuse()
    await b.refuse()
    r = await gw.get("/v1/models")
    assert r.status_code == 200
    ids = [m["id"] for m in r.json()["data"]]
    assert ids == ["m-a", "m-b", "hx-chat"]
    assert a.requests == [] and b.requests == []
    r = await gw.get("/v1/models/hx-chat")
    assert r.json()["id"] == "hx-chat"
    r = await gw.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_unknown_model_endpoint_and_method(nursery):
    gw, a, b = await two(nursery)
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = await gw.post("/v1/nothing", CHAT)
    assert r.status_code == 404
    r = await gw.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = await gw.post("/v1/models", CHAT)
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    r = await gw.client.post("/v1/chat/completions", content=b"{not json", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = await gw.post("/v1/chat/completions", {"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


async def test_health_and_ready_need_no_auth(nursery):
    gw, a, b = await two(nursery)
    r = await gw.client.get("/healthz")
    assert r.json() == {"ok": True, "version": r.json()["version"], "generation": 1}
    r = await gw.client.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True


async def test_head_is_answered_like_get_without_a_body(nursery):
    # load balancers and uptime checks probe with HEAD; the connection stays usable after it
    gw, a, b = await two(nursery)
    for path, headers in (("/healthz", {}), ("/readyz", {}), ("/v1/models", AUTH)):
        got = await gw.client.get(path, headers=headers)
        r = await gw.client.head(path, headers=headers)
        assert r.status_code == 200 and r.content == b"", path
        assert r.headers["content-length"] == got.headers["content-length"], path
    r = await gw.client.head("/v1/models")
    assert r.status_code == 401 and r.content == b""
    r = await gw.client.post("/healthz")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    assert (await gw.client.get("/healthz")).json()["ok"] is True


async def test_failover_on_refused_500_429_and_reset(nursery):
    gw, a, b = await two(nursery)
    await a.refuse()
    r = await gw.post("/v1/chat/completions", CHAT, headers={"X-HX-Model-Group": "hx-chat"})
    assert r.status_code == 200 and r.headers["x-hx-deployment"] == "m-b@b"
    assert "attempts=2" in r.headers["x-hx-route"]
    await a.accept()
    for failure in (Reply(500), Reply(429, retry_after=1), Reply(503), Reset()):
        a.script(failure)
        r = await gw.post("/v1/chat/completions", CHAT, headers={"X-HX-Model-Group": "hx-chat"})
        assert r.status_code == 200, failure
        assert r.headers["x-hx-deployment"] == "m-b@b"


async def test_caller_4xx_is_returned_as_is(nursery):
    gw, a, b = await two(nursery)
    a.script(Reply(400, body={"error": {"message": "bad temperature", "type": "invalid_request_error",
                                        "param": "temperature", "code": None}}))
    r = await gw.post("/v1/chat/completions", CHAT, headers={"X-HX-Model-Group": "hx-chat"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "bad temperature"
    assert b.requests == []
    with trio.fail_after(5):       # the access line is written at the loop's next quiet moment
        while not gw.log.requests():
            await trio.sleep(0.01)
    assert gw.log.requests()[0]["fault"] == "caller"      # whose fault, as for our own answers


async def test_all_failing_passes_last_answer_or_502(nursery):
    gw, a, b = await two(nursery)
    a.script(Reply(500))
    b.script(Reply(503, retry_after=7))
    r = await gw.post("/v1/chat/completions", CHAT, headers={"X-HX-Model-Group": "hx-chat"})
    assert r.status_code == 503 and r.headers["retry-after"] == "7"
    await a.refuse()
    await b.refuse()
    r = await gw.post("/v1/chat/completions", CHAT, headers={"X-HX-Model-Group": "hx-chat"})
    assert r.status_code in (502, 503)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "127.0.0.1" not in r.text   # no internals


async def test_stream_relayed_byte_exact_with_usage_stripped(nursery):
    gw, a, b = await two(nursery)
    async with gw.client.stream("POST", "/v1/chat/completions", headers=AUTH,
                                json={**CHAT, "model": "m-a", "stream": True}) as r:
        assert r.headers["x-accel-buffering"] == "no"
        assert r.headers["content-type"].startswith("text/event-stream")
        body = b"".join([c async for c in r.aiter_raw()])
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert len(events) == 5 + 1 + 1                        # words + finish + DONE; usage chunk removed
    assert a.requests[-1].json["stream_options"] == {"include_usage": True}
    rec = await last_record(gw)
    assert rec["stream"] is True and rec["completion_tokens"] == 5 and rec["prompt_tokens"] == 7


async def test_stream_events_that_arrived_together_leave_in_one_write(nursery):
    gw, up = await single(nursery)
    up.script(Stream(words=50, burst=True))
    stream = await raw_stream_request(gw)
    raw = b""
    with trio.fail_after(10):
        while not raw.endswith(b"\r\n0\r\n\r\n"):
            raw += await stream.receive_some(65536)
    await stream.aclose()
    rest = raw.split(b"\r\n\r\n", 1)[1]
    sizes, payload = [], b""
    while True:                                   # the chunked framing, as the client sees it
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            break
        sizes.append(size)
        payload, rest = payload + rest[:size], rest[size + 2:]
    events = [e for e in payload.split(b"\n\n") if e]
    assert len(events) == 50 + 1 + 1 and events[-1] == b"data: [DONE]"    # all of them, byte for byte
    assert len(sizes) <= 3                        # not one write per event


async def test_stream_keeps_usage_when_client_asked(nursery):
    gw, a, b = await two(nursery)
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m-a", "stream": True,
                                               "stream_options": {"include_usage": True}})
    events = [e for e in r.content.split(b"\n\n") if e]
    assert b'"usage"' in events[-2]


async def test_no_retry_after_first_byte(nursery):
    gw, a, b = await two(nursery)
    a.script(Stream(words=5, reset_after=2))
    with trio.fail_after(10), pytest.raises(httpx.RemoteProtocolError):   # the cut shows as a broken body
        await gw.post("/v1/chat/completions", {**CHAT, "stream": True}, headers={"X-HX-Model-Group": "hx-chat"})
    assert b.requests == []
    assert (await last_record(gw, 502))["status"] == 502


async def test_client_disconnect_cancels_upstream(nursery):
    gw, a, b = await two(nursery)
    a.script(Hang())
    async def client():
        with trio.move_on_after(0.5):
            await gw.post("/v1/chat/completions", {**CHAT, "model": "m-a"})
    await client()
    with trio.fail_after(5):
        while not a.abandoned:
            await trio.sleep(0.01)
    rec = await last_record(gw, 499)
    assert rec["status"] == 499 and rec["fault"] == "client"


async def test_embeddings_prompt_backend_with_list_and_base64(nursery):
    up = FakeUpstream(prompt_only_embeddings=True, dimensions=8)
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(f"""
        [[backends]]
        name = "ollama"
        url = "{up.url}"
        embeddings_input = "prompt"
        [[models]]
        name = "emb"
        backend = "ollama"
        kind = "embedding"
    """))
    r = await gw.post("/v1/embeddings", {"model": "emb", "input": "HX-OK"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["object"] == "list" and doc["model"] == "emb"
    assert len(doc["data"][0]["embedding"]) == 8 and "usage" in doc
    r = await gw.post("/v1/embeddings", {"model": "emb", "input": ["a", "bb", "ccc"], "encoding_format": "base64"})
    doc = r.json()
    assert [d["index"] for d in doc["data"]] == [0, 1, 2]
    # sent concurrently, so in any order; merged in the input's (the vector of "bb" is second)
    assert sorted(q.json["prompt"] for q in up.requests[-3:]) == ["a", "bb", "ccc"]
    vec = struct.unpack("<8f", base64.b64decode(doc["data"][1]["embedding"]))
    assert abs(vec[0] - ((sum(b"bb") * 1) % 97) / 97.0) < 1e-6
    r = await gw.post("/v1/embeddings", {"model": "emb", "input": [1, 2, 3]})
    assert r.status_code == 400


async def test_embeddings_base64_from_float_backend(nursery):
    up = FakeUpstream(dimensions=4)
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(f"""
        [[backends]]
        name = "tei"
        url = "{up.url}"
        embeddings_encoding = "float"
        [[models]]
        name = "emb"
        backend = "tei"
        kind = "embedding"
    """))
    r = await gw.post("/v1/embeddings", {"model": "emb", "input": "x", "encoding_format": "base64"})
    assert up.requests[-1].json["encoding_format"] == "float"
    assert len(base64.b64decode(r.json()["data"][0]["embedding"])) == 16


async def test_chat_model_on_embeddings_endpoint_is_400(nursery):
    gw, a, b = await two(nursery)
    r = await gw.post("/v1/embeddings", {"model": "m-a", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_wrong_kind"


async def test_upstream_first_byte_timeout_is_504(nursery, autojump_clock):
    gw, up = await single(nursery, backend_extra="""timeouts = { first_byte = 2.0 }""")
    up.script(Hang())
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_first_byte_timeout"


async def test_access_log_line_fields(nursery):
    gw, a, b = await two(nursery)
    await gw.post("/v1/chat/completions", CHAT, headers={"X-HX-Model-Group": "hx-chat"})
    rec = await last_record(gw)
    for field in ("time", "request_id", "key", "model", "group", "deployment", "status", "bytes_in",
                  "bytes_out", "total_ms", "upstream_ms", "overhead_ms", "route", "generation"):
        assert field in rec, field
    assert rec["key"] == "dev" and rec["group"] == "hx-chat" and rec["status"] == 200
    assert abs(rec["overhead_ms"] - (rec["total_ms"] - rec["upstream_ms"])) < 0.01


async def test_concurrency_cap_queues_then_fails_over(nursery, autojump_clock):
    a, b = FakeUpstream(name="a"), FakeUpstream(name="b")
    await nursery.start(a.serve)
    await nursery.start(b.serve)
    gw = await start_gateway(nursery, two_backends(a, b).replace(
        'upstream_model = "real-a"', 'upstream_model = "real-a"\nmax_concurrency = 2\nmax_queue = 1\nqueue_timeout = 1.0'),
        environ={"A_KEY": "k"})
    a.default = Reply(delay=10)
    results = []

    async def one():
        r = await gw.post("/v1/chat/completions", CHAT, headers={"X-HX-Model-Group": "hx-chat"})
        results.append(r.headers["x-hx-deployment"])

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(one)
    assert a.max_in_flight == 2                       # never more than the cap reached upstream
    assert results.count("m-a@a") == 2 and results.count("m-b@b") == 3


async def test_admin_routing_table_needs_admin_key(nursery):
    gw, a, b = await two(nursery)
    await gw.post("/v1/chat/completions", CHAT, headers={"X-HX-Model-Group": "hx-chat"})
    r = await gw.get("/admin/routing")
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    gw2 = await start_gateway(nursery, two_backends(a, b).replace('sha256 = ', 'admin = true\nsha256 = '),
                              environ={"A_KEY": "k"})
    r = await gw2.get("/admin/routing")
    assert r.status_code == 200 and "hx-chat" in r.json()["targets"]


async def test_rpm_limit_is_429_with_retry_after_and_cost_recorded(nursery):
    up = FakeUpstream()
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(f"""
        [[keys]]
        name = "limited"
        key_env = "LIMITED"
        rpm = 2
        [[backends]]
        name = "u"
        url = "{up.url}"
        [[models]]
        name = "m"
        backend = "u"
        input_cost_per_1k = 1.0
        output_cost_per_1k = 2.0
    """), environ={"LIMITED": "sk-limited"})
    h = {"Authorization": "Bearer sk-limited"}
    for _ in range(2):
        r = await gw.client.post("/v1/chat/completions", json={**CHAT, "model": "m"}, headers=h)
        assert r.status_code == 200
    r = await gw.client.get("/v1/models", headers=h)           # every endpoint is admitted the same way
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_rpm"
    assert int(r.headers["retry-after"]) >= 1
    rec = await last_record(gw, 200)
    assert rec["cost_usd"] == pytest.approx((7 * 1.0 + 3 * 2.0) / 1000)
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})   # other keys are not limited
    assert r.status_code == 200


async def test_readyz_follows_active_probes(nursery, autojump_clock):
    gw, up = await single(nursery, backend_extra="""probe_path = "/v1/models"
        probe_interval = 1.0""")
    assert (await gw.client.get("/readyz")).status_code == 200
    await up.refuse()
    with trio.fail_after(60):
        while (r := await gw.client.get("/readyz")).status_code == 200:
            await trio.sleep(0.5)
    assert r.json()["reason"] == "no usable backend"
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    assert r.status_code == 503 and "retry-after" in r.headers
    await up.accept()
    with trio.fail_after(60):
        while (await gw.client.get("/readyz")).status_code != 200:
            await trio.sleep(0.5)


async def test_completions_endpoint(nursery):
    gw, a, b = await two(nursery)
    r = await gw.post("/v1/completions", {"model": "m-a", "prompt": "Return exactly the text: HX-OK"})
    assert r.status_code == 200 and a.requests[-1].path == "/v1/completions"
    assert a.requests[-1].json["model"] == "real-a"


async def test_pooled_connection_closed_by_upstream_is_resent_once(nursery):
    gw, a, b = await two(nursery)
    a.script(Reply(close_after=True))          # answers, then drops the kept-alive connection
    for _ in range(2):
        r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m-a"})
        assert r.status_code == 200 and "attempts=1" in r.headers["x-hx-route"]
    assert a.connections == 2 and len(a.requests) == 2 and b.requests == []


async def test_stalled_stream_is_cut_after_between_chunks(nursery, autojump_clock):
    gw, up = await single(nursery, backend_extra="""timeouts = { between_chunks = 5.0 }""")
    up.script(Stream(words=5, delay=30))
    with pytest.raises(httpx.RemoteProtocolError):
        await gw.post("/v1/chat/completions", {**CHAT, "model": "m", "stream": True})
    rec = await last_record(gw, 504)
    assert rec["error_type"] == "upstream_error"


async def test_slow_client_slows_its_upstream_read(nursery):
    gw, up = await single(nursery)
    up.script(Stream(words=2000, pad=16384))   # ~32 MB of events
    stream = await raw_stream_request(gw)
    await stream.receive_some(1000)             # the head arrived; now the client stops reading
    await trio.sleep(1.0)
    sent_while_stalled = up.chunks_sent
    assert sent_while_stalled < 400             # socket buffers only: the gateway does not hoard it
    await trio.sleep(0.5)
    assert up.chunks_sent - sent_while_stalled < 20
    await stream.aclose()                        # hanging up ends the upstream read at once
    with trio.fail_after(5):
        while not gw.log.requests():
            await trio.sleep(0.02)
    assert gw.log.requests()[-1]["status"] == 499


async def test_a_stream_cut_by_the_end_of_the_shutdown_grace_is_recorded_as_ours(nursery, autojump_clock):
    gw, up = await single(nursery, server_extra="shutdown_grace = 2.0")
    up.script(Stream(words=100, delay=1.0))
    stream = await raw_stream_request(gw)
    await stream.receive_some(1000)
    await gw.stop()                  # drains for 2 s, then cuts the stream off
    rec = gw.log.requests()[-1]
    assert (rec["status"], rec["error_type"], rec["fault"]) == (503, "service_unavailable", "gateway")
    await stream.aclose()


async def test_non_streamed_answer_stalling_after_its_head_is_504(nursery, autojump_clock):
    gw, up = await single(nursery, backend_extra="""timeouts = { between_chunks = 5.0 }""")
    up.script(Stream(words=5, delay=30))       # a head, one piece, then nothing for 30 s
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_read_timeout"


async def test_client_not_reading_is_dropped_after_write_timeout(nursery, autojump_clock):
    gw, up = await single(nursery, server_extra="write_timeout = 10.0")
    up.script(Stream(words=2000, pad=16384))   # ~32 MB of events, far more than socket buffers
    stream = await raw_stream_request(gw)
    await stream.receive_some(1000)             # then never read again
    began = trio.current_time()
    with trio.fail_after(60):
        while not gw.log.requests():
            await trio.sleep(0.5)
    assert gw.log.requests()[-1]["status"] == 499
    assert 10.0 <= trio.current_time() - began < 20.0
    assert up.chunks_sent < 2000
    await stream.aclose()


async def test_client_reading_slowly_but_steadily_is_not_dropped(nursery, autojump_clock):
    # write_timeout is for a client that takes nothing, not for one that takes a big answer slowly
    gw, up = await single(nursery, server_extra="write_timeout = 30.0")
    answer = b'{"pad": "' + b"x" * (12 << 20) + b'"}'     # one write, far more than socket buffers hold
    up.script(Reply(200, body=answer))
    stream = await trio.open_tcp_stream("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))
    body = json.dumps({**CHAT, "model": "m"}).encode()
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-hx-dev-1234\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = 0
    # 256 KiB a second: the write takes ~50 s, the kernel says "writable" every few seconds
    with trio.fail_after(1000):
        while received < len(answer):
            chunk = await stream.receive_some(65536)
            assert chunk, "dropped"
            received += len(chunk)
            await trio.sleep(0.25)
    await stream.aclose()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


async def test_https_backend_pooled_streamed_and_verified(nursery, tls_files):
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    up = FakeUpstream(tls=server_ctx)
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(f"""
        [[backends]]
        name = "trusted"
        url = "{up.url}"
        ca_file = "{cert}"
        [[backends]]
        name = "untrusted"
        url = "{up.url}"
        [[models]]
        name = "m"
        backend = "trusted"
        [[models]]
        name = "bad"
        backend = "untrusted"
    """))
    assert up.url.startswith("https://")
    for _ in range(2):
        r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "HX-OK"
    assert up.connections == 1                      # the second request reused the TLS connection
    async with gw.client.stream("POST", "/v1/chat/completions", headers=AUTH,
                                json={**CHAT, "model": "m", "stream": True}) as r:
        body = b"".join([chunk async for chunk in r.aiter_bytes()])
    assert r.status_code == 200 and body.rstrip().endswith(b"data: [DONE]")
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "bad"})   # not signed by a known CA
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_connect_failed"
    assert "HX-OK" not in r.text
