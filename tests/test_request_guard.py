"""What reaches the upstream is what the gateway authorised, routed and counted (issue 14, points
5 and 10): one body the gateway wrote, with exactly one `model`; no key a backend could read as a
second `model`, `stream` or `n`; no path probed without a key; no 200 head on a stream that could
still fail over."""

from __future__ import annotations

import json

import pytest

from tests.conftest import AUTH, gateway_config, start_gateway
from tests.fakeupstream import FakeUpstream, Raw, Stream


async def narrow_gateway(nursery, *backends):
    """A key allowed only `m-up`; `m-up` on the first upstream, `gpt-4-very-expensive` on the last."""
    first, last = backends[0], backends[-1]
    gw = await start_gateway(nursery, gateway_config(f"""
        [[keys]]
        name = "narrow"
        key_env = "NARROW"
        models = ["m-up"]
        [[backends]]
        name = "u"
        url = "{first.url}"
        [[backends]]
        name = "v"
        url = "{last.url}"
        [[models]]
        name = "m-up"
        backend = "u"
        [[models]]
        name = "gpt-4-very-expensive"
        backend = "v"
    """), environ={"NARROW": "sk-narrow"})
    return gw


async def post(gw, body: bytes, key: str = "sk-narrow"):
    return await gw.client.post("/v1/chat/completions", content=body,
                                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


MESSAGES = '"messages":[{"role":"user","content":"hi"}]'


@pytest.mark.parametrize("body", [
    # the same key twice, once escaped: Python keeps the last, other parsers the first
    '{"model":"gpt-4-very-expensive","mod\\u0065l":"m-up",' + MESSAGES + '}',
    '{"model":"gpt-4-very-expensive","model":"m-up",' + MESSAGES + '}',
    '{"mod\\u0065l":"gpt-4-very-expensive","model":"m-up",' + MESSAGES + '}',
])
async def test_duplicate_model_keys_reach_the_upstream_as_one(nursery, upstream, body):
    gw = await narrow_gateway(nursery, upstream, upstream)
    r = await post(gw, body.encode())
    assert r.status_code == 200
    (got,) = upstream.requests
    text = got.body.decode()
    assert text.count('"model"') == 1 and "\\u" not in text and "gpt-4-very-expensive" not in text
    assert got.json["model"] == "m-up"


@pytest.mark.parametrize("key", ["MODEL", "Model", "mod\\u0045l", "STREAM", "N", "Max_Tokens", "ſtream"])
async def test_a_key_that_case_folds_to_a_routing_field_is_refused(nursery, upstream, key):
    gw = await narrow_gateway(nursery, upstream, upstream)
    r = await post(gw, ('{"model":"m-up","' + key + '":"gpt-4-very-expensive",' + MESSAGES + '}').encode())
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "ambiguous_parameter" and error["type"] == "invalid_request_error"
    assert error["param"] == json.loads(f'"{key}"')
    assert upstream.requests == []


async def test_duplicate_stream_and_n_are_sent_as_the_gateway_read_them(nursery, upstream):
    gw = await narrow_gateway(nursery, upstream, upstream)
    r = await post(gw, ('{"model":"m-up","n":10,"n":1,"stream":true,"stream":false,' + MESSAGES + '}').encode())
    assert r.status_code == 200
    (got,) = upstream.requests
    assert got.body.count(b'"n"') == 1 and got.body.count(b'"stream"') == 1
    assert got.json["n"] == 1 and got.json["stream"] is False


async def test_unknown_paths_need_a_key_before_they_answer_404(nursery, upstream):
    gw = await narrow_gateway(nursery, upstream, upstream)
    for path in ("/v1/nothing", "/admin/nothing", "/v2/chat/completions", "/favicon.ico"):
        r = await gw.client.get(path)
        assert r.status_code == 401, path
        r = await gw.client.get(path, headers=AUTH)
        assert r.status_code == (403 if path.startswith("/admin/") else 404), path   # not an admin key
    r = await gw.client.get("/v1/chat/completions")        # no method hint without a key either
    assert r.status_code == 401
    assert (await gw.client.get("/healthz")).status_code == 200


async def test_a_first_stream_event_too_large_fails_over_before_the_head(nursery):
    first, second = FakeUpstream(), FakeUpstream()
    await nursery.start(first.serve)
    await nursery.start(second.serve)
    gw = await start_gateway(nursery, gateway_config(f"""
        [[backends]]
        name = "a"
        url = "{first.url}"
        [[backends]]
        name = "b"
        url = "{second.url}"
        [[models]]
        name = "m"
        backend = "a"
        [[models]]
        name = "m"
        backend = "b"
        [groups.g]
        models = ["m"]
        strategy = "priority"
    """).replace(
        'listen = ["127.0.0.1:0"]\n', 'listen = ["127.0.0.1:0"]\nmax_sse_event_bytes = 4096\n', 1))
    huge = b"data: {" + b'"x":"' + b"y" * 20000 + b'"}\n\n'
    first.script(Raw(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n" + hex(len(huge))[2:].encode() + b"\r\n" + huge
                     + b"\r\n0\r\n\r\n", then="close"))
    second.script(Stream(words=3))
    r = await gw.post("/v1/chat/completions", {"model": "g", "stream": True,
                                                "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert r.headers["x-hx-deployment"] == "m@b"
    assert r.text.rstrip().endswith("data: [DONE]")
