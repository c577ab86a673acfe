"""What every echo answer is made of: the response object, the per-backend state, and the helpers
that shape JSON, SSE and error answers and count words as tokens.

An answer is a plain function `answer(body, req, state) -> EchoResponse` (the `Answer` type):
`body` is the request's JSON object (`{}` when it had none) or, for a multipart/form-data
request, its `Form`; `req` the request as the transport got it (method, path, headers, raw
body); `state` what one backend keeps between requests. Answers live in echo_text.py,
echo_responses.py and echo_media.py; echo.py maps paths to them.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import re
import threading
from typing import Any, Callable, Iterable, Union

import attrs
import trio

from hxgwd.upstream import Headers, UpstreamRequest

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
ENCODE = json.JSONEncoder(separators=(",", ":")).encode
WORD = re.compile(r"\S+")
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


@attrs.frozen(slots=True)
class FormFile:
    filename: str
    content_type: str
    data: memoryview          # a view into the request body: a 20 MB upload is not copied


@attrs.frozen(slots=True)
class Form:
    """A multipart/form-data body: text fields (the last of a repeated name wins, except names
    ending in "[]", which collect a list) and files by field name."""
    fields: dict[str, Any]
    files: dict[str, FormFile]


Body = Union[dict[str, Any], Form]


class StoredResponses:
    """The last `keep` Responses API objects an echo backend made with `store` on, as encoded
    JSON, for GET and DELETE /responses/{id}; also bounded by their total size, as a response
    echoes its input. Locked: an answer to a large body runs in a worker thread (offload.py)."""

    def __init__(self, keep: int = 256, max_bytes: int = 32 << 20) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self._docs: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, ident: str, doc: bytes) -> None:
        if len(doc) > self.max_bytes:
            return
        with self._lock:
            self._bytes += len(doc) - len(self._docs.pop(ident, b""))
            self._docs[ident] = doc
            while len(self._docs) > self.keep or self._bytes > self.max_bytes:
                self._bytes -= len(self._docs.popitem(last=False)[1])

    def get(self, ident: str) -> bytes | None:
        with self._lock:
            return self._docs.get(ident)

    def delete(self, ident: str) -> bool:
        with self._lock:
            doc = self._docs.pop(ident, None)
            if doc is not None:
                self._bytes -= len(doc)
            return doc is not None

    def __len__(self) -> int:
        return len(self._docs)


@attrs.define
class EchoState:
    """What one echo backend keeps: its embedding size and the responses it stored."""
    dimensions: int = 1024
    responses: StoredResponses = attrs.field(factory=StoredResponses)


Answer = Callable[[Body, UpstreamRequest, EchoState], EchoResponse]


def json_reply(status: int, doc: dict[str, Any], headers: Headers | None = None) -> EchoResponse:
    return EchoResponse(status, list(JSON) + (headers or []), [ENCODE(doc).encode()])


def sse_reply(events: Iterable[dict[str, Any]], done: bool = True, named: bool = False) -> EchoResponse:
    """Each event made as it is read: a long answer's events are never all in memory. `named`:
    an `event: <type>` line before each data line, as the Responses API sends; `done`: the
    closing `data: [DONE]` of chat and completion streams (the Responses API sends none)."""
    def encoded(event: dict[str, Any]) -> bytes:
        data = b"data: " + ENCODE(event).encode() + b"\n\n"
        return b"event: " + str(event["type"]).encode() + b"\n" + data if named else data
    chunks = itertools.chain((encoded(e) for e in events), (b"data: [DONE]\n\n",) if done else ())
    return EchoResponse(200, list(SSE), chunks, pace=True)


def error_reply(status: int, message: str, param: str | None = None, code: str | None = None,
                kind: str = "invalid_request_error") -> EchoResponse:
    return json_reply(status, {"error": {"message": message, "type": kind, "param": param, "code": code}})


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of content parts
    (chat's "text", the Responses API's "input_text" and "output_text")."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content
                        if isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text")
                        and isinstance(p.get("text"), str))
    return ""


def is_tokens(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def word_count(text: str, piece: int = 65536) -> int:
    """len(text.split()), without a list of every word at once (a 15 MB text's took 150 MB)."""
    count = 0
    for at in range(0, len(text), piece):
        part = text[at:at + piece]
        count += len(part.split())
        if at and not part[0].isspace() and not text[at - 1].isspace():
            count -= 1       # a word across the cut: counted on both sides
    return count


def limit_words(text: str, limit: Any) -> tuple[int, int, bool]:
    """(end, count, cut): the answer is the `count` words of text[:end], `limit` words at most
    (no limit unless a positive int); `cut` when the limit left words out."""
    if positive_int(limit):
        count = end = 0
        for word in WORD.finditer(text):
            if count == limit:
                return end, count, True
            count, end = count + 1, word.end()
    return len(text), word_count(text), False


def joined(text: str, end: int) -> str:
    """" ".join(text[:end].split()), without a list of every word."""
    return _SPACES.sub(" ", text[:end]).strip()


def model_of(body: Body, default: str = "echo") -> str:
    value = body.fields.get("model") if isinstance(body, Form) else body.get("model")
    return value if isinstance(value, str) and value else default
