"""The official `openai` Python SDK as the client (its sync client, run in a worker thread)."""

from __future__ import annotations

import base64

import openai
import pytest
import trio

from tests.conftest import DEV_KEY, gateway_config, start_gateway


@pytest.fixture
async def gw(nursery):
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
    """))


def client(gw, key: str = DEV_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=10)


async def test_chat_stream_embeddings_models(gw):
    def run():
        c = client(gw)
        chat = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello HX"}])
        stream = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "one two three"}],
                                           stream=True)
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        default = c.embeddings.create(model="emb", input=["a", "b"])          # the SDK asks for base64
        floats = c.embeddings.create(model="emb", input="a", encoding_format="float")
        models = c.models.list()
        return chat, pieces, default, floats, models

    chat, pieces, default, floats, models = await trio.to_thread.run_sync(run)
    assert chat.choices[0].message.content == "hello HX" and chat.usage.total_tokens > 0
    assert "".join(pieces) == "one two three"
    assert len(default.data) == 2 and len(default.data[0].embedding) == 16
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert sorted(m.id for m in models.data) == ["chat", "emb"]


async def test_base64_raw_and_bad_key(gw):
    def run():
        raw = client(gw).embeddings.create(model="emb", input="a", encoding_format="base64")
        try:
            client(gw, "sk-wrong").models.list()
        except openai.AuthenticationError as exc:
            return raw, exc
        return raw, None

    raw, exc = await trio.to_thread.run_sync(run)
    assert isinstance(exc, openai.AuthenticationError) and exc.status_code == 401
    emb = raw.data[0].embedding
    assert isinstance(emb, str) and len(base64.b64decode(emb)) == 16 * 4
