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
"""

from __future__ import annotations

import json
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
class Received:
    method: str
    path: str
    headers: dict[str, str]
    json: Any
    body: bytes = b""                # the bytes as they arrived: what a backend's own parser reads


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

    async def _answer(self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request,
                      body: bytes) -> bool:
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            doc = None
        headers = {k.decode(): v.decode() for k, v in request.headers}
        path = request.target.decode()
        self.requests.append(Received(request.method.decode(), path, headers, doc, body))
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
            if isinstance(action, Stream) or (action is None and isinstance(doc, dict) and doc.get("stream")):
                return await self._stream(stream, conn, doc or {}, action or Stream())
            reply = action or Reply()
            if reply.delay:
                await trio.sleep(reply.delay)
            status, payload = self._payload(path, doc, reply)
            extra = [(k.encode(), v.encode()) for k, v in reply.headers]
            if reply.retry_after is not None:
                extra.append((b"retry-after", str(reply.retry_after).encode()))
            await _send(stream, conn, status, payload, extra)
            return not reply.close_after
        finally:
            self.in_flight -= 1

    def _payload(self, path: str, doc: Any, reply: Reply) -> tuple[int, bytes]:
        if isinstance(reply.body, bytes):
            return reply.status, reply.body
        if isinstance(reply.body, dict):
            return reply.status, json.dumps(reply.body).encode()
        if reply.status != 200:
            return reply.status, json.dumps({"error": {"message": f"{self.name} says {reply.status}",
                                                       "type": "upstream", "param": None, "code": None}}).encode()
        doc = doc if isinstance(doc, dict) else {}
        if path.endswith("/models"):
            return 200, json.dumps({"object": "list", "data": [{"id": "upstream-model", "object": "model"}]}).encode()
        if path.endswith("/embeddings"):
            return self._embeddings(doc)
        messages = doc.get("messages") or [{"role": "user", "content": doc.get("prompt", "")}]
        text = _answer_text(messages[-1].get("content", "") if isinstance(messages[-1], dict) else "")
        return 200, json.dumps({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": doc.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            "served_by": self.name}).encode()

    def _embeddings(self, doc: dict[str, Any]) -> tuple[int, bytes]:
        if self.prompt_only_embeddings:
            if "input" in doc or not isinstance(doc.get("prompt"), str):
                return 400, json.dumps({"error": {"message": "field 'prompt' (a string) is required",
                                                  "type": "invalid_request_error"}}).encode()
            return 200, json.dumps({"embedding": _vector(doc["prompt"], self.dimensions)}).encode()
        given = doc.get("input")
        items = [given] if isinstance(given, str) else (given or [])
        return 200, json.dumps({
            "object": "list", "model": doc.get("model"),
            "data": [{"object": "embedding", "index": i, "embedding": _vector(str(t), self.dimensions)}
                     for i, t in enumerate(items)],
            "usage": {"prompt_tokens": len(items), "total_tokens": len(items)}}).encode()

    async def _stream(self, stream: trio.SocketStream, conn: h11.Connection, doc: dict[str, Any],
                      action: Stream) -> bool:
        if action.first_delay:
            await trio.sleep(action.first_delay)
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
            (b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")])))
        chunks = [{"choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}],
                   **({"pad": "x" * action.pad} if action.pad else {})}
                  for i in range(action.words)]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (doc.get("stream_options") or {}).get("include_usage"):
            chunks.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": action.words,
                                                    "total_tokens": 7 + action.words}})
        if action.burst:    # one HTTP chunk per event, all in one write
            events = [b"data: " + json.dumps({"object": "chat.completion.chunk", **c}).encode() + b"\n\n"
                      for c in chunks] + [b"data: [DONE]\n\n"]
            await stream.send_all(b"".join(conn.send(h11.Data(data=e)) for e in events) + conn.send(h11.EndOfMessage()))
            self.chunks_sent += len(chunks)
            return True
        for i, chunk in enumerate(chunks):
            if action.reset_after is not None and i >= action.reset_after:
                _reset(stream)
                return False
            if action.delay and i:
                await trio.sleep(action.delay)
            event = b"data: " + json.dumps({"object": "chat.completion.chunk", **chunk}).encode() + b"\n\n"
            await stream.send_all(conn.send(h11.Data(data=event)))
            self.chunks_sent += 1
        await stream.send_all(conn.send(h11.Data(data=b"data: [DONE]\n\n")) + conn.send(h11.EndOfMessage()))
        return True


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> tuple[h11.Request | None, bytes]:
    request, body = None, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""


async def _receive_or_eof(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(65536)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""


async def _send(stream: trio.SocketStream, conn: h11.Connection, status: int, payload: bytes,
                extra: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *extra]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers))
                          + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))


def _reset(stream: trio.abc.Stream) -> None:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    stream.socket.close()


def _answer_text(content: Any) -> str:
    text = content if isinstance(content, str) else ""
    marker = "Return exactly the text:"
    return text.split(marker, 1)[1].strip() if marker in text else f"echo: {text}"


def _vector(text: str, n: int) -> list[float]:
    seed = sum(text.encode()) or 1
    return [((seed * (i + 1)) % 97) / 97.0 for i in range(n)]
