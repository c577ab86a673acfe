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
import json
import math
import struct
import time
import uuid
from typing import Any

import trio

from hxgwd.config.model import Timeouts
from hxgwd.upstream import Headers, UpstreamRequest

JSON = [(b"content-type", b"application/json")]
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class EchoResponse:
    def __init__(self, status: int, headers: Headers, chunks: list[bytes], pace: bool = False) -> None:
        self.status = status
        self.headers = headers
        self._chunks = chunks
        self._next = 0
        self._pace = pace

    def receive_ready(self) -> bytes | None:
        return None     # each piece is its own arrival, as a stream's would be

    async def receive(self, deadline: float = math.inf) -> bytes:
        if self._next >= len(self._chunks):
            return b""
        if self._pace and self._next:
            await trio.sleep(0)   # a stream arrives in pieces; let other tasks run between them
        chunk = self._chunks[self._next]
        self._next += 1
        return chunk

    async def aclose(self) -> None:
        self._next = len(self._chunks)


class EchoBackend:
    def __init__(self, dimensions: int, delay: float = 0.0) -> None:
        self.dimensions = dimensions
        self.delay = delay

    async def request(self, req: UpstreamRequest, timeouts: Timeouts) -> EchoResponse:
        if self.delay:
            with trio.fail_after(timeouts.first_byte):
                await trio.sleep(self.delay)
        try:
            body = json.loads(req.body) if req.body else {}
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
        prompt_words = sum(len(_text(m.get("content")).split()) for m in messages if isinstance(m, dict))
        last = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {})
        words, finish = _limit(_text(last.get("content")).split(), body)
        model = str(body.get("model", "echo"))
        usage = {"prompt_tokens": prompt_words, "completion_tokens": len(words),
                 "total_tokens": prompt_words + len(words)}
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream") is not True:   # as the gateway reads it: "true" or 1 is not a stream
            return _json(200, {
                "id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage})

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        events = [chunk({"role": "assistant", "content": ""}, None)]
        events += [chunk({"content": w if i == 0 else " " + w}, None) for i, w in enumerate(words)]
        events.append(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({"id": ident, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": [], "usage": usage})
        return _sse(events)

    def _completion(self, body: dict[str, Any]) -> EchoResponse:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
        if not isinstance(prompt, str):
            return _error(400, "'prompt' must be a string or an array of strings.", "prompt")
        words, finish = _limit(str(prompt).split(), body)
        usage = {"prompt_tokens": len(str(prompt).split()), "completion_tokens": len(words),
                 "total_tokens": len(str(prompt).split()) + len(words)}
        ident, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), str(body.get("model", "echo"))
        if body.get("stream") is not True:   # as the gateway reads it: "true" or 1 is not a stream
            return _json(200, {"id": ident, "object": "text_completion", "created": created, "model": model,
                               "choices": [{"index": 0, "text": " ".join(words), "logprobs": None,
                                            "finish_reason": finish}], "usage": usage})
        events: list[dict[str, Any]] = [
            {"id": ident, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": 0, "text": w if i == 0 else " " + w, "logprobs": None,
                          "finish_reason": finish if i == len(words) - 1 else None}]}
            for i, w in enumerate(words)]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({"id": ident, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": usage})
        return _sse(events)

    def _embeddings(self, body: dict[str, Any]) -> EchoResponse:
        given = body.get("input", body.get("prompt"))
        if isinstance(given, str) or _is_tokens(given):
            items = [given]
        elif isinstance(given, list) and given and all(isinstance(i, str) or _is_tokens(i) for i in given):
            items = given
        else:
            return _error(400, "'input' must be a string, an array of strings, or token arrays.", "input")
        as_base64 = body.get("encoding_format") == "base64"
        data, tokens = [], 0
        for i, item in enumerate(items):
            text = item if isinstance(item, str) else " ".join(str(t) for t in item)
            tokens += len(text.split()) if isinstance(item, str) else len(item)
            vector = unit_vector(text, self.dimensions)
            value: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": i, "embedding": value})
        return _json(200, {"object": "list", "data": data, "model": str(body.get("model", "echo")),
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


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


def _limit(words: list[str], body: dict[str, Any]) -> tuple[list[str], str]:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < len(words):
        return words[:limit], "length"
    return words, "stop"


def _json(status: int, doc: dict[str, Any]) -> EchoResponse:
    return EchoResponse(status, list(JSON), [_ENCODE(doc).encode()])


def _sse(events: list[dict[str, Any]]) -> EchoResponse:
    chunks = [b"data: " + _ENCODE(e).encode() + b"\n\n" for e in events]
    chunks.append(b"data: [DONE]\n\n")
    return EchoResponse(200, list(SSE), chunks, pace=True)


def _error(status: int, message: str, param: str | None = None) -> EchoResponse:
    return _json(status, {"error": {"message": message, "type": "invalid_request_error",
                                    "param": param, "code": None}})
