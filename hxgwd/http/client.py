"""The sans-I/O client side of one HTTP/1.1 connection: the twin of the server's connection.

No sockets and no trio: `request()` returns the bytes of a request to write, `feed()` takes what
the upstream sent (b"" when it closed cleanly; a reset is not an end, and is never fed), and
`next()` hands out what has arrived: a `ResponseHead`, a body piece (bytes), `END_OF_MESSAGE`, or
`NEED_DATA`. Informational answers (100, 103) are skipped. Anything malformed raises
`ResponseError`, after which the connection is done.

    proto = client_protocol("httptools", max_head_bytes=65536)
    write(proto.request(b"POST", b"/v1/chat/completions", [(b"host", b"api:443"), ...], body))
    while (event := proto.next()) is NEED_DATA: proto.feed(read())
    ...
    if proto.reusable: proto.start_next()      # else close the connection

Two backends, alike from outside: llhttp (`client_llhttp.py`, the hot path) and h11
(`client_h11.py`, the reference). Where the two parsers disagree on what is acceptable, each
backend adds the other's refusals, so both accept the same answers or both refuse (the
differential fuzz checks it); see STRICTNESS.

The request head is written by `heads.request_head` from checked values, never copied raw.
HEAD is refused: its answer carries a Content-Length but no body, which llhttp cannot be told,
and the gateway never sends HEAD upstream.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import attrs

# re-exported: the client side's events, as the backends and the pool take them
from hxgwd.http.events import END_OF_MESSAGE as END_OF_MESSAGE
from hxgwd.http.events import NEED_DATA as NEED_DATA
from hxgwd.http.events import Marker
from hxgwd.http.heads import request_head

Headers = list[tuple[bytes, bytes]]

STRICTNESS = """What both backends refuse, though one parser alone would take it:
  h11 alone takes: bare LF line ends, obs-fold continuation lines, control characters (C0 but
    HTAB, and DEL) in header values, Content-Length beside Transfer-Encoding, a repeated or
    comma-listed Content-Length (it merges them), any HTTP/x.y version.
  llhttp alone takes: status codes below 100, Transfer-Encoding other than exactly "chunked"
    (gzip, identity), HTTP/1.0 keep-alive, leading CR/LF that h11 calls "no response line".
Both take, by choice: CR/LF between answers and before a status line (llhttp skips them; the
h11 backend strips them), and spaces after a chunk size (h11 does; llhttp is told to).
A head is measured the same way in both (`head_size`), and trailing spaces of a header value
are dropped by both."""


class ResponseError(Exception):
    """The upstream's answer is not HTTP/1.1 we accept; the connection cannot be used again."""


@attrs.frozen(slots=True)
class ResponseHead:
    status: int
    headers: Headers            # names lowercased, in arrival order




class ClientProtocol(Protocol):
    @property
    def reusable(self) -> bool: ...

    def request(self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes,
                body_length: int | None = None) -> bytes: ...

    def feed(self, data: bytes) -> None: ...

    def next(self) -> ResponseHead | bytes | Marker: ...

    def start_next(self) -> None: ...


def request_bytes(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes,
                  body_length: int | None = None) -> bytes:
    """Head and body of a request framed by Content-Length (none on a bodiless GET, as RFC 9110
    8.6 asks). `headers` hold Host and no framing header: those are ours to write. `body_length`:
    the head only, announcing a body of that length that the caller sends itself, in pieces."""
    if method == b"HEAD":
        raise ValueError("HEAD is not sent upstream: its answer's framing differs")
    length = len(body) if body_length is None else body_length
    if length or method != b"GET":
        headers = [*headers, (b"content-length", b"%d" % length)]
    return request_head(method, target, headers) + (body if body_length is None else b"")


def head_size(reason: bytes, headers: Headers) -> int:
    """A head's size as both backends count it: as if written with one space after each colon."""
    size = 15 + len(reason)                 # "HTTP/1.1 200 " + reason + CRLF
    for name, value in headers:
        size += len(name) + len(value) + 4
    return size + 2


def body_framing(status: int, headers: Headers) -> str:
    """How a response head frames its body (RFC 9112 6): "length", "chunked", "none" (1xx, 204,
    304) or "close" (read to the end of the connection); ResponseError if it frames it badly."""
    lengths = encodings = 0
    for name, value in headers:
        if name == b"content-length":
            lengths += 1
            if b"," in value:
                raise ResponseError("a listed Content-Length")
        elif name == b"transfer-encoding":
            encodings += 1
            if value.strip().lower() != b"chunked":
                raise ResponseError("a Transfer-Encoding other than chunked")
    if lengths > 1 or encodings > 1:
        raise ResponseError("more than one Content-Length or Transfer-Encoding")
    if lengths and encodings:
        raise ResponseError("both Content-Length and Transfer-Encoding")
    if status == 101:
        raise ResponseError("101 Switching Protocols to a request that asked for none")
    if status < 200 or status in (204, 304):
        return "none"
    return "chunked" if encodings else "length" if lengths else "close"


def check_status(status: int, version: bytes) -> None:
    if status < 100:
        raise ResponseError(f"status {status}")
    if version != b"1.1" and version != b"1.0":
        raise ResponseError("not HTTP/1.1 or 1.0")
