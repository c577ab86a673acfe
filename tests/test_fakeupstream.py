"""The fake upstream's answers for the newer endpoints, through a real socket: the official `openai`
SDK as the client (its sync client in a worker thread) and httpx for what the SDK hides."""

from __future__ import annotations

import base64
import io
import json
import wave
import warnings
from typing import Any

import httpx
import openai
import pytest
import trio
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from tests.fakeupstream import PNG_1X1, FormFile, Reply, Stream

STREAM_EVENT = TypeAdapter(ResponseStreamEvent)


def client(up) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.url + "/v1", api_key="x", max_retries=0, timeout=10)


async def test_the_sdk_reads_every_answer(upstream):
    audio = bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n"

    def run() -> dict[str, Any]:
        c = client(upstream)
        made = c.responses.create(model="m", input="Return exactly the text: HX-OK")
        out = {"made": made, "got": c.responses.retrieve(made.id)}
        c.responses.delete(made.id)
        try:
            c.responses.retrieve(made.id)
        except openai.NotFoundError as exc:
            out["missing"] = exc
        out["streamed"] = list(c.responses.create(model="m", input="x", stream=True))
        out["mod"] = c.moderations.create(input=["fine", "an hx-flag here"])
        out["stt"] = c.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", audio, "audio/wav"),
                                                   prompt="context", timestamp_granularities=["word"])
        out["whisper"] = c.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio, "audio/wav"))
        out["stt_stream"] = list(c.audio.transcriptions.create(model="gpt-4o-transcribe",
                                                               file=("a.wav", audio), stream=True))
        with warnings.catch_warnings():     # the SDK marks translations deprecated; the API serves them
            warnings.simplefilter("ignore", DeprecationWarning)
            out["tr"] = c.audio.translations.create(model="whisper-1", file=("b.mp3", b"123"))
        out["tts"] = c.audio.speech.create(model="tts-1", voice="alloy", input="three words here",
                                           response_format="wav").read()
        out["img"] = c.images.generate(model="gpt-image-1", prompt="p", n=2)
        return out

    out = await trio.to_thread.run_sync(run)
    assert out["made"].output_text == "HX-OK" and out["made"].usage.output_tokens == 1
    assert out["got"] == out["made"] and out["missing"].status_code == 404
    assert out["streamed"][-1].type == "response.completed" and out["streamed"][-1].response.usage.total_tokens == 12
    assert [r.flagged for r in out["mod"].results] == [False, True]
    assert out["stt"].text == f"fake transcription of a.wav, {len(audio)} bytes" and out["stt"].usage.type == "tokens"
    assert out["whisper"].usage.type == "duration"
    assert out["stt_stream"][-1].type == "transcript.text.done" and out["stt_stream"][-1].usage.output_tokens == 5
    assert out["tr"].text == "fake translation of b.mp3, 3 bytes"
    with wave.open(io.BytesIO(out["tts"])) as w:
        assert w.getframerate() == 24000 and w.getnframes() == 3 * 2400
    assert [base64.b64decode(i.b64_json) for i in out["img"].data] == [PNG_1X1, PNG_1X1]

    stt = next(r for r in upstream.requests if r.path == "/v1/audio/transcriptions")
    assert stt.json is None and stt.body.count(audio) == 1         # the raw bytes, as they arrived
    assert stt.form["model"] == "gpt-4o-transcribe" and stt.form["prompt"] == "context"
    assert stt.form["timestamp_granularities[]"] == ["word"]
    assert stt.form["file"] == FormFile("a.wav", "audio/wav", audio)
    assert [r.method for r in upstream.requests[:4]] == ["POST", "GET", "DELETE", "GET"]


async def test_responses_events_stream_and_obey_a_stream_action(upstream):
    async with httpx.AsyncClient(base_url=upstream.url) as http:
        r = await http.post("/v1/responses", json={"model": "m", "input": "q", "stream": True})
        blocks = [b for b in r.text.split("\n\n") if b]
        events = [STREAM_EVENT.validate_python(json.loads(b.split("\ndata: ", 1)[1])) for b in blocks]
        assert [b.split("\n", 1)[0] for b in blocks] == [f"event: {e.type}" for e in events]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert sum(e.type == "response.output_text.delta" for e in events) == 5 and len(events) == 4 + 5 + 4
        assert events[-1].response.id in upstream.stored

        upstream.script(Stream(words=3, reset_after=4))
        with pytest.raises(httpx.HTTPError):
            await http.post("/v1/responses", json={"input": "q", "stream": True, "store": False})
        assert upstream.chunks_sent == 13 + 4 and len(upstream.stored) == 1

        upstream.script(Reply(500))
        r = await http.post("/v1/responses", json={"input": "q"})
        assert r.status_code == 500 and r.json()["error"]["message"] == "fake says 500"


async def test_speech_arrives_in_chunks_and_rerank_orders(upstream):
    async with httpx.AsyncClient(base_url=upstream.url) as http:
        async with http.stream("POST", "/v1/audio/speech", json={"input": "a b c d", "voice": "v"}) as r:
            pieces = [p async for p in r.aiter_raw()]
            assert r.headers["content-type"] == "audio/wav" and r.headers["transfer-encoding"] == "chunked"
        assert sum(map(len, pieces)) == 44 + 4 * 4800 and upstream.chunks_sent == 4

        r = await http.post("/rerank", json={"model": "r", "query": "apple", "top_n": 2,
                                             "documents": ["pear", {"text": "plum"}, "an Apple"]})
        assert r.json() == {"id": "rerank-fake", "model": "r", "usage": {"total_tokens": 7}, "results": [
            {"index": 2, "relevance_score": 1.0, "document": {"text": "an Apple"}},
            {"index": 0, "relevance_score": 0.5, "document": {"text": "pear"}}]}
        r = await http.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"xy")},
                            data={"response_format": "text"})
        assert r.headers["content-type"].startswith("text/plain") and r.text == "fake transcription of a.wav, 2 bytes\n"
        r = await http.post("/v1/audio/transcriptions", files={"other": ("a.wav", b"xy")})
        assert r.status_code == 400
