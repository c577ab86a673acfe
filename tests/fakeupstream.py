"""A real OpenAI-compatible upstream on a loopback socket, whose behaviour tests script per request.

    up = FakeUpstream()                          # answers like OpenAI by default
    await nursery.start(up.serve)                # listens on 127.0.0.1:<port>, up.url is its base
    up.script(Reply(500), Reply(429, retry_after=2), Hang())   # the next requests, in order
    up.default = Reply(200)                      # after the script runs out
    up.requests                                  # what it received: method, path, headers, json

Actions: Reply (status, body, delay), Stream (events, delay between chunks, reset after N),
Hang (never answers), Reset (closes the connection at once, with RST), Raw (bytes as they are,
for broken answers), and `refuse()` / `accept()`
close and reopen the listening socket, so connects are refused. `latency_per_kb` adds a delay that
grows with the request's size, for routing tests. `prompt_only_embeddings` makes /embeddings accept
`prompt` (a string) and reject `input`, answering `{"embedding": [...]}` like Ollama's API.

Besides chat (the answer to any path it does not know) and embeddings, it serves the rest of the
OpenAI surface by default, in OpenAI's shapes with fixed, simple values: /responses (streamed as
the Responses API's named events when asked; kept for GET and DELETE /responses/{id} in
`up.stored`), /moderations (flags a text with "hx-flag"), /rerank, /audio/transcriptions and
/translations (multipart: `up.requests[-1].form` holds the parsed fields and files, `.body` the raw
bytes), /audio/speech (a WAV of silence, sent in chunks) and /images/generations. A `Stream`
action applies to any streamed answer: chat chunks, responses events, transcript events, speech.

It is the tests' independent reference for what an upstream says: it shares no code with the echo
backend (hxgwd/upstream/echo*.py), so a bug there cannot hide in both.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import struct
from typing import Any

import attrs
import h11
import trio


@attrs.define
class Reply:
    status: int = 200
    body: Any = None                 # dict -> JSON; bytes as is; None -> an OpenAI-like answer
    delay: float = 0.0
    retry_after: float | None = None
    headers: list[tuple[str, str]] = attrs.field(factory=list)
    close_after: bool = False        # close the connection after answering, without saying so


@attrs.define
class Stream:
    words: int = 5
    delay: float = 0.0               # between chunks
    first_delay: float = 0.0         # before the response head
    reset_after: int | None = None   # chunks sent before the connection is reset
    pad: int = 0                     # extra bytes of padding in each chunk
    burst: bool = False              # every event in one write, as an upstream that ran ahead does


@attrs.define
class Hang:
    pass


@attrs.define
class Raw:
    """Bytes written as they are, for answers h11 would not write; the connection is then
    `then`: "hold" (kept open, never read again), "close" or "reset". `later` is written
    `later_delay` seconds after, on a held connection: an answer to nothing."""
    data: bytes
    then: str = "hold"
    later: bytes = b""
    later_delay: float = 0.0
    delay: float = 0.0               # before `data`


@attrs.define
class Reset:
    pass


@attrs.frozen
class FormFile:
    filename: str
    content_type: str
    data: bytes


@attrs.frozen
class Received:
    method: str
    path: str
    headers: dict[str, str]
    json: Any
    body: bytes = b""                # the bytes as they arrived: what a backend's own parser reads
    form: dict[str, Any] | None = None   # a multipart body's fields: str, FormFile, or a list for "name[]"


class FakeUpstream:
    def __init__(self, *, dimensions: int = 1024, prompt_only_embeddings: bool = False,
                 latency_per_kb: float = 0.0, name: str = "fake", tls: ssl.SSLContext | None = None) -> None:
        self.dimensions = dimensions
        self.prompt_only_embeddings = prompt_only_embeddings
        self.latency_per_kb = latency_per_kb
        self.name = name
        self.tls = tls                   # serve HTTPS with this server context
        self.requests: list[Received] = []
        self.default: Any = None
        self._script: list[Any] = []
        self.port = 0
        self._listener: trio.SocketListener | None = None
        self._nursery: trio.Nursery | None = None
        self.connections = 0
        self.abandoned = 0               # hung requests whose caller closed the connection
        self.chunks_sent = 0             # stream chunks the socket accepted
        self._open: set[trio.SocketStream] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.stored: dict[str, dict[str, Any]] = {}    # responses made, by id (until DELETE)
        self._made = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def script(self, *actions: Any) -> None:
        self._script.extend(actions)

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._listen(nursery)
            task_status.started()
            await trio.sleep_forever()   # keeps the nursery open while refusing

    async def _listen(self, nursery: trio.Nursery) -> None:
        listener = (await trio.open_tcp_listeners(self.port, host="127.0.0.1"))[0]
        self.port = listener.socket.getsockname()[1]
        self._closed = trio.Event()
        await nursery.start(self._accept_loop, listener)

    async def _accept_loop(self, listener: trio.SocketListener,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with trio.CancelScope() as self._accepting:
                task_status.started()
                async with listener:
                    while True:
                        stream = await listener.accept()
                        assert self._nursery is not None
                        self._nursery.start_soon(self._handle, stream)
        finally:
            self._closed.set()

    async def refuse(self) -> None:
        """Go down: close the listening socket and every open connection, until accept()."""
        self._accepting.cancel()
        await self._closed.wait()
        for stream in list(self._open):
            _reset(stream)

    async def accept(self) -> None:
        assert self._nursery is not None
        await self._listen(self._nursery)

    # --- per connection ----------------------------------------------------------------------

    async def _handle(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        self._open.add(tcp)
        stream: trio.abc.Stream = trio.SSLStream(tcp, self.tls, server_side=True) if self.tls else tcp
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await _read_request(stream, conn)
                if request is None:
                    return
                keep = await self._answer(stream, conn, request, body)
                if not keep or conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            self._open.discard(tcp)
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    async def _answer(self, stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request,
                      body: bytes) -> bool:
        headers = {k.decode(): v.decode() for k, v in request.headers}
        form = _form(headers.get("content-type", ""), body)
        try:
            doc = json.loads(body) if body and form is None else None
        except ValueError:
            doc = None
        path = request.target.decode()
        method = request.method.decode()
        self.requests.append(Received(method, path, headers, doc, body, form))
        action = self._script.pop(0) if self._script else self.default
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency_per_kb:
                await trio.sleep(self.latency_per_kb * len(body) / 1024)
            if isinstance(action, Hang):   # until the gateway hangs up
                while await _receive_or_eof(stream):
                    pass
                self.abandoned += 1
                return False
            if isinstance(action, Reset):
                _reset(stream)
                return False
            if isinstance(action, Raw):
                await trio.sleep(action.delay)
                await stream.send_all(action.data)
                if action.then == "reset":
                    _reset(stream)
                elif action.then == "close":
                    await stream.aclose()
                else:
                    if action.later:
                        await trio.sleep(action.later_delay)
                        await stream.send_all(action.later)
                    while await _receive_or_eof(stream):
                        pass
                return False
            endpoint = path.split("?", 1)[0]
            wants_stream = (isinstance(doc, dict) and doc.get("stream")
                            or form is not None and form.get("stream") == "true")
            if endpoint.endswith("/audio/speech") and action is None:   # audio: a piece a word
                words = str(doc.get("input", "")).split() if isinstance(doc, dict) else []
                action = Stream(words=max(1, len(words)))
            if isinstance(action, Stream) or (action is None and wants_stream):
                return await self._stream(stream, conn, endpoint, doc if isinstance(doc, dict) else {},
                                          form or {}, action or Stream())
            reply = action or Reply()
            if reply.delay:
                await trio.sleep(reply.delay)
            status, payload, content_type = self._payload(method, endpoint, doc, form, reply)
            extra = [(k.encode(), v.encode()) for k, v in reply.headers]
            if reply.retry_after is not None:
                extra.append((b"retry-after", str(reply.retry_after).encode()))
            await _send(stream, conn, status, payload, extra, content_type)
            return not reply.close_after
        finally:
            self.in_flight -= 1

    def _payload(self, method: str, path: str, doc: Any, form: dict[str, Any] | None,
                 reply: Reply) -> tuple[int, bytes, bytes]:
        """(status, body, content type) of a whole answer."""
        if isinstance(reply.body, bytes):
            return reply.status, reply.body, b"application/json"
        if isinstance(reply.body, dict):
            return reply.status, json.dumps(reply.body).encode(), b"application/json"
        if reply.status != 200:
            return reply.status, _error(f"{self.name} says {reply.status}", "upstream"), b"application/json"
        doc = doc if isinstance(doc, dict) else {}
        if path.endswith("/models"):
            return _ok({"object": "list", "data": [{"id": "upstream-model", "object": "model"}]})
        if path.endswith("/embeddings"):
            return self._embeddings(doc)
        if path.endswith("/responses"):
            return _ok(self._response(doc))
        if re.search(r"/responses/[^/]+$", path):
            return self._stored(method, path.rsplit("/", 1)[1])
        if path.endswith("/moderations"):
            return _ok(_moderations(doc))
        if path.endswith("/rerank"):
            return _ok(_rerank(doc))
        if path.endswith(("/audio/transcriptions", "/audio/translations")):
            return _speech_to_text(path, form)
        if path.endswith("/images/generations"):
            return _ok(_images(doc))
        messages = doc.get("messages") or [{"role": "user", "content": doc.get("prompt", "")}]
        text = _answer_text(messages[-1].get("content", "") if isinstance(messages[-1], dict) else "")
        return _ok({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": doc.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            "served_by": self.name})

    def _embeddings(self, doc: dict[str, Any]) -> tuple[int, bytes, bytes]:
        if self.prompt_only_embeddings:
            if "input" in doc or not isinstance(doc.get("prompt"), str):
                return 400, json.dumps({"error": {"message": "field 'prompt' (a string) is required",
                                                  "type": "invalid_request_error"}}).encode(), b"application/json"
            return _ok({"embedding": _vector(doc["prompt"], self.dimensions)})
        given = doc.get("input")
        items = [given] if isinstance(given, str) else (given or [])
        return _ok({
            "object": "list", "model": doc.get("model"),
            "data": [{"object": "embedding", "index": i, "embedding": _vector(str(t), self.dimensions)}
                     for i, t in enumerate(items)],
            "usage": {"prompt_tokens": len(items), "total_tokens": len(items)}})

    def _response(self, doc: dict[str, Any], words: int | None = None) -> dict[str, Any]:
        """A completed Responses API object; kept in `stored` unless the request said store: false.
        `words`: answer with w0 .. w{words-1}, as a stream of that many deltas does."""
        given = doc.get("input")
        if words is None:
            if isinstance(given, list):
                user = [m for m in given if isinstance(m, dict) and m.get("role") == "user"]
                content = user[-1].get("content", "") if user else ""
                if isinstance(content, list):
                    content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
                given = content
            text = _answer_text(given if isinstance(given, str) else "")
        else:
            text = "".join(f"w{i} " for i in range(words))
        self._made += 1
        ident = f"resp_fake{self._made}"
        output_tokens = len(text.split())
        made = {
            "id": ident, "object": "response", "created_at": 1, "status": "completed", "error": None,
            "incomplete_details": None, "instructions": doc.get("instructions"), "model": doc.get("model"),
            "output": [{"type": "message", "id": f"msg_fake{self._made}", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "parallel_tool_calls": True, "previous_response_id": doc.get("previous_response_id"),
            "store": doc.get("store") is not False, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 7 + output_tokens},
            "served_by": self.name}
        if doc.get("store") is not False:
            self.stored[ident] = made
        return made

    def _stored(self, method: str, ident: str) -> tuple[int, bytes, bytes]:
        if ident not in self.stored:
            return 404, _error(f"Response with id '{ident}' not found.", "invalid_request_error"), b"application/json"
        if method == "DELETE":
            del self.stored[ident]
            return _ok({"id": ident, "object": "response", "deleted": True})
        return _ok(self.stored[ident])

    async def _stream(self, stream: trio.abc.Stream, conn: h11.Connection, path: str, doc: dict[str, Any],
                      form: dict[str, Any], action: Stream) -> bool:
        """A streamed answer: `action.words` pieces after its head (events, or audio for speech),
        each one HTTP chunk, paced, padded, burst or reset as the action says."""
        if action.first_delay:
            await trio.sleep(action.first_delay)
        content_type, pieces, tail = self._pieces(path, doc, form, action)
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
            (b"content-type", content_type), (b"transfer-encoding", b"chunked")])))
        if action.burst:    # one HTTP chunk per piece, all in one write
            await stream.send_all(b"".join(conn.send(h11.Data(data=e)) for e in pieces + tail)
                                  + conn.send(h11.EndOfMessage()))
            self.chunks_sent += len(pieces)
            return True
        for i, piece in enumerate(pieces):
            if action.reset_after is not None and i >= action.reset_after:
                _reset(stream)
                return False
            if action.delay and i:
                await trio.sleep(action.delay)
            await stream.send_all(conn.send(h11.Data(data=piece)))
            self.chunks_sent += 1
        await stream.send_all(b"".join(conn.send(h11.Data(data=t)) for t in tail) + conn.send(h11.EndOfMessage()))
        return True

    def _pieces(self, path: str, doc: dict[str, Any], form: dict[str, Any],
                action: Stream) -> tuple[bytes, list[bytes], list[bytes]]:
        """(content type, the pieces a Stream action paces, what follows them unpaced)."""
        pad: dict[str, Any] = {"pad": "x" * action.pad} if action.pad else {}
        if path.endswith("/audio/speech"):
            # 0.1 s of 24 kHz 16-bit mono silence a piece, after a WAV header for all of them
            size = 4800 * action.words
            head = (b"RIFF" + struct.pack("<I", 36 + size) + b"WAVEfmt "
                    + struct.pack("<IHHIIHH", 16, 1, 1, 24000, 48000, 2, 16) + b"data" + struct.pack("<I", size))
            return b"audio/wav", [head + bytes(4800)] + [bytes(4800)] * (action.words - 1), []
        if path.endswith("/responses"):
            final = self._response(doc, action.words)
            item = final["output"][0]
            at = {"item_id": item["id"], "output_index": 0, "content_index": 0}
            started: dict[str, Any] = {**final, "status": "in_progress", "output": [], "usage": None}
            events: list[dict[str, Any]] = [{"type": "response.created", "response": started},
                      {"type": "response.in_progress", "response": started},
                      {"type": "response.output_item.added", "output_index": 0,
                       "item": {**item, "status": "in_progress", "content": []}},
                      {"type": "response.content_part.added", **at,
                       "part": {"type": "output_text", "text": "", "annotations": []}}]
            events += [{"type": "response.output_text.delta", **at, "delta": f"w{i} ", "logprobs": [], **pad}
                       for i in range(action.words)]
            events += [{"type": "response.output_text.done", **at, "text": item["content"][0]["text"], "logprobs": []},
                       {"type": "response.content_part.done", **at, "part": item["content"][0]},
                       {"type": "response.output_item.done", "output_index": 0, "item": item},
                       {"type": "response.completed", "response": final}]
            return b"text/event-stream", [f"event: {e['type']}\ndata: ".encode()
                                          + json.dumps({**e, "sequence_number": n}).encode() + b"\n\n"
                                          for n, e in enumerate(events)], []
        if path.endswith("/audio/transcriptions"):
            deltas: list[dict[str, Any]] = [{"type": "transcript.text.delta", "delta": f"w{i} ", **pad} for i in range(action.words)]
            done = {"type": "transcript.text.done", "text": "".join(d["delta"] for d in deltas),
                    "usage": {"type": "tokens", "input_tokens": 7, "output_tokens": action.words,
                              "total_tokens": 7 + action.words}}
            return b"text/event-stream", [b"data: " + json.dumps(e).encode() + b"\n\n" for e in deltas + [done]], []
        chunks: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}], **pad}
                  for i in range(action.words)]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (doc.get("stream_options") or {}).get("include_usage"):
            chunks.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": action.words,
                                                    "total_tokens": 7 + action.words}})
        encoded = [b"data: " + json.dumps({"object": "chat.completion.chunk", **c}).encode() + b"\n\n" for c in chunks]
        return b"text/event-stream", encoded, [b"data: [DONE]\n\n"]


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection) -> tuple[h11.Request | None, bytes]:
    request, body = None, bytearray()     # not bytes +=: a 20 MB upload would be copied 300 times
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""


async def _receive_or_eof(stream: trio.abc.Stream) -> bytes:
    try:
        return bytes(await stream.receive_some(65536))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""


async def _send(stream: trio.abc.Stream, conn: h11.Connection, status: int, payload: bytes,
                extra: list[tuple[bytes, bytes]], content_type: bytes = b"application/json") -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(payload)).encode()), *extra]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers))
                          + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))


def _reset(stream: trio.abc.Stream) -> None:
    tcp = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    assert isinstance(tcp, trio.SocketStream)
    try:
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    tcp.socket.close()


def _answer_text(content: Any) -> str:
    text = content if isinstance(content, str) else ""
    marker = "Return exactly the text:"
    return text.split(marker, 1)[1].strip() if marker in text else f"echo: {text}"


def _vector(text: str, n: int) -> list[float]:
    seed = sum(text.encode()) or 1
    return [((seed * (i + 1)) % 97) / 97.0 for i in range(n)]


def _ok(doc: dict[str, Any]) -> tuple[int, bytes, bytes]:
    return 200, json.dumps(doc).encode(), b"application/json"


def _error(message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()


def _form(content_type: str, body: bytes) -> dict[str, Any] | None:
    """A multipart/form-data body's fields, split the plain way (not the echo's parser: this is
    the reference it is checked against). None for any other body."""
    found = re.search(r'multipart/form-data;.*boundary="?([^";]+)"?', content_type, re.I)
    if not found:
        return None
    form: dict[str, Any] = {}
    for part in body.split(b"--" + found.group(1).encode())[1:-1]:   # preamble ... parts ... "--"
        head, _, data = part[2:].partition(b"\r\n\r\n")           # after the delimiter's CRLF
        data = data[:-2]                                              # the CRLF before the next one
        disposition = next((line for line in head.decode().split("\r\n")
                            if line.lower().startswith("content-disposition:")), "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        kind = re.search(r"(?im)^content-type:\s*(\S+)", head.decode())
        if not name:
            continue
        value: Any = (FormFile(filename.group(1), kind.group(1) if kind else "application/octet-stream", data)
                      if filename else data.decode())
        if name.group(1).endswith("[]"):
            form.setdefault(name.group(1), []).append(value)
        else:
            form[name.group(1)] = value
    return form


def _moderations(doc: dict[str, Any]) -> dict[str, Any]:
    given = doc.get("input")
    texts = [given] if isinstance(given, str) else [t if isinstance(t, str) else json.dumps(t) for t in given or []]
    categories = ["harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                  "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors",
                  "violence", "violence/graphic"]

    def result(text: str) -> dict[str, Any]:
        flagged = "hx-flag" in text.lower()
        return {"flagged": flagged,
                "categories": {c: flagged and c == "violence" for c in categories},
                "category_scores": {c: 0.99 if flagged and c == "violence" else 0.0 for c in categories},
                "category_applied_input_types": {c: ["text"] for c in categories}}
    return {"id": "modr-fake", "model": doc.get("model", "omni-moderation-latest"), "results": [result(t) for t in texts]}


def _rerank(doc: dict[str, Any]) -> dict[str, Any]:
    """Score 1.0 for a document holding the whole query (any case), else lower the later it came."""
    query = str(doc.get("query", "")).lower()
    texts = [d if isinstance(d, str) else d.get("text", "") for d in doc.get("documents") or []]
    scored = sorted(((1.0 if query and query in t.lower() else 0.5 / (i + 1), i) for i, t in enumerate(texts)),
                    key=lambda s: (-s[0], s[1]))
    results = [{"index": i, "relevance_score": score,
                **({"document": {"text": texts[i]}} if doc.get("return_documents", True) else {})}
               for score, i in scored[:doc.get("top_n") or len(scored)]]
    return {"id": "rerank-fake", "model": doc.get("model"), "results": results, "usage": {"total_tokens": 7}}


def _speech_to_text(path: str, form: dict[str, Any] | None) -> tuple[int, bytes, bytes]:
    upload = (form or {}).get("file")
    if not isinstance(upload, FormFile):
        return 400, _error("'file' is required", "invalid_request_error"), b"application/json"
    assert form is not None
    task = "translation" if path.endswith("/translations") else "transcription"
    text = f"fake {task} of {upload.filename}, {len(upload.data)} bytes"
    if form.get("response_format") == "text":
        return 200, text.encode() + b"\n", b"text/plain; charset=utf-8"
    doc: dict[str, Any] = {"text": text}
    if task == "transcription":   # OpenAI's: whisper billed by the second, the others by tokens
        doc["usage"] = ({"type": "duration", "seconds": 3} if "whisper" in str(form.get("model"))
                        else {"type": "tokens", "input_tokens": 7, "output_tokens": len(text.split()),
                              "total_tokens": 7 + len(text.split())})
    return _ok(doc)


# a well-known valid 1x1 PNG
PNG_1X1 = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=")


def _images(doc: dict[str, Any]) -> dict[str, Any]:
    encoded = base64.b64encode(PNG_1X1).decode()
    image = {"url": "data:image/png;base64," + encoded} if doc.get("response_format") == "url" else {"b64_json": encoded}
    n = doc.get("n") or 1
    return {"created": 1, "data": [image] * n,
            "usage": {"input_tokens": 7, "input_tokens_details": {"image_tokens": 0, "text_tokens": 7},
                      "output_tokens": n, "total_tokens": 7 + n}}
