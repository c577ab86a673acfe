"""The echo backend's answers, called directly and through EchoBackend.request, each checked
against the official `openai` SDK's types (and, through an httpx MockTransport, against the SDK's
own request encoding and response parsing: its multipart uploads, its stream readers)."""

from __future__ import annotations

import base64
import io
import json
import struct
import warnings
import wave
import zlib
from typing import Any

import httpx
import openai
import pytest
import trio
from openai.types import CreateEmbeddingResponse, ModerationCreateResponse, ImagesResponse
from openai.types.audio import Transcription, TranscriptionVerbose, Translation, TranslationVerbose
from openai.types.audio.transcription_stream_event import TranscriptionStreamEvent
from openai.types.chat import ChatCompletion
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from hxgwd.config.model import Timeouts
from hxgwd.upstream import UpstreamRequest
from hxgwd.upstream.echo import ECHO_ANSWERS, EchoBackend
from hxgwd.upstream.echo_common import EchoResponse, EchoState, StoredResponses
from hxgwd.upstream.echo_media import audio_seconds, parse_form, tiny_png, wav_header
from hxgwd.upstream.echo_responses import responses
from hxgwd.upstream.echo_text import FLAG_WORD, MODERATION_CATEGORIES, moderations, rerank

STREAM_EVENT = TypeAdapter(ResponseStreamEvent)
TRANSCRIPT_EVENT = TypeAdapter(TranscriptionStreamEvent)


async def read(resp: EchoResponse) -> bytes:
    pieces = []
    while piece := await resp.receive():
        pieces.append(piece)
    return b"".join(pieces)


