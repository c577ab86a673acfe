"""Upstreams that break HTTP or send answers that cannot be used, through the whole gateway: the
client gets a clean error (or the next deployment's answer), never someone else's answer, a
truncated one, or a 500 of ours."""

from __future__ import annotations

import json

import trio

from tests.fakeupstream import Raw, Reply
from tests.test_gateway import AUTH, CHAT, single, two

SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def answer(text: str, *, framed: bool = True) -> bytes:
    body = json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}).encode()
    length = b"content-length: %d\r\n" % len(body) if framed else b""     # else: ends with the connection
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n%s\r\n%s" % (length, body)


def content(r) -> str:
    return r.json()["choices"][0]["message"]["content"]


async def test_bytes_after_an_answer_never_answer_the_next_request(nursery):
    gw, up = await single(nursery)
    up.script(Raw(answer("A") + answer("EVIL")))
    assert content(await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})) == "A"
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    assert r.status_code == 200 and content(r) != "EVIL"


async def test_an_answer_to_nothing_on_an_idle_connection_is_not_taken_for_the_next(nursery, autojump_clock):
    gw, up = await single(nursery)
    up.script(Raw(answer("A"), later=answer("EVIL"), later_delay=0.5))
    assert content(await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})) == "A"
    await trio.sleep(2)              # the unasked-for answer is in the idle connection by now
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    assert r.status_code == 200 and content(r) != "EVIL"


async def test_a_reset_before_a_close_delimited_body_ends_is_a_502_not_a_short_200(nursery):
    gw, up = await single(nursery)
    up.script(Raw(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{"choices": [', then="reset"))
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
    up.script(Raw(answer("whole", framed=False), then="close"))
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})    # ended by a clean close
    assert r.status_code == 200 and content(r) == "whole"


async def test_informational_answers_before_the_answer_are_skipped(nursery):
    gw, up = await single(nursery)
    up.script(Raw(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + answer("after hints")))
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    assert r.status_code == 200 and content(r) == "after hints"


async def test_a_retry_after_of_zero_or_nan_does_not_dodge_the_breaker(nursery):
    gw, a, b = await two(nursery, extra="[routing]\nbreaker_failures = 2\n")
    a.default = Reply(500, headers=[("retry-after", "0")])
    routes = []
    for i in range(6):
        if i == 3:
            a.default = Reply(500, headers=[("retry-after", "nan")])
        r = await gw.post("/v1/chat/completions", CHAT, headers={"X-HX-Model-Group": "hx-chat"})
        assert r.status_code == 200
        routes.append(r.headers["x-hx-route"].split("; ")[1])
    assert routes[2:] == ["attempts=1"] * 4         # a is skipped once its breaker opened


async def test_unusable_embeddings_answers_are_502_and_fail_over(nursery):
    gw, up = await single(nursery, backend_extra='embeddings_input = "prompt"', model_extra='kind = "embedding"')
    for body, fmt in ((b'{"embedding": ["x", 1]}', "base64"), (b'{"embedding": [1e39]}', "base64"),
                      (b'{"embedding": [NaN]}', "float"), (b'{"data": [{"index": "1", "embedding": [1]}, '
                                                           b'{"index": 0, "embedding": ["x"]}]}', "base64")):
        up.script(Reply(200, body=body))
        r = await gw.post("/v1/embeddings", {"model": "m", "input": "a", "encoding_format": fmt})
        assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error", body
    up.script(Reply(200, body={"embedding": [0.5], "usage": {"prompt_tokens": "abc", "total_tokens": -1}}))
    r = await gw.post("/v1/embeddings", {"model": "m", "input": "a"})
    assert r.status_code == 200 and r.json()["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    assert [line for line in gw.log.lines() if line["level"] == "error"] == []


async def test_a_caller_error_on_any_item_of_a_split_embeddings_call_is_passed_through(nursery):
    gw, up = await single(nursery, backend_extra='embeddings_input = "prompt"', model_extra='kind = "embedding"')
    up.script(Reply(200, body={"embedding": [0.5]}),
              Reply(404, body={"error": {"message": "no such model", "type": "invalid_request_error",
                                         "param": None, "code": "model_not_found"}}))
    r = await gw.post("/v1/embeddings", {"model": "m", "input": ["a", "b"]})
    assert r.status_code == 404 and r.json()["error"]["message"] == "no such model"


async def test_a_stream_that_breaks_before_its_first_event_fails_over(nursery, autojump_clock):
    gw, a, b = await two(nursery, extra="[timeouts]\nbetween_chunks = 5.0\n")
    for broken in (Raw(SSE_HEAD), Raw(SSE_HEAD, then="reset")):      # stalls; resets
        a.script(broken)
        async with gw.client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                                    headers={**AUTH, "X-HX-Model-Group": "hx-chat"}) as r:
            body = b"".join([chunk async for chunk in r.aiter_raw()])
        assert r.status_code == 200 and r.headers["x-hx-deployment"] == "m-b@b"
        assert body.endswith(b"data: [DONE]\n\n")


async def test_a_backend_refusing_the_gateways_key_fails_over_and_never_reaches_the_client(nursery):
    gw, a, b = await two(nursery)
    refused = {"error": {"message": "Incorrect API key provided: sk-back****-a", "type": "invalid_request_error",
                         "param": None, "code": "invalid_api_key"}}
    a.script(Reply(401, body=refused))
    r = await gw.post("/v1/chat/completions", CHAT, headers={"X-HX-Model-Group": "hx-chat"})
    assert r.status_code == 200 and r.headers["x-hx-deployment"] == "m-b@b"
    a.script(Reply(403, body=refused))
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m-a"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_failed"
    assert b"sk-back" not in r.content


async def test_a_request_is_resent_only_when_its_reused_connection_failed_at_once(nursery, autojump_clock):
    gw, up = await single(nursery)
    assert (await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})).status_code == 200
    up.script(Raw(b"", then="close"))             # closed as our request arrived: resent
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    assert r.status_code == 200 and len(up.requests) == 3
    up.script(Raw(b"", then="close", delay=5))    # read it, worked on it, died: never run twice
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    assert r.status_code == 502 and len(up.requests) == 4
