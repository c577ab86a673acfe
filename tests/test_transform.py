"""Transforms are pure: request dicts in, bytes out; upstream bytes in, client bytes out."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from hxgwd.config import load
from hxgwd.errors import BadRequest, UpstreamError
from hxgwd.pipeline import transform
from hxgwd.runtime import compile_config


def dep(**backend):
    fields = "\n".join(f"{k} = {json.dumps(v)}" for k, v in backend.items())
    rt = compile_config(load.loads(f"""
        [[backends]]
        name = "b"
        url = "http://h"
        {fields}
        [[models]]
        name = "pub"
        backend = "b"
        upstream_model = "up"
    """), 1)
    return next(iter(rt.deployments.values()))


def merged(plan: transform.CallPlan, bodies: list[bytes], max_bytes: int = 1 << 30) -> bytes:
    merge = transform.EmbeddingsMerge(plan, max_bytes)
    for i, body in enumerate(bodies):
        merge.add(i, body)
    return b"".join(merge.answer())


def test_chat_body_gets_upstream_model_and_stream_usage():
    plan = transform.plan_chat("/chat/completions", {"model": "pub", "stream": True, "messages": []}, dep(), "pub")
    body = json.loads(plan.bodies[0])
    assert body["model"] == "up" and body["stream_options"] == {"include_usage": True}
    assert plan.strip_stream_usage
    plan = transform.plan_chat("/chat/completions", {"model": "pub", "stream": True,
                                                      "stream_options": {"include_usage": True}}, dep(), "pub")
    assert not plan.strip_stream_usage
    plan = transform.plan_chat("/chat/completions", {"model": "pub", "stream": True}, dep(stream_usage=False), "pub")
    assert "stream_options" not in json.loads(plan.bodies[0])


def test_embeddings_input_renamed_and_split():
    plan = transform.plan_embeddings("/embeddings", {"model": "pub", "input": ["a", "b"], "encoding_format": "base64"},
                                dep(embeddings_input="prompt"), "pub")
    assert [json.loads(b) for b in plan.bodies] == [{"model": "up", "prompt": "a"}, {"model": "up", "prompt": "b"}]
    with pytest.raises(BadRequest):
        transform.plan_embeddings("/embeddings", {"model": "pub", "input": [[1, 2]]}, dep(embeddings_input="prompt"), "pub")


def test_single_vector_answers_merged_in_order_with_base64():
    plan = transform.plan_embeddings("/embeddings", {"model": "pub", "input": ["a", "b"], "encoding_format": "base64"},
                                dep(embeddings_input="prompt"), "pub")
    out = json.loads(merged(plan, [b'{"embedding":[1.0,0.0]}', b'{"embedding":[0.5,0.5]}']))
    assert out["object"] == "list" and out["model"] == "pub" and "usage" in out
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert struct.unpack("<2f", base64.b64decode(out["data"][1]["embedding"])) == (0.5, 0.5)


def test_float_answer_converted_only_when_client_asked_base64():
    asked = transform.plan_embeddings("/embeddings", {"model": "pub", "input": "x", "encoding_format": "base64"}, dep(), "pub")
    floats = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding": [0.25]}],"model":"up"}'
    out = json.loads(merged(asked, [floats]))
    assert struct.unpack("<f", base64.b64decode(out["data"][0]["embedding"])) == (0.25,)
    already = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":"AACAPg=="}]}'
    assert not transform.needs_merge(asked, already)         # relayed untouched
    plain = transform.plan_embeddings("/embeddings", {"model": "pub", "input": "x"}, dep(), "pub")
    assert not transform.needs_merge(plain, floats)


def test_usage_found_from_the_end():
    body = b'{"choices":[{"message":{"content":"\\"usage\\" is a word"}}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
    assert transform.usage_from_body(body) == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert transform.usage_from_body(b'{"a":1}') is None


def test_sse_relay_byte_exact_split_anywhere_and_usage_stripped():
    events = [b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n',
              b'data: {"choices":[{"delta":{"content":"b"}}]}\r\n\r\n',
              b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n',
              b"data: [DONE]\n\n"]
    stream = b"".join(events)
    for cut in range(1, len(stream)):
        relay = transform.SseRelay(strip_usage=True, max_event_bytes=1 << 20)
        out = relay.feed(stream[:cut]) + relay.feed(stream[cut:]) + relay.end()
        assert out == events[0] + events[1] + events[3]
        assert relay.usage == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    relay = transform.SseRelay(strip_usage=False, max_event_bytes=1 << 20)
    assert relay.feed(stream) == stream


def test_sse_lines_may_end_in_cr_lf_or_crlf_mixed_and_split_anywhere():
    events = [b'data: {"choices":[{"delta":{"content":"a"}}]}\r\r',             # lone CRs
              b'event: x\rdata: {"choices":[{"delta":{"content":"b"}}]}\r\n\n',   # CRLF, then LF
              b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\r\n',
              b"data: [DONE]\r\r\n"]                                              # CR, then CRLF
    stream = b"".join(events)
    for cut in range(1, len(stream)):
        relay = transform.SseRelay(strip_usage=True, max_event_bytes=1 << 20)
        first = relay.feed(stream[:cut])
        assert events[0].startswith(first) or first.startswith(events[0])   # whole events only
        out = first + relay.feed(stream[cut:])
        assert out == events[0] + events[1] + events[3], cut     # complete without waiting for end()
        assert relay.usage == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    relay = transform.SseRelay(strip_usage=False, max_event_bytes=1 << 20)
    assert relay.feed(b"data: a\r\n\r") == b""               # the LF of a CRLF may follow
    assert relay.feed(b"\ndata: b\n\n") == b"data: a\r\n\r\ndata: b\n\n"
    assert relay.events == 2


def test_usage_chunk_the_client_did_not_ask_for_goes_even_with_counts_that_are_not_counts():
    odd = b'data: {"choices":[],"usage":{"prompt_tokens":"7","completion_tokens":-1}}\n\n'
    relay = transform.SseRelay(strip_usage=True, max_event_bytes=1 << 20)
    assert relay.feed(odd + b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert relay.usage is None


def test_sse_event_bound():
    relay = transform.SseRelay(strip_usage=False, max_event_bytes=100)
    with pytest.raises(Exception):
        relay.feed(b"data: " + b"x" * 200)


def test_header_filters():
    up = transform.upstream_headers([(b"authorization", b"Bearer client"), (b"x-api-key", b"k"), (b"connection", b"x"),
                                     (b"x-hx-model-group", b"g"), (b"openai-organization", b"o")], dep(), b"rid")
    names = [n for n, _ in up]
    assert b"openai-organization" in names and b"x-hx-model-group" not in names
    assert (b"authorization", b"Bearer client") not in up and b"x-api-key" not in names
    down = transform.downstream_headers([(b"transfer-encoding", b"chunked"), (b"server", b"uvicorn"),
                                         (b"x-ratelimit-remaining-requests", b"9")])
    assert down == [(b"x-ratelimit-remaining-requests", b"9")]


def test_headers_listed_in_connection_are_hop_by_hop_both_ways():
    up = transform.upstream_headers([(b"connection", b"keep-alive, X-Trace"), (b"x-trace", b"t"),
                                     (b"x-kept", b"k")], dep(), b"rid")
    assert (b"x-kept", b"k") in up and b"x-trace" not in [n for n, _ in up]
    down = transform.downstream_headers([(b"connection", b"x-hop"), (b"x-hop", b"1"), (b"x-kept", b"2")])
    assert down == [(b"x-kept", b"2")]


def test_body_is_written_by_the_gateway_with_the_values_it_read():
    d = dep()    # public "pub", upstream "up"
    raw = '{"model": "up", "messages": [{"role": "user", "content": "say \\"model\\": 1.0 \u00e9"}], "temperature": 1.0}'.encode()
    (body,) = transform.plan_chat("/chat/completions", json.loads(raw), d, "pub").bodies
    assert json.loads(body) == json.loads(raw) and body.count(b'"model"') == 1
    assert "\u00e9".encode() in body      # non-ASCII text as UTF-8, not re-escaped


@pytest.mark.parametrize("raw, endpoint, backend", [
    (b'{"model": "pub", "messages": []}', "/chat/completions", {}),                 # renamed
    (b'{"model": "other", "model": "up", "messages": []}', "/chat/completions", {}),  # duplicate key
    (b'{"mod\\u0065l": "other", "model": "up", "messages": []}', "/chat/completions", {}),  # escaped twin
    (b'{"model": "up", "stream": true}', "/chat/completions", {}),                    # include_usage added
    (b'{"model": "up", "input": "x", "encoding_format": "base64"}', "/embeddings", {}),
    (b'{"model": "up", "input": "x"}', "/embeddings", {"embeddings_input": "prompt"}),
])
def test_every_body_has_one_model_the_upstream_name(raw, endpoint, backend):
    planner = transform.plan_embeddings if endpoint == "/embeddings" else transform.plan_chat
    plan = planner(endpoint, json.loads(raw), dep(**backend), "pub")
    assert all(body.count(b'"model"') == 1 and b"\\u" not in body for body in plan.bodies)
    assert all(json.loads(body).get("model") == "up" for body in plan.bodies)


def test_stream_asking_for_usage_itself_is_not_stripped():
    raw = b'{"model": "up", "stream": true, "stream_options": {"include_usage": true}}'
    plan = transform.plan_chat("/chat/completions", json.loads(raw), dep(), "pub")
    assert json.loads(plan.bodies[0]) == json.loads(raw) and plan.stream and not plan.strip_stream_usage


@pytest.mark.parametrize("key, found", [
    ("model", None), ("temperature", None), ("Temperature", None), ("messages", None),
    ("MODEL", "MODEL"), ("Stream", "Stream"), ("N", "N"), ("BEST_OF", "BEST_OF"),
    ("\u017ftream", "\u017ftream"), ("Input", "Input"), ("Max_Completion_Tokens", "Max_Completion_Tokens"),
])
def test_ambiguous_key(key, found):
    assert transform.ambiguous_key({"model": "m", key: 1}) == found


def test_a_lone_surrogate_escape_is_the_callers_400():
    with pytest.raises(BadRequest) as caught:
        transform.plan_chat("/chat/completions", {"model": "pub", "messages": "\ud800"}, dep(), "pub")
    assert caught.value.status == 400 and caught.value.code == "invalid_json"


def test_sse_relay_bounds_an_event_that_arrived_whole():
    relay = transform.SseRelay(False, 16)
    assert relay.feed(b"data: short\n\n") == b"data: short\n\n"
    with pytest.raises(UpstreamError):
        relay.feed(b"data: " + b"x" * 20 + b"\n\n")


def test_a_body_encoded_in_steps_is_the_same_bytes():
    payload = {"model": "pub", "messages": [{"role": "user", "content": "h\u00e9"}] * 3, "n": 2, "stop": ["a"]}
    assert (transform.plan_chat("/chat/completions", payload, dep(), "pub", in_steps=True).bodies
            == transform.plan_chat("/chat/completions", payload, dep(), "pub").bodies)
    with pytest.raises(BadRequest):
        transform.plan_chat("/chat/completions", {"model": "pub", "messages": ["\ud800"]}, dep(), "pub", in_steps=True)