async def call(backend: EchoBackend, method: str, path: str, body: Any = None,
               headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    resp = await backend.request(UpstreamRequest(method, path, headers or [], raw), Timeouts())
    return resp.status, dict(resp.headers), await read(resp)


def req(path: str = "/v1/x", method: str = "POST") -> UpstreamRequest:
    return UpstreamRequest(method, path, [], b"")


def sse(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name or None, data) of each event of an SSE body."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name, data = None, None
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data = value if value == "[DONE]" else json.loads(value)
        events.append((name, data))
    return events


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    out = b""
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, (filename, data) in files.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


FORM = [(b"content-type", b"multipart/form-data; boundary=b0undary")]


# --- the mapping --------------------------------------------------------------------------------

def test_one_answer_per_endpoint():
    assert set(ECHO_ANSWERS) == {
        "/models", "/chat/completions", "/completions", "/embeddings", "/responses", "/responses/{id}",
        "/moderations", "/rerank", "/audio/transcriptions", "/audio/translations", "/audio/speech",
        "/images/generations"}


async def test_dispatch_by_path_under_any_base():
    echo = EchoBackend(4)
    chat = json.loads((await call(echo, "POST", "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "a b"}]}))[2])
    assert chat["object"] == "chat.completion"
    completion = json.loads((await call(echo, "POST", "/v1/completions", {"prompt": "a b"}))[2])
    assert completion["object"] == "text_completion"
    for path in ("/rerank", "/v1/rerank", "/v2/rerank?x=1"):
        status, _, _ = await call(echo, "POST", path, {"query": "a", "documents": ["a"]})
        assert status == 200, path
    status, _, body = await call(echo, "POST", "/v1/files", {})
    assert status == 404 and json.loads(body)["error"]["message"] == "No echo endpoint at /v1/files."


async def test_a_mapping_of_its_own():
    def ping(body, request, state):
        return EchoResponse(200, [], [b"pong " + request.path.encode()])
    echo = EchoBackend(4, answers={"/ping": ping, "/things/{id}": ping})
    assert (await call(echo, "POST", "/v1/ping", {}))[2] == b"pong /v1/ping"
    assert (await call(echo, "GET", "/v1/things/7"))[2] == b"pong /v1/things/7"
    assert (await call(echo, "POST", "/v1/chat/completions", {}))[0] == 404
    assert echo.dimensions == 4
    for i in range(100):     # a path with an id is matched each time, not remembered
        assert (await call(echo, "GET", f"/v1/things/{i}"))[2] == f"pong /v1/things/{i}".encode()
    assert set(echo._by_path) == {"/v1/ping", "/v1/chat/completions"}


async def test_bodies_that_are_not_json_objects_or_forms():
    echo = EchoBackend(4)
    assert (await call(echo, "POST", "/v1/responses", b"[1]"))[0] == 400
    status, _, body = await call(echo, "POST", "/v1/audio/transcriptions", b"--x\r\nbroken", FORM)
    assert status == 400 and "multipart" in json.loads(body)["error"]["message"]
    status, _, body = await call(echo, "POST", "/v1/audio/transcriptions", {"model": "whisper-1"})
    assert status == 400 and "multipart" in json.loads(body)["error"]["message"]


# --- responses --------------------------------------------------------------------------------

async def test_response_echoes_the_last_user_input():
    echo = EchoBackend(4)
    status, _, body = await call(echo, "POST", "/v1/responses", {"model": "m", "input": "one two three"})
    doc = Response.model_validate(json.loads(body))
    assert status == 200 and doc.output_text == "one two three" and doc.status == "completed"
    assert doc.id.startswith("resp_") and doc.output[0].id.startswith("msg_") and doc.model == "m"
    assert (doc.usage.input_tokens, doc.usage.output_tokens, doc.usage.total_tokens) == (3, 3, 6)

    items = {"instructions": "be brief", "input": [
        {"role": "user", "content": "first question"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "an answer"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "second   question"}]},
        {"type": "function_call_output", "call_id": "c", "output": "ignored"}]}
    doc = Response.model_validate(json.loads((await call(echo, "POST", "/v1/responses", items))[2]))
    assert doc.output_text == "second question" and doc.instructions == "be brief"
    assert doc.usage.input_tokens == 2 + 2 + 2 + 2 and doc.usage.output_tokens == 2


async def test_response_cut_by_max_output_tokens_is_incomplete():
    doc = Response.model_validate(json.loads(await read(responses(
        {"input": "a b c d", "max_output_tokens": 2}, req(), EchoState()))))
    assert doc.status == "incomplete" and doc.incomplete_details.reason == "max_output_tokens"
    assert doc.output_text == "a b" and doc.usage.output_tokens == 2


async def test_responses_stream_is_the_real_event_sequence():
    raw = await read(responses({"model": "m", "input": "hello there world", "stream": True}, req(), EchoState()))
    events = sse(raw)
    parsed = [STREAM_EVENT.validate_python(data) for _, data in events]
    assert [name for name, _ in events] == [e.type for e in parsed]
    assert [e.type for e in parsed] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 3, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    assert "".join(e.delta for e in parsed if e.type == "response.output_text.delta") == "hello there world"
    # only the last event carries usage: what a gateway records from a stream
    assert parsed[0].response.usage is None and parsed[0].response.status == "in_progress"
    assert parsed[-1].response.usage.total_tokens == 6 and parsed[-1].response.output_text == "hello there world"
    assert b"[DONE]" not in raw


async def test_responses_stream_cut_ends_with_incomplete():
    events = sse(await read(responses({"input": "a b c", "stream": True, "max_output_tokens": 1},
                                      req(), EchoState())))
    last = STREAM_EVENT.validate_python(events[-1][1])
    assert last.type == "response.incomplete" and last.response.output_text == "a"


async def test_stored_responses_get_delete_and_store_false():
    echo = EchoBackend(4)
    made = json.loads((await call(echo, "POST", "/v1/responses", {"input": "keep me"}))[2])
    status, _, body = await call(echo, "GET", f"/v1/responses/{made['id']}")
    assert status == 200 and json.loads(body) == made
    follow = await call(echo, "POST", "/v1/responses", {"input": "next", "previous_response_id": made["id"]})
    assert follow[0] == 200 and json.loads(follow[2])["previous_response_id"] == made["id"]
    assert json.loads(follow[2])["usage"]["input_tokens"] == 1 + made["usage"]["total_tokens"]
    status, _, body = await call(echo, "DELETE", f"/v1/responses/{made['id']}")
    assert status == 200 and json.loads(body) == {"id": made["id"], "object": "response", "deleted": True}
    for method in ("GET", "DELETE"):
        status, _, body = await call(echo, method, f"/v1/responses/{made['id']}")
        assert status == 404 and json.loads(body) == {"error": {
            "message": f"Response with id '{made['id']}' not found.", "type": "invalid_request_error",
            "param": None, "code": None}}
    status, _, body = await call(echo, "POST", "/v1/responses", {"input": "x", "previous_response_id": made["id"]})
    assert status == 400 and json.loads(body)["error"]["code"] == "previous_response_not_found"

    unkept = json.loads((await call(echo, "POST", "/v1/responses", {"input": "secret", "store": False}))[2])
    assert unkept["store"] is False and (await call(echo, "GET", f"/v1/responses/{unkept['id']}"))[0] == 404
    streamed = sse((await call(echo, "POST", "/v1/responses", {"input": "s", "stream": True}))[2])
    ident = streamed[-1][1]["response"]["id"]
    assert json.loads((await call(echo, "GET", f"/v1/responses/{ident}"))[2]) == streamed[-1][1]["response"]
    assert (await call(echo, "PUT", f"/v1/responses/{ident}"))[0] == 405


def test_stored_responses_are_bounded_in_count_and_bytes():
    store = StoredResponses(keep=3, max_bytes=100)
    for i in range(5):
        store.put(f"r{i}", b"x" * 10)
    assert len(store) == 3 and store.get("r1") is None and store.get("r4") == b"x" * 10
    store.put("big", b"y" * 80)       # evicts the oldest until both bounds hold
    assert store.get("big") and store.get("r2") is None and store.get("r3") and store.get("r4")
    store.put("r5", b"x" * 10)
    assert store.get("r3") is None and store.get("r4") and len(store) == 3
    store.put("huge", b"z" * 101)     # never kept: larger than the whole store
    assert store.get("huge") is None and store.get("big")


# --- moderations, rerank ------------------------------------------------------------------------

async def test_moderations_one_result_per_input_and_a_flag_on_the_marker():
    doc = ModerationCreateResponse.model_validate(json.loads(await read(moderations(
        {"input": ["fine text", f"this is {FLAG_WORD.upper()} text"]}, req(), EchoState()))))
    assert doc.id.startswith("modr-") and doc.model == "omni-moderation-latest" and len(doc.results) == 2
    assert [r.flagged for r in doc.results] == [False, True]
    assert doc.results[1].categories.violence and doc.results[1].category_scores.violence == 0.99
    raw = json.loads(await read(moderations({"input": "x", "model": "m"}, req(), EchoState())))
    assert set(raw["results"][0]["categories"]) == set(MODERATION_CATEGORIES)
    assert not any(raw["results"][0]["categories"].values())
    multimodal = ModerationCreateResponse.model_validate(json.loads(await read(moderations({"input": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:,"}}]},
        req(), EchoState()))))
    assert len(multimodal.results) == 1 and multimodal.results[0].category_applied_input_types.violence == [
        "text", "image"]
    assert (await read(moderations({"input": 3}, req(), EchoState())))


async def test_rerank_orders_by_shared_words():
    doc = json.loads(await read(rerank({"model": "r", "query": "red apple", "top_n": 2, "documents": [
        "a banana", {"text": "an apple"}, "Red APPLE pie"]}, req(), EchoState())))
    assert doc["id"].startswith("rerank-") and doc["model"] == "r"
    assert doc["results"] == [{"index": 2, "relevance_score": 1.0, "document": {"text": "Red APPLE pie"}},
                              {"index": 1, "relevance_score": 0.5, "document": {"text": "an apple"}}]
    assert doc["usage"] == {"total_tokens": (2 + 2) + (2 + 2) + (2 + 3)}
    bare = json.loads(await read(rerank({"query": "x", "documents": ["y", "x"], "return_documents": False},
                                        req(), EchoState())))
    assert bare["results"] == [{"index": 1, "relevance_score": 1.0}, {"index": 0, "relevance_score": 0.0}]
    for bad in ({"documents": ["a"]}, {"query": "q", "documents": []}, {"query": "q", "documents": [3]},
                {"query": "q", "documents": ["a"], "top_n": 0}):
        assert json.loads(await read(rerank(bad, req(), EchoState())))["error"]["type"] == "invalid_request_error"


# --- audio and images ---------------------------------------------------------------------------

def test_multipart_parser():
    data = bytes(range(256)) * 3 + b"\r\n--b0undar" + b"\r\n"
    body = b"preamble\r\n" + multipart({"model": "whisper-1", "x[]": "1"}, {"file": ("a b.wav", data)})
    form = parse_form(body, 'multipart/form-data; boundary="b0undary"')
    assert form.fields == {"model": "whisper-1", "x[]": ["1"]}
    assert form.files["file"].filename == "a b.wav" and bytes(form.files["file"].data) == data
    assert parse_form(body[10:], None).fields["model"] == "whisper-1"  # the boundary from the first line
    encoded = (b'--q\r\nContent-Disposition: form-data; name="file"; filename*=utf-8\'\'%C3%A9.wav\r\n\r\n'
               b"abc\r\n--q\r\n\r\nno disposition\r\n--q--")
    assert parse_form(encoded, "multipart/form-data; boundary=q").files["file"].filename == "é.wav"
    for broken in (b"--q\r\nContent-Disposition: form-data; name=a\r\n\r\nnever closed",
                   b"--q\r\nno end of headers", b"no delimiter", b"--q" + b"\r\n\r\nx\r\n--q" * 70 + b"--"):
        with pytest.raises(ValueError):
            parse_form(broken, "multipart/form-data; boundary=q")


def wav(seconds: float, rate: int = 16000) -> bytes:
    size = int(seconds * rate) * 2
    return wav_header(size, rate) + bytes(size)


async def test_transcriptions_in_every_format():
    echo = EchoBackend(4)
    audio = wav(2.5)

    async def transcribe(fields: dict[str, str], path: str = "/v1/audio/transcriptions"):
        return await call(echo, "POST", path, multipart(fields, {"file": ("talk.wav", audio)}), FORM)

    status, headers, body = await transcribe({"model": "whisper-1"})
    doc = Transcription.model_validate(json.loads(body))
    assert doc.text == f"Echo transcription of talk.wav, {len(audio)} bytes."
    assert doc.usage.type == "duration" and doc.usage.seconds == 3          # 2.5 s, billed by the second
    doc = Transcription.model_validate(json.loads((await transcribe({"model": "gpt-4o-transcribe",
                                                                     "prompt": "two words"}))[2]))
    assert doc.usage.type == "tokens" and doc.usage.output_tokens == 6
    assert doc.usage.input_token_details.audio_tokens == 25 and doc.usage.input_tokens == 27
    assert doc.usage.total_tokens == 33
    verbose = TranscriptionVerbose.model_validate(json.loads((await transcribe({
        "model": "whisper-1", "response_format": "verbose_json", "timestamp_granularities[]": "word"}))[2]))
    assert verbose.duration == 2.5 and verbose.segments[0].end == 2.5 and len(verbose.words) == 6
    status, headers, body = await transcribe({"response_format": "text"})
    assert headers[b"content-type"].startswith(b"text/plain") and body == doc.text.encode() + b"\n"
    assert (await transcribe({"response_format": "srt"}))[2].decode() == (
        f"1\n00:00:00,000 --> 00:00:02,500\n{doc.text}\n\n")
    assert (await transcribe({"response_format": "vtt"}))[2].decode().startswith(
        "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\n")
    assert (await transcribe({"response_format": "mp3"}))[0] == 400

    translation = json.loads((await transcribe({"model": "whisper-1"}, "/v1/audio/translations"))[2])
    assert Translation.model_validate(translation).text.startswith("Echo translation of talk.wav")
    assert "usage" not in translation      # OpenAI's translations report none
    TranslationVerbose.model_validate(json.loads((await transcribe(
        {"response_format": "verbose_json"}, "/v1/audio/translations"))[2]))

    events = sse((await transcribe({"model": "gpt-4o-mini-transcribe", "stream": "true"}))[2])
    parsed = [TRANSCRIPT_EVENT.validate_python(data) for _, data in events]
    assert "".join(e.delta for e in parsed[:-1]) == parsed[-1].text == doc.text
    assert parsed[-1].type == "transcript.text.done" and parsed[-1].usage.total_tokens == 25 + 6

    status, _, body = await call(echo, "POST", "/v1/audio/transcriptions", multipart({"model": "m"}, {}), FORM)
    assert status == 400 and json.loads(body)["error"]["param"] == "file"


def test_audio_seconds_of_wav_and_other_files():
    from hxgwd.upstream.echo_common import FormFile
    assert audio_seconds(FormFile("a.wav", "audio/wav", memoryview(wav(1.25)))) == 1.25
    assert audio_seconds(FormFile("a.mp3", "audio/mpeg", memoryview(bytes(32000)))) == 2.0


@pytest.mark.parametrize("form, kind", [("wav", b"audio/wav"), ("pcm", b"audio/pcm"), ("mp3", b"audio/mpeg"),
                                        (None, b"audio/mpeg")])
async def test_speech_is_silence_as_long_as_the_words(form, kind):
    echo = EchoBackend(4)
    body = {"model": "tts-1", "input": "one two three four", "voice": "alloy",
            **({"response_format": form} if form else {})}
    resp = await echo.request(UpstreamRequest("POST", "/v1/audio/speech", [], json.dumps(body).encode()), Timeouts())
    assert resp.status == 200 and dict(resp.headers)[b"content-type"] == kind
    pieces = []
    while piece := await resp.receive():
        pieces.append(piece)
    audio = b"".join(pieces)
    if form == "wav":
        with wave.open(io.BytesIO(audio)) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 24000, 24000)
        assert len(pieces) > 1 and not audio[44:].strip(b"\0")
    elif form == "pcm":
        assert len(audio) == 48000 and not audio.strip(b"\0")
    else:
        assert audio[:4] == b"\xff\xfb\x90\xc0" and len(audio) % 417 == 0 and len(audio) // 417 == 39


async def test_speech_is_bounded_and_checked():
    echo = EchoBackend(4)
    status, _, audio = await call(echo, "POST", "/v1/audio/speech",
                                  {"input": "w " * 2000, "voice": "alloy", "response_format": "pcm"})
    assert status == 200 and len(audio) == 30 * 24000 * 2
    for bad, param in (({"voice": "a"}, "input"), ({"input": "x"}, "voice"),
                       ({"input": "x", "voice": "a", "response_format": "flac"}, "response_format"),
                       ({"input": "x", "voice": "a", "speed": 9}, "speed"),
                       ({"input": "x" * 4097, "voice": "a"}, "input")):
        status, _, body = await call(echo, "POST", "/v1/audio/speech", bad)
        assert status == 400 and json.loads(body)["error"]["param"] == param


def png_colour(png: bytes) -> bytes:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, {}
    while at < len(png):
        size, kind = struct.unpack(">I4s", png[at:at + 8])
        data = png[at + 8:at + 8 + size]
        assert struct.unpack(">I", png[at + 8 + size:at + 12 + size])[0] == zlib.crc32(kind + data)
        chunks[kind] = data
        at += 12 + size
    assert struct.unpack(">II", chunks[b"IHDR"][:8]) == (1, 1) and b"IEND" in chunks
    return zlib.decompress(chunks[b"IDAT"])[1:]


async def test_images_honour_n_and_response_format():
    echo = EchoBackend(4)
    status, _, body = await call(echo, "POST", "/v1/images/generations", {"prompt": "a red fox", "n": 3})
    doc = ImagesResponse.model_validate(json.loads(body))
    assert status == 200 and len(doc.data) == 3 and doc.usage.input_tokens == 3 and doc.usage.output_tokens == 3
    colours = [png_colour(base64.b64decode(image.b64_json)) for image in doc.data]
    assert len(set(colours)) == 3 and colours[0] == png_colour(tiny_png("0:a red fox"))
    doc = ImagesResponse.model_validate(json.loads((await call(
        echo, "POST", "/v1/images/generations", {"prompt": "x", "response_format": "url"}))[2]))
    assert doc.data[0].url.startswith("data:image/png;base64,") and doc.data[0].b64_json is None
    for bad in ({"prompt": ""}, {"prompt": "x", "n": 11}, {"prompt": "x", "n": True},
                {"prompt": "x", "response_format": "gif"}):
        assert (await call(echo, "POST", "/v1/images/generations", bad))[0] == 400


# --- through the SDK ---------------------------------------------------------------------------

def translate(c: openai.OpenAI, upload: tuple[str, bytes, str]) -> Any:
    with warnings.catch_warnings():     # the SDK marks translations deprecated; the API serves them
        warnings.simplefilter("ignore", DeprecationWarning)
        return c.audio.translations.create(model="whisper-1", file=upload)


def sdk_client(echo: EchoBackend) -> openai.OpenAI:
    """The SDK, its requests answered by `echo` on the test's event loop (run it in a thread)."""
    def handle(request: httpx.Request) -> httpx.Response:
        status, headers, body = trio.from_thread.run(
            call, echo, request.method, request.url.raw_path.decode(), request.read(),
            [(k.encode(), v.encode()) for k, v in request.headers.items()])
        return httpx.Response(status, headers=[(k, v) for k, v in headers.items()], content=body)
    return openai.OpenAI(base_url="http://echo/v1", api_key="x", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handle)))


