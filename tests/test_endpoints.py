"""The endpoint table (pipeline/endpoints.py): its shape without sockets, then each kind of entry
through a running gateway against the fake upstream."""

from __future__ import annotations

import hashlib
import json
import typing

import pytest
import trio

from hxgwd.config.model import Model
from hxgwd.pipeline.endpoint import Endpoint, Table
from hxgwd.pipeline.endpoints import ENDPOINTS, KINDS, TABLE
from tests.conftest import AUTH, gateway_config, start_gateway
from tests.fakeupstream import FakeUpstream, Hang, Raw, Reply
from tests.test_gateway import CHAT, last_record


def test_every_model_kind_is_served_and_every_served_kind_is_configurable():
    served = {ep.kind for ep in ENDPOINTS if ep.kind is not None}
    configurable = set(typing.get_args(typing.get_type_hints(Model)["kind"]))
    assert served == set(KINDS) == configurable


def test_proxied_entries_say_everything_the_stages_need():
    for ep in ENDPOINTS:
        if ep.model_from == "json":
            assert ep.kind and ep.plan and ep.estimate and ep.upstream, ep.name
        if ep.model_from == "multipart":
            assert ep.kind and ep.upstream, ep.name
        assert ep.methods and ep.paths, ep.name
    assert len({ep.name for ep in ENDPOINTS}) == len(ENDPOINTS)


@pytest.mark.parametrize("path, name, rest", [
    ("/v1/chat/completions", "chat.completions", ""), ("/chat/completions", "chat.completions", ""),
    ("/v1/embeddings", "embeddings", ""), ("/embeddings", "embeddings", ""),
    ("/v1/models", "models", ""), ("/v1/models/org/m", "models", "org/m"),
    ("/v1/responses", "responses", ""), ("/v1/responses/resp_1", "responses.stored", "resp_1"),
    ("/v1/responses/resp_1/input_items", "responses.stored", "resp_1/input_items"),
    ("/v1/rerank", "rerank", ""), ("/rerank", "rerank", ""), ("/v2/rerank", "rerank.v2", ""),
    ("/v1/files", "unsupported", ""), ("/v1/batches/b1", "unsupported", "b1"),
    ("/admin/keys", "admin.keys", ""), ("/admin/keys/k", "admin.key", "k"), ("/admin/nope", "admin.unknown", "nope"),
    ("/healthz", "health", ""),
])
def test_table_finds_exact_paths_then_the_longest_prefix(path, name, rest):
    found = TABLE.find(path)
    assert found is not None and (found.endpoint.name, found.rest) == (name, rest)


@pytest.mark.parametrize("path", ["/v1/chat", "/v1/chat/completions/", "/v1/models/", "/v1/responses/", "/", "/v1"])
def test_table_does_not_guess(path):
    assert TABLE.find(path) is None


def test_two_entries_cannot_claim_one_path():
    one = ENDPOINTS[0]
    with pytest.raises(ValueError):
        Table([one, Endpoint(name="twin", paths=one.paths, methods=("GET",), serve=one.serve)])


KINDS_CONFIG = """
    [[backends]]
    name = "u"
    url = "{url}"
    [[models]]
    name = "chat"
    backend = "u"
    upstream_model = "up-chat"
    [[models]]
    name = "mod"
    backend = "u"
    kind = "moderation"
    [[models]]
    name = "rr"
    backend = "u"
    kind = "rerank"
    upstream_model = "up-rr"
    [[models]]
    name = "tts"
    backend = "u"
    kind = "speech"
    [[models]]
    name = "img"
    backend = "u"
    kind = "image"
"""
OTHER_KEY = "sk-hx-other-5678"


async def kinds_gateway(nursery):
    up = FakeUpstream()
    await nursery.start(up.serve)
    extra = f"""
        [[keys]]
        name = "other"
        sha256 = "{hashlib.sha256(OTHER_KEY.encode()).hexdigest()}"
    """
    return await start_gateway(nursery, gateway_config(KINDS_CONFIG.format(url=up.url), extra)), up


