"""The client protocol over llhttp (httptools): the hot-path backend (see client.py).

llhttp parses everything it is fed at once and reports through callbacks; they append to a list
of events that `next()` hands out. The list holds at most what one `feed()` brought (the caller
feeds after NEED_DATA), so it is bounded by the read size. Bytes fed after the answer ended are
never given to llhttp (it would parse them as the next answer): they only make the connection
unusable. llhttp has no "the peer closed" call, so a body delimited by the close is ended here.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import httptools

from hxgwd.http.client import (END_OF_MESSAGE, NEED_DATA, ResponseError, ResponseHead, body_framing,
                               check_status, request_bytes)
from hxgwd.http.events import Marker

_NEWLINES = b"\r\n"
_NOT_IN_REASON = b"\x00\x0b\x0c"


class _Stray(Exception):
    """A second answer began behind the first."""


class LlhttpClient:
    __slots__ = ("_parser", "_max", "_events", "_headers", "_reason", "_size", "_raw", "_in_head",
                 "_informational", "_close_delimited", "_keep_alive", "_ended", "_stray", "_closed",
                 "_error")

    def __init__(self, max_head_bytes: int) -> None:
        self._max = max_head_bytes
        self._parser = httptools.HttpResponseParser(self)
        # h11 takes "2 \r\n" as a chunk size; llhttp only when told (client.STRICTNESS)
        self._parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
        self._events: deque[ResponseHead | bytes | Marker] = deque()
        self._error: ResponseError | None = None
        self._closed = False
        self._reset()
        self._in_head = False

    def _reset(self) -> None:
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._size = 0
        self._raw = 0              # bytes fed while the head is incomplete
        self._in_head = True
        self._informational = False
        self._close_delimited = False
        self._keep_alive = False
        self._ended = False
        self._stray = False

    def __repr__(self) -> str:
        return f"<LlhttpClient in_head={self._in_head} ended={self._ended} events={len(self._events)}>"

    @property
    def reusable(self) -> bool:
        return self._ended and self._keep_alive and not self._stray and not self._closed and self._error is None

    def request(self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes,
                body_length: int | None = None) -> bytes:
        if self._in_head or self._ended:
            raise RuntimeError("a request is under way: start_next() after its response")
        data = request_bytes(method, target, headers, body, body_length)
        self._in_head = True
        return data

    def start_next(self) -> None:
        if not self.reusable:
            raise RuntimeError("the connection is not reusable")
        self._reset()
        self._in_head = False

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            return
        if not data:
            self._closed = True
            if self._ended:
                return
            if not self._in_head and self._close_delimited:
                self._events.append(END_OF_MESSAGE)
                self._ended = True
            else:
                self._error = ResponseError("the connection closed before the response ended")
            return
        if self._ended:         # never parsed as the next answer; only CR/LF are let be
            self._stray = self._stray or bool(data.strip(_NEWLINES))
            return
        if self._in_head:
            self._raw += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # feed_data's callbacks may have set _ended, which mypy took to be False from above
            if self._ended:     # in bytes after the answer (_Stray included)
                self._stray = True  # type: ignore[unreachable]
            else:
                cause = exc.__context__
                self._error = cause if isinstance(cause, ResponseError) else ResponseError(str(exc))
            return
        if self._in_head and self._raw > self._max:
            self._error = ResponseError("the response head is too large")

    def next(self) -> ResponseHead | bytes | Marker:
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        if self._stray:
            raise ResponseError("bytes after the response")
        return NEED_DATA

    # --- llhttp's callbacks, from inside feed_data -----------------------------------------

    def on_message_begin(self) -> None:
        if self._ended:
            raise _Stray()

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:       # h11 takes bare LFs in trailers where llhttp does not
            raise ResponseError("trailers after a chunked body")
        if value[-1:] in (b" ", b"\t"):
            value = value.rstrip(b" \t")
        self._size += len(name) + len(value) + 4
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        version = parser.get_http_version().encode()
        check_status(status, version)
        if len(self._reason.translate(None, _NOT_IN_REASON)) != len(self._reason):
            raise ResponseError("a control character in the reason phrase")    # as h11
        headers = self._headers
        if self._size + 17 + len(self._reason) > self._max:     # as client.head_size counts
            raise ResponseError("the response head is too large")
        framing = body_framing(status, headers)
        if status < 200:            # 100 Continue, 103 Early Hints: skipped
            if version != b"1.1":
                raise ResponseError("an informational answer in HTTP/1.0")
            self._informational = True
            self._headers, self._reason, self._size = [], b"", 0
            return
        self._in_head = False
        self._close_delimited = framing == "close"
        self._keep_alive = version == b"1.1" and parser.should_keep_alive()
        self._events.append(ResponseHead(status, headers))

    def on_body(self, body: bytes) -> None:
        if body:
            self._events.append(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            self._raw = 0
            return
        self._ended = True
        self._events.append(END_OF_MESSAGE)
