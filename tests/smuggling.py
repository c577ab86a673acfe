"""Helpers for the smuggling tests: a raw capturing upstream, and strict parsers of our own.

The parsers here are the test's, deliberately small and strict, and share no code with the
gateway: the point is to check what the gateway wrote on the wire against an independent reading
of it. `frame_requests` reads what the upstream received (the gateway always writes `name: value`
lines, CRLF, and a Content-Length: anything else is reported as malformed, not guessed at);
`parse_responses` reads what a client received.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs
import trio

REQUEST_LINE = re.compile(rb"([A-Z]+) (/[\x21-\x7e]*) HTTP/1\.1\Z")
HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ([^\r\n\x00]*)\Z")
# a request line anywhere, not only at a line start (a pipelined request follows a body's last
# byte directly): what a second, hidden request looks like, in a head or in a body
ANY_REQUEST_LINE = re.compile(rb"[A-Za-z]+[ \t]+\S+[ \t]+HTTP/\d")
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?\Z")


class Malformed(Exception):
    """Bytes the strict test parser does not read as one unambiguous message."""


@attrs.frozen
class Message:
    start: bytes                            # request line or status line
    headers: list[tuple[bytes, bytes]]      # names lowercased, in order
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        return values[0] if values else None

    @property
    def status(self) -> int:
        return int(self.start[9:12])

    def json(self) -> Any:
        return json.loads(self.body)


def _head(data: bytes, line_re: re.Pattern[bytes]) -> tuple[bytes, list[tuple[bytes, bytes]], int] | None:
    """The start line, headers and the offset after the blank line; None if the head is incomplete."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if b"\n" in data.replace(b"\r\n", b"") or len(data) > 1 << 20:
            raise Malformed(f"bare LF or endless head: {data[:200]!r}")
        return None
    lines = data[:end].split(b"\r\n")
    if not line_re.match(lines[0]):
        raise Malformed(f"start line {lines[0][:200]!r}")
    headers = []
    for line in lines[1:]:
        m = HEADER_LINE.match(line)
        if not m:
            raise Malformed(f"header line {line[:200]!r}")
        headers.append((m.group(1).lower(), m.group(2)))
    return lines[0], headers, end + 4


def _chunked(data: bytes, at: int) -> tuple[bytes, int] | None:
    body = b""
    while True:
        eol = data.find(b"\r\n", at)
        if eol < 0:
            return None
        size_text = data[at:eol]
        if not re.fullmatch(rb"[0-9a-fA-F]{1,8}", size_text):
            raise Malformed(f"chunk size {size_text[:40]!r}")
        size = int(size_text, 16)
        at = eol + 2
        if size == 0:
            if data[at:at + 2] == b"\r\n":
                return body, at + 2
            if len(data) < at + 2:
                return None
            raise Malformed("trailers in a message the gateway wrote")
        if len(data) < at + size + 2:
            return None
        if data[at + size:at + size + 2] != b"\r\n":
            raise Malformed("chunk data longer than its size")
        body += data[at:at + size]
        at += size + 2


def _framed(data: bytes, line_re: re.Pattern[bytes], *, response: bool) -> tuple[list[Message], bytes]:
    messages = []
    while data:
        head = _head(data, line_re)
        if head is None:
            break
        start, headers, at = head
        lengths = [v for n, v in headers if n == b"content-length"]
        encodings = [v for n, v in headers if n == b"transfer-encoding"]
        if len(lengths) > 1 or (lengths and encodings) or (lengths and not re.fullmatch(rb"[0-9]{1,12}", lengths[0])):
            raise Malformed(f"ambiguous framing: {lengths} {encodings}")
        if encodings and encodings != [b"chunked"]:
            raise Malformed(f"transfer-encoding {encodings}")
        status = int(start[9:12]) if response else 0
        if response and (100 <= status < 200 or status in (204, 304)):
            body = b""
        elif encodings:
            got = _chunked(data, at)
            if got is None:
                break
            body, at = got
        elif lengths:
            n = int(lengths[0])
            if len(data) < at + n:
                break
            body, at = data[at:at + n], at + n
        elif response:
            body, at = data[at:], len(data)      # delimited by the close
        else:
            body = b""
        messages.append(Message(start, headers, body))
        data = data[at:]
    return messages, data


def frame_requests(data: bytes) -> tuple[list[Message], bytes]:
    """The requests in `data` as the gateway should have written them, and what is left after them."""
    return _framed(data, REQUEST_LINE, response=False)


def parse_responses(data: bytes) -> tuple[list[Message], bytes]:
    return _framed(data, STATUS_LINE, response=True)


def chat_answer(content: str, model: str = "m") -> bytes:
    return json.dumps({
        "id": "chatcmpl-raw", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}).encode()


def answer_bytes(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), extra, body))


def echo_answer(request: Message) -> bytes:
    """The default answer: a valid chat completion saying what the request's last message said."""
    try:
        content = request.json()["messages"][-1]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        content = "?"
    return answer_bytes(chat_answer(f"echo: {content}"))


@attrs.define
class Scripted:
    """One answer: `data` written as is, then `then`: "keep" (go on reading requests), "hold"
    (never read or write again, until the gateway closes) or "close"; `later` written `later_delay`
    seconds after `data`, on the same connection. `split`: the first `split` bytes of `data` go in
    a write of their own, PAUSE seconds before the rest, so that the gateway reads them apart."""
    data: bytes
    then: str = "keep"
    later: bytes = b""
    later_delay: float = 0.0
    split: int = 0


PAUSE = 0.05


class CapturingUpstream:
    """Records every byte it receives, per connection; answers each request it frames (strictly,
    with the parser above) with the next scripted answer, else with `echo_answer`."""

    def __init__(self) -> None:
        self.connections: list[bytearray] = []
        self.script: list[Scripted] = []
        self.malformed: list[str] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c) for c in self.connections)

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        self.port = listener.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            async with listener:
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        seen = bytearray()
        self.connections.append(seen)
        pending = b""
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    seen += data
                    pending += data
                    try:
                        requests, pending = frame_requests(pending)
                    except Malformed as exc:
                        self.malformed.append(str(exc))
                        return
                    for request in requests:
                        answer = self.script.pop(0) if self.script else Scripted(echo_answer(request))
                        if answer.split:
                            await stream.send_all(answer.data[:answer.split])
                            await trio.sleep(PAUSE)
                        await stream.send_all(answer.data[answer.split:])
                        if answer.later:
                            await trio.sleep(answer.later_delay)
                            await stream.send_all(answer.later)
                        if answer.then == "close":
                            return
                        if answer.then == "hold":
                            while data := await stream.receive_some(65536):
                                seen += data
                            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def exchange(port: int, data: bytes, *, bound: float = 10.0) -> tuple[bytes, bool]:
    """Send `data` on a new connection and read until the gateway closes it (a reset counts as a
    close: what was read before it is kept). Returns the bytes and whether it closed within `bound`."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    closed = False
    try:
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            pass        # refused part way (a head over the limit): the answer may have come before
        with trio.move_on_after(bound):
            while chunk := await stream.receive_some(65536):
                out += chunk
            closed = True
    except trio.BrokenResourceError:
        closed = True
    finally:
        await stream.aclose()
    return out, closed