async def test_paths_without_v1_are_aliases(nursery):
    gw, up = await kinds_gateway(nursery)
    r = await gw.post("/chat/completions", {**CHAT, "model": "chat"})
    assert r.status_code == 200 and up.requests[-1].path == "/v1/chat/completions"
    assert up.requests[-1].json["model"] == "up-chat"


async def test_stateful_openai_apis_are_a_404_that_says_so(nursery):
    gw, up = await kinds_gateway(nursery)
    assert (await gw.client.get("/v1/files")).status_code == 401      # no key: nothing said
    for path in ("/v1/files", "/v1/batches", "/v1/batches/batch_1", "/v1/assistants"):
        r = await gw.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unsupported_endpoint", path
        assert "not served by this gateway" in r.json()["error"]["message"]
    assert not up.requests


@pytest.mark.parametrize("path, model, body", [
    ("/v1/moderations", "mod", {"input": "hello"}),
    ("/v1/rerank", "rr", {"query": "q", "documents": ["a", "b"]}),
    ("/rerank", "rr", {"query": "q", "documents": ["a"]}),
    ("/v1/images/generations", "img", {"prompt": "a cat", "n": 1}),
])
async def test_json_endpoints_are_proxied_with_the_upstream_model_and_recorded(nursery, path, model, body):
    gw, up = await kinds_gateway(nursery)
    answer = {"id": "x-1", "results": [], "usage": {"input_tokens": 4, "output_tokens": 2, "total_tokens": 6}}
    up.script(Reply(body=answer))
    r = await gw.post(path, {**body, "model": model})
    assert r.status_code == 200 and r.json() == answer
    sent = up.requests[-1]
    assert sent.path == "/v1" + path.removeprefix("/v1") and sent.json["model"] == ("up-rr" if model == "rr" else model)
    rec = await last_record(gw)
    assert (rec["endpoint"], rec["model"], rec["prompt_tokens"], rec["completion_tokens"]) == (path, model, 4, 2)


async def test_a_model_of_another_kind_is_a_clear_400(nursery):
    gw, up = await kinds_gateway(nursery)
    r = await gw.post("/v1/moderations", {"model": "chat", "input": "x"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "model_wrong_kind" and err["param"] == "model"
    assert err["message"] == "'chat' is a chat model; this endpoint needs a moderation model."
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "rr"})
    assert r.status_code == 400 and "a rerank model" in r.json()["error"]["message"]
    assert not up.requests


async def test_speech_audio_is_relayed_as_it_comes_without_a_content_length(nursery):
    gw, up = await kinds_gateway(nursery)
    audio = bytes(range(256)) * 8192          # 2 MiB
    up.script(Raw(b"HTTP/1.1 200 OK\r\ncontent-type: audio/wav\r\ntransfer-encoding: chunked\r\n\r\n"
                  b"%x\r\n%b\r\n0\r\n\r\n" % (len(audio), audio), then="close"))
    async with gw.client.stream("POST", "/v1/audio/speech", headers=AUTH,
                                json={"model": "tts", "input": "hello there", "voice": "alloy"}) as r:
        got = b"".join([piece async for piece in r.aiter_bytes()])
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        assert "content-length" not in r.headers and r.headers["x-hx-deployment"] == "tts@u"
    assert got == audio
    rec = await last_record(gw)
    assert rec["bytes_out"] == len(audio) and rec["status"] == 200


RESPONSE = {"id": "resp_abc", "object": "response", "status": "completed", "model": "up-chat", "output": [],
            "usage": {"input_tokens": 11, "output_tokens": 5, "total_tokens": 16}}


