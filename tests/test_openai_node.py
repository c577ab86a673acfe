"""The official `openai` SDK for Node as the client: tests/node/client.mjs, run with `node`, reads a plan
of calls on stdin and prints what the SDK gave back; the gateway runs in-process, in front of the
echo backend or the fake upstream. The pinned SDK is in tests/node/package.json (`npm ci --prefix
tests/node` installs it; .ci/run does): openai 6.49.0, the last release that does not declare node >= 22,
because Debian 12's nodejs is 18.20 (client.mjs gives it the global File that 6.x uploads need).
HXGWD_TEST_NODE names another node binary to run it with."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import pytest
import trio

from tests.conftest import DEV_KEY, ROOT, RunningGateway, gateway_config, start_gateway
from tests.fakeupstream import FakeUpstream

NODE_DIR = os.path.join(ROOT, "tests", "node")
CLIENT = os.path.join(NODE_DIR, "client.mjs")
LIMITED_KEY = "sk-hx-limited-0002"


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which(os.environ.get("HXGWD_TEST_NODE", "node"))
    if found is None:
        pytest.skip("node is not on PATH (.ci/run installs Debian's nodejs)")
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "openai")):
        pytest.skip("tests/node/node_modules is missing: run `npm ci --prefix tests/node`")
    return found


async def run_client(node: str, gw: RunningGateway, calls: list[str], **plan: Any) -> dict[str, Any]:
    """Runs client.mjs with the plan; returns its results by call name."""
    doc = {"base_url": gw.url + "/v1", "key": DEV_KEY, "calls": calls, **plan}
    with trio.fail_after(90):
        done = await trio.run_process([node, CLIENT], stdin=json.dumps(doc).encode(), capture_stdout=True,
                                      capture_stderr=True, check=False, cwd=NODE_DIR)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    out = json.loads(done.stdout)
    assert out["sdk"] == pinned_sdk_version()
    results: dict[str, Any] = out["results"]
    return results


def pinned_sdk_version() -> str:
    with open(os.path.join(NODE_DIR, "package.json")) as f:
        return str(json.load(f)["dependencies"]["openai"])


async def access_log(gw: RunningGateway, expected: dict[str, int]) -> list[dict[str, Any]]:
    """The access-log records once there are at least `expected[endpoint]` of each; a line
    is written at the loop's next quiet moment after its answer (hxgwd/idle.py), so this waits a
    bounded while."""
    with trio.fail_after(5):
        while True:
            recs = gw.log.requests()
            if all(sum(1 for r in recs if r["endpoint"] == endpoint) >= n for endpoint, n in expected.items()):
                return recs
            await trio.sleep(0.01)


def no_errors(results: dict[str, Any]) -> None:
    failed = {name: r["error"] for name, r in results.items() if isinstance(r, dict) and r.get("error")
              and name != "bad_key"}
    assert not failed, failed


def tokens(usage: dict[str, Any] | None) -> bool:
    return bool(usage) and usage["total_tokens"] > 0          # type: ignore[index]


@pytest.fixture
async def every_kind(nursery):
    limited = f"""
        [[keys]]
        name = "limited"
        sha256 = "{hashlib.sha256(LIMITED_KEY.encode()).hexdigest()}"
        rpm = 2
    """
    return await start_gateway(nursery, gateway_config("""
        [[backends]]
        name = "echo"
        kind = "echo"
        echo_dimensions = 16
        [[models]]
        name = "chat"
        backend = "echo"
        [[models]]
        name = "emb"
        backend = "echo"
        kind = "embedding"
        [[models]]
        name = "mod"
        backend = "echo"
        kind = "moderation"
        [[models]]
        name = "tts"
        backend = "echo"
        kind = "speech"
        [[models]]
        name = "img"
        backend = "echo"
        kind = "image"
        [[models]]
        name = "stt"
        backend = "echo"
        kind = "transcription"
    """, limited))


ALL_CALLS = ["chat", "chat_stream", "embeddings", "responses_create", "responses_retrieve", "responses_stream",
             "responses_stream_create", "responses_delete", "moderations", "speech", "transcription", "images",
             "models", "bad_key"]


async def test_every_endpoint_through_the_node_sdk_against_the_echo_backend(node, every_kind):
    gw = every_kind
    res = await run_client(node, gw, ALL_CALLS)
    no_errors(res)

    chat = res["chat"]
    assert chat["content"] == "hello HX" and chat["object"] == "chat.completion" and chat["model"] == "chat"
    assert chat["finish_reason"] == "stop" and tokens(chat["usage"])

    stream = res["chat_stream"]
    assert stream["text"] == "one two three" and stream["finish_reason"] == "stop"
    # stream_options.include_usage: the last chunk has no choices and carries the usage
    assert stream["empty_choices"] == 1 and tokens(stream["usage"])
    assert stream["usage"]["prompt_tokens"] == 3 and stream["usage"]["completion_tokens"] == 3

    emb = res["embeddings"]
    assert emb["count"] == 2 and emb["dims"] == [16, 16] and tokens(emb["usage"])
    assert emb["first"] == pytest.approx(emb["float_first"], abs=1e-6)      # base64 decoded by the SDK

    made = res["responses_create"]
    assert made["output_text"] == "hello responses" and made["status"] == "completed" and tokens(made["usage"])
    assert res["responses_retrieve"] == {"id": made["id"], "output_text": "hello responses"}
    streamed = res["responses_stream"]
    assert "".join(streamed["deltas"]).split() == ["one", "two", "three"]
    assert streamed["output_text"].split() == ["one", "two", "three"] and tokens(streamed["usage"])
    assert streamed["types"][0] == "response.created" and streamed["types"][-1] == "response.completed"
    raw = res["responses_stream_create"]
    assert raw["text"].split() == ["four", "five", "six", "seven"] and tokens(raw["usage"])
    gone = res["responses_delete"]
    assert gone["deleted"]["id"] == made["id"] and gone["deleted"]["deleted"] is True
    assert gone["after"]["class"] == "NotFoundError" and gone["after"]["status"] == 404

    assert res["moderations"]["flagged"] == [False, True]
    speech = res["speech"]
    assert speech["status"] == 200 and speech["head"][:4] == "RIFF" and speech["head"][8:12] == "WAVE"
    assert speech["content_type"] == "audio/wav" and speech["length"] > 44
    assert res["transcription"]["text"]
    images = res["images"]
    assert images["count"] == 2 and all(p == "89504e470d0a1a0a" for p in images["png"])
    assert sorted(res["models"]["ids"]) == ["chat", "emb", "img", "mod", "stt", "tts"]

    bad = res["bad_key"]
    assert bad["error"]["class"] == "AuthenticationError" and bad["error"]["status"] == 401
    assert bad["authentication_error"] and bad["api_error"]

    recs = await access_log(gw, {"/v1/chat/completions": 2, "/v1/embeddings": 2, "/v1/responses": 3,
                                 "/v1/models": 2})

    def ok(endpoint: str) -> list[dict[str, Any]]:
        return [r for r in recs if r["endpoint"] == endpoint and r["status"] == 200]

    chats = ok("/v1/chat/completions")
    assert [r["stream"] for r in chats] == [False, True]
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in chats] == [(2, 2), (3, 3)]
    assert all(r["total_tokens"] > 0 for r in chats + ok("/v1/embeddings"))
    responses = ok("/v1/responses")
    assert [r["stream"] for r in responses] == [False, True, True]
    assert [r["total_tokens"] for r in responses] == [4, 6, 8]     # words in and out: the echo's usage
    assert all(r["key"] == "dev" for r in recs if r["status"] == 200)
    assert any(r["status"] == 401 for r in recs)


async def test_fetching_a_stored_response_spends_no_tokens(node, every_kind):
    gw = every_kind
    res = await run_client(node, gw, ["responses_create", "responses_retrieve"])
    no_errors(res)
    path = "/v1/responses/{id}"          # one endpoint for every id
    recs = await access_log(gw, {"/v1/responses": 1, path: 1})
    made, fetched = [r for r in recs if r["endpoint"] in ("/v1/responses", path)]
    assert made["total_tokens"] > 0 and fetched["status"] == 200
    assert fetched.get("total_tokens") is None


async def test_a_key_over_its_rpm_gets_the_sdks_rate_limit_error(node, every_kind):
    gw = every_kind
    res = await run_client(node, gw, ["rate_limit"], key=LIMITED_KEY)
    first, second, third = res["rate_limit"]["outcomes"]
    assert first["content"] == second["content"] == "hello HX"
    assert third["error"]["class"] == "RateLimitError" and third["error"]["status"] == 429
    assert third["error"]["code"] == "rate_limit_rpm" and third["error"]["type"] == "rate_limit_error"
    assert third["retry_after"] is not None and float(third["retry_after"]) > 0
    recs = await access_log(gw, {"/v1/chat/completions": 3})
    assert [(r["key"], r["status"]) for r in recs] == [("limited", 200), ("limited", 200), ("limited", 429)]
    assert recs[2].get("fault") == "policy" and recs[0]["total_tokens"] > 0


async def test_streams_through_the_node_sdk_against_the_fake_upstream(node, nursery):
    up = FakeUpstream()
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(f"""
        [[backends]]
        name = "u"
        url = "{up.url}"
        [[models]]
        name = "chat"
        backend = "u"
        upstream_model = "up-chat"
    """))
    res = await run_client(node, gw, ["chat_stream", "responses_stream", "responses_stream_create"])
    no_errors(res)
    words = "w0 w1 w2 w3 w4 "                                  # the fake's Stream(): five pieces
    chat = res["chat_stream"]
    assert chat["text"] == words and chat["finish_reason"] == "stop" and chat["empty_choices"] == 1
    assert chat["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    streamed = res["responses_stream"]
    assert "".join(streamed["deltas"]) == words and streamed["output_text"] == words
    assert streamed["types"][0] == "response.created" and streamed["types"][-1] == "response.completed"
    assert streamed["usage"]["total_tokens"] == 12
    assert res["responses_stream_create"] == {"text": words, "usage": streamed["usage"]}

    sent = [(r.path, r.json["model"], r.json["stream"]) for r in up.requests]
    assert sent == [("/v1/chat/completions", "up-chat", True)] + [("/v1/responses", "up-chat", True)] * 2
    assert up.requests[0].json["stream_options"] == {"include_usage": True}

    recs = await access_log(gw, {"/v1/chat/completions": 1, "/v1/responses": 2})
    assert [(r["endpoint"], r["status"], r["stream"], r["deployment"]) for r in recs] == \
        [("/v1/chat/completions", 200, True, "chat@u")] + [("/v1/responses", 200, True, "chat@u")] * 2
    assert [(r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) for r in recs] == [(7, 5, 12)] * 3
