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


@pytest.fixture
async def every_kind(nursery):
    return await start_gateway(nursery, gateway_config("""
        [[backends]]
        name = "echo"
        kind = "echo"
        [[models]]
        name = "chat"
        backend = "echo"
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
    """))


async def test_responses_moderations_speech_images_through_the_sdk(every_kind):
    gw = every_kind

    def run():
        c = client(gw)
        made = c.responses.create(model="chat", input="hello responses")
        fetched = c.responses.retrieve(made.id)
        with c.responses.stream(model="chat", input="one two three") as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
        c.responses.delete(made.id)
        try:
            c.responses.retrieve(made.id)
            gone = None
        except openai.NotFoundError as exc:
            gone = exc
        moderation = c.moderations.create(model="mod", input=["fine", "hx-flag this"])
        audio = c.audio.speech.create(model="tts", input="four words of audio", voice="alloy",
                                      response_format="wav")
        image = c.images.generate(model="img", prompt="a cat", n=2, response_format="b64_json")
        text = c.audio.transcriptions.create(model="stt", file=("hello.wav", b"RIFF" + bytes(4000), "audio/wav"))
        return made, fetched, deltas, final, gone, moderation, audio.content, image, text

    made, fetched, deltas, final, gone, moderation, audio, image, text = await trio.to_thread.run_sync(run)
    assert text.text
    assert made.output_text == "hello responses" and fetched.id == made.id
    assert "".join(deltas).split() == ["one", "two", "three"] and final.usage.total_tokens > 0
    assert gone is not None and gone.status_code == 404
    assert [r.flagged for r in moderation.results] == [False, True]
    assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"
    assert len(image.data) == 2 and base64.b64decode(image.data[0].b64_json)[:8] == b"\x89PNG\r\n\x1a\n"
    records = [r for r in gw.log.requests() if r["endpoint"] == "/v1/responses"]
    assert records and all(r.get("total_tokens", 0) > 0 for r in records)


async def test_the_new_endpoints_through_the_sdk_against_the_fake_upstream(nursery):
    """The same SDK calls, the backend this time a real HTTP server (tests/fakeupstream.py)."""
    from tests.fakeupstream import FakeUpstream
    from tests.test_store_gateway import EVERY_KIND

    up = FakeUpstream()
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(EVERY_KIND.format(url=up.url)))

    def run():
        c = client(gw)
        made = c.responses.create(model="chat", input="hello")
        with c.responses.stream(model="chat", input="one two") as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
        moderation = c.moderations.create(model="mod", input="hx-flag")
        audio = c.audio.speech.create(model="tts", input="two words", voice="alloy", response_format="wav")
        image = c.images.generate(model="img", prompt="a cat")
        text = c.audio.transcriptions.create(model="stt", file=("a.wav", b"RIFF" + bytes(100), "audio/wav"))
        return made, deltas, final, moderation, audio.content, image, text

    made, deltas, final, moderation, audio, image, text = await trio.to_thread.run_sync(run)
    assert made.usage.total_tokens > 0 and deltas and final.usage.total_tokens > 0
    assert moderation.results[0].flagged
    assert audio[:4] == b"RIFF" and image.data and text.text
    assert {r.path for r in up.requests} >= {"/v1/responses", "/v1/moderations", "/v1/audio/speech",
                                             "/v1/images/generations", "/v1/audio/transcriptions"}