async def test_responses_are_proxied_and_fetched_back_from_the_deployment_that_made_them(nursery):
    gw, up = await kinds_gateway(nursery)
    up.script(Reply(body=RESPONSE))
    r = await gw.post("/v1/responses", {"model": "chat", "input": "hi"})
    assert r.status_code == 200 and r.json()["id"] == "resp_abc"
    rec = await last_record(gw)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"]) == (11, 5, 16)

    up.script(Reply(body=RESPONSE))
    r = await gw.get("/v1/responses/resp_abc?include=x")
    assert r.status_code == 200 and r.json()["id"] == "resp_abc"
    assert (up.requests[-1].method, up.requests[-1].path) == ("GET", "/v1/responses/resp_abc?include=x")
    # another key: as if it did not exist
    r = await gw.client.get("/v1/responses/resp_abc", headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"

    up.script(Reply(body={"id": "resp_abc", "object": "response", "deleted": True}))
    r = await gw.client.delete("/v1/responses/resp_abc", headers=AUTH)
    assert r.status_code == 200 and up.requests[-1].method == "DELETE"
    r = await gw.get("/v1/responses/resp_abc")
    assert r.status_code == 404 and len(up.requests) == 3


def sse(*events: dict) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in events)


async def test_a_streamed_response_is_relayed_with_usage_from_response_completed(nursery):
    gw, up = await kinds_gateway(nursery)
    created = {**RESPONSE, "id": "resp_s1", "status": "in_progress", "usage": None}
    body = sse({"type": "response.created", "sequence_number": 0, "response": created},
               {"type": "response.output_text.delta", "sequence_number": 1, "delta": "hi"},
               {"type": "response.completed", "sequence_number": 2, "response": {**RESPONSE, "id": "resp_s1"}})
    up.script(Raw(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%b"
                  % (len(body), body), then="close"))
    r = await gw.post("/v1/responses", {"model": "chat", "input": "hi", "stream": True})
    assert r.status_code == 200 and r.content == body
    rec = await last_record(gw)
    assert rec["stream"] is True and (rec["prompt_tokens"], rec["completion_tokens"]) == (11, 5)
    up.script(Reply(body={**RESPONSE, "id": "resp_s1"}))
    assert (await gw.get("/v1/responses/resp_s1")).status_code == 200     # its id was noted from the stream


async def test_a_request_that_failed_everywhere_names_every_deployment_tried(nursery):
    a, b = FakeUpstream(), FakeUpstream()
    await nursery.start(a.serve)
    await nursery.start(b.serve)
    gw = await start_gateway(nursery, gateway_config(f"""
        [[backends]]
        name = "a"
        url = "{a.url}"
        [[backends]]
        name = "b"
        url = "{b.url}"
        [[models]]
        name = "m"
        backend = "a"
        [[models]]
        name = "m"
        backend = "b"
        [groups.g]
        models = ["m"]
        strategy = "priority"
    """))
    a.script(Reply(503))
    b.script(Reply(503))
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "g"})
    assert r.status_code == 503        # the last upstream answer, passed through
    assert r.headers["x-hx-deployment"] == "m@a, m@b" and "attempts=2" in r.headers["x-hx-route"]
    await a.refuse()
    await b.refuse()
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "g"})
    assert r.status_code == 502 and sorted(r.headers["x-hx-deployment"].split(", ")) == ["m@a", "m@b"]
    assert r.json()["error"]["type"]


async def test_a_backends_total_timeout_bounds_its_attempt_and_the_next_one_serves(nursery, autojump_clock):
    a, b = FakeUpstream(), FakeUpstream()
    await nursery.start(a.serve)
    await nursery.start(b.serve)
    gw = await start_gateway(nursery, gateway_config(f"""
        [[backends]]
        name = "a"
        url = "{a.url}"
        timeouts = {{ total = 3.0 }}
        [[backends]]
        name = "b"
        url = "{b.url}"
        [[models]]
        name = "m"
        backend = "a"
        [[models]]
        name = "m"
        backend = "b"
        [groups.g]
        models = ["m"]
        strategy = "priority"
    """))
    a.script(Hang())
    started = trio.current_time()
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "g"})
    assert r.status_code == 200 and r.headers["x-hx-deployment"] == "m@b"
    assert 3.0 <= trio.current_time() - started < 10       # not first_byte's 300 s