async def test_every_endpoint_through_the_sdk():
    echo = EchoBackend(8)

    def run() -> dict[str, Any]:
        c = sdk_client(echo)
        made = c.responses.create(model="m", input="through the sdk")
        got = c.responses.retrieve(made.id)
        c.responses.delete(made.id)
        try:
            c.responses.retrieve(made.id)
            missing = None
        except openai.NotFoundError as exc:
            missing = exc
        streamed = list(c.responses.create(model="m", input="one two", stream=True))
        with c.responses.stream(model="m", input="final words") as stream:
            final = stream.get_final_response()
        upload = ("talk.wav", wav(1.0), "audio/wav")
        return {
            "made": made, "got": got, "missing": missing, "streamed": streamed, "final": final,
            "chat": c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]),
            "emb": c.embeddings.create(model="e", input=["a", "b"]),
            "mod": c.moderations.create(input=["ok", "hx-flag"]),
            "stt": c.audio.transcriptions.create(model="whisper-1", file=upload),
            "verbose": c.audio.transcriptions.create(model="whisper-1", file=upload, response_format="verbose_json",
                                                     timestamp_granularities=["word", "segment"]),
            "stt_stream": list(c.audio.transcriptions.create(model="gpt-4o-transcribe", file=upload, stream=True)),
            "tr": translate(c, upload),
            "tts": c.audio.speech.create(model="tts-1", voice="alloy", input="a b", response_format="wav").read(),
            "img": c.images.generate(model="gpt-image-1", prompt="a cat", n=2),
        }
    out = await trio.to_thread.run_sync(run)
    assert out["made"].output_text == "through the sdk" and out["got"].id == out["made"].id
    assert out["missing"] is not None and out["missing"].status_code == 404
    assert [e.type for e in out["streamed"]][-1] == "response.completed"
    assert out["final"].output_text == "final words" and out["final"].usage.output_tokens == 2
    assert isinstance(out["chat"], ChatCompletion) and out["chat"].choices[0].message.content == "hi"
    assert isinstance(out["emb"], CreateEmbeddingResponse) and len(out["emb"].data[1].embedding) == 8
    assert [r.flagged for r in out["mod"].results] == [False, True]
    assert out["stt"].text == f"Echo transcription of talk.wav, {len(wav(1.0))} bytes." and out["stt"].usage.seconds == 1
    assert len(out["verbose"].words) == 6 and out["verbose"].duration == 1.0
    assert out["stt_stream"][-1].type == "transcript.text.done" and out["stt_stream"][-1].text == out["stt"].text
    assert out["tr"].text.startswith("Echo translation of talk.wav")
    assert out["tts"][:4] == b"RIFF" and len(out["tts"]) == 44 + 24000
    assert len(out["img"].data) == 2 and out["img"].usage.total_tokens == 4


async def test_a_20_mb_upload_is_read_in_place():
    """The file part stays a view into the body (no copy), and the work runs off the loop."""
    echo = EchoBackend(4)
    audio = wav(625.0)                          # 20 MB of 16 kHz 16-bit mono
    body = multipart({"model": "whisper-1"}, {"file": ("long.wav", audio)})
    form = parse_form(body, FORM[0][1].decode())
    assert form.files["file"].data.obj is body
    status, _, answer = await call(echo, "POST", "/v1/audio/transcriptions", body, FORM)
    doc = Transcription.model_validate(json.loads(answer))
    assert doc.text == f"Echo transcription of long.wav, {len(audio)} bytes." and doc.usage.seconds == 625
