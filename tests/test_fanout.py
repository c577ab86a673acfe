"""Embeddings fan-out (`embeddings_input = "prompt"`: one upstream call per input), through the
gateway on real sockets: capped, concurrent, bounded, and charged when cut short."""

from __future__ import annotations

import json
import time

import pytest
import trio

from tests.conftest import gateway_config, start_gateway
from tests.fakeupstream import FakeUpstream, Reply, _vector
from tests.test_gateway import last_record


async def prompt_gateway(nursery, *, dimensions: int = 8, backend_extra: str = "", server_extra: str = "",
                         key_extra: str = "", model_extra: str = "", environ: dict | None = None):
    """The gateway in front of an Ollama-like upstream (one text per call): model "emb"."""
    up = FakeUpstream(prompt_only_embeddings=True, dimensions=dimensions)
    await nursery.start(up.serve)
    config = gateway_config(f"""
        {key_extra}
        [[backends]]
        name = "u"
        url = "{up.url}"
        embeddings_input = "prompt"
        {backend_extra}
        [[models]]
        name = "emb"
        backend = "u"
        kind = "embedding"
        {model_extra}
    """).replace('listen = ["127.0.0.1:0"]\n', f'listen = ["127.0.0.1:0"]\n{server_extra}\n', 1)
    return await start_gateway(nursery, config, environ=environ), up


async def test_more_inputs_than_the_cap_are_a_400_naming_it_before_any_upstream_call(nursery):
    gw, up = await prompt_gateway(nursery)
    r = await gw.post("/v1/embeddings", {"model": "emb", "input": [f"t{i}" for i in range(20000)]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "input" and error["code"] == "too_many_inputs" and "2048" in error["message"]
    assert up.requests == []
    # the same cap holds where the backend takes the list in one call (the echo backend does)
    echo = await start_gateway(nursery, gateway_config("""
        [[backends]]
        name = "e"
        kind = "echo"
        echo_dimensions = 4
        [[models]]
        name = "emb"
        backend = "e"
        kind = "embedding"
    """))
    r = await echo.post("/v1/embeddings", {"model": "emb", "input": ["x"] * 2049})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_inputs"
    r = await echo.post("/v1/embeddings", {"model": "emb", "input": ["x"] * 2048})
    assert r.status_code == 200 and len(r.json()["data"]) == 2048


async def test_calls_run_concurrently_up_to_the_cap_and_merge_in_order(nursery, autojump_clock):
    gw, up = await prompt_gateway(nursery)           # embeddings_concurrency = 8 by default
    up.default = Reply(delay=1.0)
    texts = [f"text {i}" for i in range(100)]
    began = trio.current_time()
    r = await gw.post("/v1/embeddings", {"model": "emb", "input": texts})
    took = trio.current_time() - began
    assert r.status_code == 200
    assert up.max_in_flight == 8
    assert 13.0 <= took < 14.0           # ceil(100 / 8) rounds of 1 s, not 100 s one by one
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(100))
    sent = {q.json["prompt"]: i for i, q in enumerate(up.requests)}
    assert len(sent) == 100
    for text, item in zip(texts, data):       # each vector is its own input's, whatever order they came in
        assert item["embedding"] == _vector(text, 8)


async def test_a_merged_answer_over_max_response_bytes_fails_once_over_without_more_calls(nursery):
    # 1,024 numbers of ~18 characters: ~20 KB a vector; 4 MiB hold ~200 of them, not 2,000
    gw, up = await prompt_gateway(nursery, dimensions=1024, server_extra="max_response_bytes = 4194304")
    r = await gw.post("/v1/embeddings", {"model": "emb", "input": [f"t{i}" for i in range(2000)]})
    assert r.status_code == 413
    error = r.json()["error"]
    assert error["code"] == "embeddings_too_large" and error["param"] == "input"
    assert 200 <= len(up.requests) < 260        # stopped once over: the calls in flight at most after it
    rec = await last_record(gw, 413)
    assert rec["fault"] == "caller"


async def test_a_failed_call_ends_the_others(nursery, autojump_clock):
    gw, up = await prompt_gateway(nursery)
    up.default = Reply(delay=1.0)
    up.script(Reply(delay=1.0), Reply(503))
    r = await gw.post("/v1/embeddings", {"model": "emb", "input": [f"t{i}" for i in range(100)]})
    assert r.status_code == 503
    assert len(up.requests) <= 8      # the first round at most: nothing started after the failure


async def test_a_client_gone_mid_fan_out_is_charged_for_the_finished_calls_and_keeps_the_rest_reserved(
        nursery, autojump_clock):
    gw, up = await prompt_gateway(
        nursery, key_extra="""
        [[keys]]
        name = "metered"
        key_env = "METERED"
        tpm = 1000000
        budget_usd = 100.0
        """,
        model_extra="input_cost_per_1k = 1.0", environ={"METERED": "sk-metered"})
    up.default = Reply(delay=1.0, body={"embedding": [0.5, 0.5], "usage": {"prompt_tokens": 3, "total_tokens": 3}})
    body = json.dumps({"model": "emb", "input": [f"text number {i}" for i in range(100)]}).encode()
    reserved = -(-len(body) // 4)        # limits.estimate: a token per 4 bytes of body, no output
    with trio.move_on_after(5.5):        # 5 rounds of 8 calls done (8 at a time by default), the 6th in flight
        await gw.client.post("/v1/embeddings", content=body,
                             headers={"Authorization": "Bearer sk-metered", "Content-Type": "application/json"})
    rec = await last_record(gw)
    assert rec["status"] == 499 and rec["prompt_tokens"] == 40 * 3 and rec["total_tokens"] == 120
    assert rec["cost_usd"] == pytest.approx(120 / 1000)
    used = gw.daemon.services.limiter.local.usage("metered", time.time())
    kept = -(-reserved * 60 // 100)      # the 60 calls not finished keep their share of the reservation
    assert used["tpm"] == 120 + kept
    assert used["spent_usd"] == pytest.approx(120 / 1000 + reserved / 1000 * 0.6, rel=1e-6)