def test_every_proxied_endpoint_has_an_echo_answer():
    from hxgwd.upstream.echo import ECHO_ANSWERS

    missing = {ep.upstream for ep in ENDPOINTS if ep.model_from != "none"} - set(ECHO_ANSWERS)
    assert not missing


TRANSCRIBE = """
    [[backends]]
    name = "u"
    url = "{url}"
    [[models]]
    name = "stt"
    backend = "u"
    kind = "transcription"
    upstream_model = "whisper-large-v3"
"""


async def test_a_transcription_form_goes_upstream_with_the_upstream_model_and_the_file_as_it_was(nursery):
    up = FakeUpstream()
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(TRANSCRIBE.format(url=up.url)))
    audio = bytes(range(256)) * 400 + b"\r\n--not-a-boundary\r\n"
    up.script(Reply(body={"text": "hello", "usage": {"type": "tokens", "input_tokens": 9, "output_tokens": 2,
                                                      "total_tokens": 11}}))
    for path in ("/v1/audio/transcriptions", "/audio/translations"):
        r = await gw.client.post(path, headers=AUTH, data={"model": "stt", "language": "en"},
                                 files={"file": ("a.wav", audio, "audio/wav")})
        assert r.status_code == 200, r.text
        sent = up.requests[-1]
        assert sent.path == "/v1" + path.removeprefix("/v1")
        assert sent.form["model"] == "whisper-large-v3" and sent.form["language"] == "en"
        assert sent.form["file"].data == audio and sent.form["file"].filename == "a.wav"
        assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")
    rec = await last_record(gw, endpoint="/v1/audio/transcriptions")
    assert (rec["model"], rec["prompt_tokens"], rec["completion_tokens"]) == ("stt", 9, 2)


async def test_a_transcription_form_that_is_not_one_is_a_clear_400(nursery):
    up = FakeUpstream()
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(TRANSCRIBE.format(url=up.url)))
    r = await gw.post("/v1/audio/transcriptions", {"model": "stt"})        # JSON, not a form
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"
    r = await gw.client.post("/v1/audio/transcriptions", headers=AUTH, files={"file": ("a.wav", b"x")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_model"
    r = await gw.client.post("/v1/audio/transcriptions", headers=AUTH, data={"model": "nope"},
                             files={"file": ("a.wav", b"x")})
    assert r.status_code == 404
    assert not up.requests


async def test_uploads_have_their_own_bound(nursery):
    up = FakeUpstream()
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(TRANSCRIBE.format(url=up.url)).replace(
        'listen = ["127.0.0.1:0"]\n', 'listen = ["127.0.0.1:0"]\nmax_body_bytes = 1000\nmax_upload_bytes = 50000\n', 1))
    ok = await gw.client.post("/v1/audio/transcriptions", headers=AUTH, data={"model": "stt"},
                              files={"file": ("a.wav", bytes(20000))})
    assert ok.status_code == 200                       # past max_body_bytes: an upload's bound is its own
    big = await gw.client.post("/v1/audio/transcriptions", headers=AUTH, data={"model": "stt"},
                               files={"file": ("a.wav", bytes(60000))})
    assert big.status_code == 413 and len(up.requests) == 1
    r = await gw.post("/v1/chat/completions", {"model": "stt", "input": "x" * 2000})
    assert r.status_code == 413                        # JSON keeps max_body_bytes


async def test_a_streamed_transcription_is_relayed_with_its_usage(nursery):
    up = FakeUpstream()
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(TRANSCRIBE.format(url=up.url)))
    async with gw.client.stream("POST", "/v1/audio/transcriptions", headers=AUTH,
                                data={"model": "stt", "stream": "true"},
                                files={"file": ("a.wav", b"RIFF" + bytes(3000), "audio/wav")}) as r:
        body = b"".join([piece async for piece in r.aiter_bytes()])
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert b"transcript.text.delta" in body and b"transcript.text.done" in body
    rec = await last_record(gw, endpoint="/v1/audio/transcriptions")
    assert rec["stream"] is True and rec.get("total_tokens", 0) > 0
