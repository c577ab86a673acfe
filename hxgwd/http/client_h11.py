"""The client protocol over h11: the pure-Python reference backend (see client.py).

h11 tracks the exchange, so it is told a request went out (a stand-in with our method; the bytes
on the wire are written by `request_bytes`). It parses more leniently than llhttp in places
(client.STRICTNESS): the head's raw bytes are kept until h11 has parsed it, and checked here for
what llhttp refuses. That costs a copy of each head; this backend is the reference, not the hot path.
"""

from __future__ import annotations

from typing import Sequence

import h11

import hxgwd.http.h11_chunks  # noqa: F401  (llhttp's chunk extension grammar)

from hxgwd.http.client import (END_OF_MESSAGE, NEED_DATA, ResponseError, ResponseHead, body_framing,
                               check_status, head_size, request_bytes)
from hxgwd.http.events import Marker

_STAND_IN = [(b"host", b"upstream"), (b"content-length", b"0")]
_STAND_INS: dict[bytes, h11.Request] = {}   # by method: an h11 event is immutable, and building one
                                             # (h11 validates its headers) was an eighth of a request
_END = h11.EndOfMessage()


def _stand_in(method: bytes) -> h11.Request:
    event = _STAND_INS.get(method)
    if event is None:
        event = h11.Request(method=method, target=b"/", headers=_STAND_IN)
        if len(_STAND_INS) < 64:
            _STAND_INS[method] = event
    return event
_CONTROLS = bytes(range(0x09)) + bytes(range(0x0a, 0x20)) + b"\x7f"   # all but HTAB
_NEWLINES = b"\r\n"


class H11Client:
    __slots__ = ("_h11", "_max", "_method", "_raw", "_in_head", "_ended", "_stray", "_closed", "_chunked", "_tail", "_raw_after_head", "_failed")

    def __init__(self, max_head_bytes: int) -> None:
        self._max = max_head_bytes
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        self._method = b"GET"
        self._raw = b""          # the head's bytes so far (and what came with them), for the checks
        self._in_head = False
        self._ended = False
        self._stray = False      # bytes other than CR/LF after the response
        self._closed = False
        self._chunked = False
        self._raw_after_head = b""
        self._failed = False
        self._tail = b""         # the last bytes of a chunked body: how it ended is checked

    def __repr__(self) -> str:
        return f"<H11Client us={self._h11.our_state} them={self._h11.their_state}>"

    @property
    def reusable(self) -> bool:
        c = self._h11
        return (self._ended and not self._stray and not self._closed and not self._failed
                and c.our_state is h11.DONE and c.their_state is h11.DONE)

    def request(self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes,
                body_length: int | None = None) -> bytes:
        if self._in_head or self._ended:
            raise RuntimeError("a request is under way: start_next() after its response")
        data = request_bytes(method, target, headers, body, body_length)
        self._method = method
        self._h11.send(_stand_in(method))
        self._h11.send(_END)
        self._raw, self._in_head, self._ended = b"", True, False
        return data

    def start_next(self) -> None:
        if not self.reusable:
            raise RuntimeError("the connection is not reusable")
        if self._h11.trailing_data[0]:        # CR/LF after the answer: h11 would call them no status line
            self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max)
        else:
            self._h11.start_next_cycle()
        self._ended = False

    def feed(self, data: bytes) -> None:
        if not data:
            self._closed = True
            if not self._ended:
                self._h11.receive_data(b"")
            return
        if self._ended:        # never parsed as the next answer; only CR/LF are let be
            self._stray = self._stray or bool(data.strip(_NEWLINES))
            return
        if self._in_head:
            if not self._raw:
                data = data.lstrip(_NEWLINES)
                if not data:
                    return
            self._raw += data
        elif self._chunked:
            self._tail = self._tail[-4:] + data
        self._h11.receive_data(data)

    def next(self) -> ResponseHead | bytes | Marker:
        try:
            return self._next()
        except ResponseError:
            self._failed = True
            raise

    def _next(self) -> ResponseHead | bytes | Marker:
        if self._ended:
            if self._stray:
                raise ResponseError("bytes after the response")
            return NEED_DATA
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise ResponseError(str(exc)) from None
            # `type(event) is`, which mypy narrows `event` by (an alias of the type it does not)
            if type(event) is h11.Data:
                return bytes(event.data)
            if event is h11.NEED_DATA:
                return NEED_DATA
            if type(event) is h11.EndOfMessage:
                self._ended = True
                leftover = self._h11.trailing_data[0]
                self._stray = bool(leftover.strip(_NEWLINES))
                if self._chunked:
                    self._check_chunked_end(event, len(leftover))
                return END_OF_MESSAGE
            if type(event) is h11.Response:
                return self._head(event)
            if type(event) is h11.InformationalResponse:
                self._after_informational(event)
                continue
            raise ResponseError("the connection closed before the response ended")

    def _head(self, event: h11.Response) -> ResponseHead:
        check_status(event.status_code, event.http_version)
        headers = list(event.headers)
        if head_size(event.reason, headers) > self._max:
            raise ResponseError("the response head is too large")
        self._check_raw_head()
        self._chunked = body_framing(event.status_code, headers) == "chunked"
        if self._chunked:
            self._tail = self._raw_after_head
        return ResponseHead(event.status_code, headers)

    def _check_chunked_end(self, event: h11.EndOfMessage, leftover: int) -> None:
        """llhttp wants CRLF after the last chunk, where h11 takes a bare LF; trailers are
        refused by both (client.STRICTNESS)."""
        self._chunked = False
        if event.headers:
            raise ResponseError("trailers after a chunked body")
        tail, self._tail = self._tail, b""
        if not tail[: len(tail) - leftover].endswith(b"\r\n\r\n"):
            raise ResponseError("the chunked body does not end in CRLF")

    def _check_raw_head(self) -> None:
        """What llhttp refuses and h11 takes (client.STRICTNESS), in the head h11 just parsed."""
        raw, self._raw, self._in_head = self._raw, b"", False
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            raise ResponseError("a line of the head does not end in CRLF")
        self._raw_after_head = raw[end:]
        head = raw[: end + 2]
        if head.count(b"\n") != head.count(b"\r\n"):
            raise ResponseError("a line of the head does not end in CRLF")
        fields = head[head.find(b"\r\n") + 2:]
        if b"\r\n " in head or b"\r\n\t" in head or fields[:1] in (b" ", b"\t"):
            raise ResponseError("an obsolete folded header line")
        plain = fields.replace(b"\r\n", b"")
        if len(plain.translate(None, _CONTROLS)) != len(plain):
            raise ResponseError("a control character in a header")
        lengths = [line for line in fields.split(b"\r\n") if line[:15].lower() == b"content-length:"]
        if len(lengths) > 1 or any(b"," in line for line in lengths):
            raise ResponseError("more than one Content-Length")

    def _after_informational(self, event: h11.InformationalResponse) -> None:
        if event.http_version != b"1.1":       # HTTP/1.0 has none; llhttp refuses them
            raise ResponseError("an informational answer in HTTP/1.0")
        body_framing(event.status_code, list(event.headers))      # refuses 101
        self._check_raw_head()
        # what follows may begin with CR/LF, which llhttp skips and h11 refuses: a fresh h11
        # for the final answer, given the rest without them
        rest = self._h11.trailing_data[0].lstrip(_NEWLINES)
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max)
        self._h11.send(_stand_in(self._method))
        self._h11.send(_END)
        self._in_head = True
        if rest:
            self.feed(rest)
