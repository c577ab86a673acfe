"""The echo backend: an in-process OpenAI-compatible upstream with no network and no tokens spent.

Chat answers with the last user message (streamed too), completions with the prompt, embeddings
with deterministic unit vectors (same text, same vector) of the configured size, each with a
`usage` block counting whitespace-separated words as tokens. It sits behind the same transport
interface as a real backend, so its requests go through routing, transforms and records like any
other: operators use it to smoke-test a deployment end to end.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import re
import struct
import time
import uuid
from typing import Any, Iterable, Iterator

import trio

from hxgwd.config.model import Timeouts
from hxgwd.offload import OFF_LOOP_BYTES, Offload
from hxgwd.pipeline.body import json_document_in_steps
from hxgwd.upstream import Headers, UpstreamRequest

JSON = [(b"content-type", b"application/json")]
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_WORD = re.compile(r"\S+")
_SPACES = re.compile(r"\s+")


class EchoResponse:
    """`chunks`: the body's pieces, made as they are read when an iterator: a large answer is
    worked out piece by piece, with other tasks run between pieces, not in one go."""

    def __init__(self, status: int, headers: Headers, chunks: Iterable[bytes], pace: bool = False) -> None:
        self.status = status
        self.headers = headers
        self._chunks = iter(chunks)
        self._started = False
        self._pace = pace

    def receive_ready(self) -> bytes | None:
        return None     # each piece is its own arrival, as a stream's would be

    async def receive(self, deadline: float = math.inf) -> bytes:
        if self._pace and self._started:
            await trio.sleep(0)   # a stream arrives in pieces; let other tasks run between them
        self._started = True
        return next(self._chunks, b"")

    async def aclose(self) -> None:
        self._chunks = iter(())


class EchoBackend:
    def __init__(self, dimensions: int, delay: float = 0.0) -> None:
        self.dimensions = dimensions
        self._offload = Offload()
        self.delay = delay

    async def request(self, req: UpstreamRequest, timeouts: Timeouts) -> EchoResponse:
        if self.delay:
            with trio.fail_after(timeouts.first_byte):
                await trio.sleep(self.delay)
        # a large body is parsed and answered in a thread (offload.py), as the gateway parses it
        return await self._offload.run(len(req.body), self._answer, req)

    def _answer(self, req: UpstreamRequest) -> EchoResponse:
        try:
            body = (json.loads if len(req.body) < OFF_LOOP_BYTES else json_document_in_steps)(req.body) if req.body else {}
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return _error(400, "The body is not a JSON object.")
        path = req.path
        if req.method == "GET" and path.endswith("/models"):
            return _json(200, {"object": "list", "data": [
                {"id": "echo", "object": "model", "created": 0, "owned_by": "hxgwd"}]})
        if path.endswith("/chat/completions"):
            return self._chat(body)
        if path.endswith("/completions"):
            return self._completion(body)
        if path.endswith("/embeddings"):
            return self._embeddings(body)
        return _error(404, f"No echo endpoint at {path}.")

    def _chat(self, body: dict[str, Any]) -> EchoResponse:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "'messages' must be a non-empty array.", "messages")
        prompt_words = sum(_word_count(_text(m.get("content"))) for m in messages if isinstance(m, dict))
        last = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {})
        text = _text(last.get("content"))
        end, count, finish = _limit(text, body)
        model = str(body.get("model", "echo"))
        usage = {"prompt_tokens": prompt_words, "completion_tokens": count,
                 "total_tokens": prompt_words + count}
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream") is not True:   # as the gateway reads it: "true" or 1 is not a stream
            return _json(200, {
                "id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": _joined(text, end)},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage})

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        def events() -> Iterator[dict[str, Any]]:
            yield chunk({"role": "assistant", "content": ""}, None)
            for i, word in enumerate(_WORD.finditer(text, 0, end)):
                yield chunk({"content": word.group() if i == 0 else " " + word.group()}, None)
            yield chunk({}, finish)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield {"id": ident, "object": "chat.completion.chunk", "created": created,
                       "model": model, "choices": [], "usage": usage}
        return _sse(events())

    def _completion(self, body: dict[str, Any]) -> EchoResponse:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
        if not isinstance(prompt, str):
            return _error(400, "'prompt' must be a string or an array of strings.", "prompt")
        end, count, finish = _limit(prompt, body)
        prompt_words = _word_count(prompt)
        usage = {"prompt_tokens": prompt_words, "completion_tokens": count,
                 "total_tokens": prompt_words + count}
        ident, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), str(body.get("model", "echo"))
        if body.get("stream") is not True:   # as the gateway reads it: "true" or 1 is not a stream
            return _json(200, {"id": ident, "object": "text_completion", "created": created, "model": model,
                               "choices": [{"index": 0, "text": _joined(prompt, end), "logprobs": None,
                                            "finish_reason": finish}], "usage": usage})

        def events() -> Iterator[dict[str, Any]]:
            for i, word in enumerate(_WORD.finditer(prompt, 0, end)):
                yield {"id": ident, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"index": 0, "text": word.group() if i == 0 else " " + word.group(),
                                    "logprobs": None, "finish_reason": finish if i == count - 1 else None}]}
            if (body.get("stream_options") or {}).get("include_usage"):
                yield {"id": ident, "object": "text_completion", "created": created, "model": model,
                       "choices": [], "usage": usage}
        return _sse(events())

    def _embeddings(self, body: dict[str, Any]) -> EchoResponse:
        given = body.get("input", body.get("prompt"))
        if isinstance(given, str) or _is_tokens(given):
            items = [given]
        elif isinstance(given, list) and given and all(isinstance(i, str) or _is_tokens(i) for i in given):
            items = given
        else:
            return _error(400, "'input' must be a string, an array of strings, or token arrays.", "input")
        as_base64 = body.get("encoding_format") == "base64"
        model = str(body.get("model", "echo"))
        return EchoResponse(200, list(JSON), self._vectors(items, as_base64, model), pace=True)

    def _vectors(self, items: list[Any], as_base64: bool, model: str) -> Iterator[bytes]:
        """The answer in pieces of ~64 KB, each made when it is read: 2,048 vectors of 1,024
        dimensions took the loop for 0.6 s in one go (12.6 s for 20,000)."""
        per_piece = max(1, 65536 // (20 * self.dimensions))    # ~20 bytes a number as JSON text
        tokens = 0
        piece = [b'{"object":"list","data":[']
        for i, item in enumerate(items):
            text = item if isinstance(item, str) else " ".join(str(t) for t in item)
            tokens += _word_count(text) if isinstance(item, str) else len(item)
            vector = unit_vector(text, self.dimensions)
            value: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
            piece.append((b"," if i else b"") + _ENCODE({"object": "embedding", "index": i, "embedding": value}).encode())
            if len(piece) >= per_piece:
                yield b"".join(piece)
                piece = []
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        piece.append(b'],"model":%b,"usage":%b}' % (_ENCODE(model).encode(), _ENCODE(usage).encode()))
        yield b"".join(piece)


def unit_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic vector of length 1 for `text`."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dimensions)
    values = [v + 0.5 for v in struct.unpack(f"<{dimensions}h", raw)]
    norm = sum(v * v for v in values) ** 0.5
    return [v / norm for v in values]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):   # content parts: keep the text ones
        return " ".join(p["text"] for p in content
                        if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return ""


def _is_tokens(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def _word_count(text: str, piece: int = 65536) -> int:
    """len(text.split()), without a list of every word at once (a 15 MB text's took 150 MB)."""
    count = 0
    for at in range(0, len(text), piece):
        part = text[at:at + piece]
        count += len(part.split())
        if at and not part[0].isspace() and not text[at - 1].isspace():
            count -= 1       # a word across the cut: counted on both sides
    return count


def _limit(text: str, body: dict[str, Any]) -> tuple[int, int, str]:
    """(end, count, finish reason): the answer is the `count` words of text[:end] (max_tokens at most)."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        count = end = 0
        for word in _WORD.finditer(text):
            if count == limit:
                return end, count, "length"
            count, end = count + 1, word.end()
    return len(text), _word_count(text), "stop"


def _joined(text: str, end: int) -> str:
    """" ".join(text[:end].split()), without a list of every word."""
    return _SPACES.sub(" ", text[:end]).strip()


def _json(status: int, doc: dict[str, Any]) -> EchoResponse:
    return EchoResponse(status, list(JSON), [_ENCODE(doc).encode()])


def _sse(events: Iterable[dict[str, Any]]) -> EchoResponse:
    """Each event made as it is read: a long answer's events are never all in memory."""
    chunks = itertools.chain((b"data: " + _ENCODE(e).encode() + b"\n\n" for e in events), (b"data: [DONE]\n\n",))
    return EchoResponse(200, list(SSE), chunks, pace=True)


def _error(status: int, message: str, param: str | None = None) -> EchoResponse:
    return _json(status, {"error": {"message": message, "type": "invalid_request_error",
                                    "param": param, "code": None}})
