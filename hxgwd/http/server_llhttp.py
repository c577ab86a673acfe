"""The server protocol's llhttp backend (httptools): Node.js's parser, in C, the hot path.

llhttp is push-based: `feed()` runs it over the bytes, and its callbacks append what they found
to a queue that `next()` hands out. The connection feeds only when `next()` said NEED_DATA, so the
queue holds at most what one receive carried (a pipeline's requests, each to be answered in turn).

llhttp has no size limits of its own, so the head is counted here: a whole one when it is complete
(as h11's backend does), one still arriving by the bytes fed while it is (431 beyond the limit), and
likewise the bytes that arrive in a chunked body without any of it coming out (trailers, chunk
extensions), which httptools would otherwise gather without bound.
"""

from __future__ import annotations

from collections import deque
from typing import NoReturn, cast

import httptools

from hxgwd.http.events import Marker
from hxgwd.http.protocol import (END_OF_BODY, MALFORMED, NEED_DATA, PEER_CLOSED, TOO_LARGE, ProtocolError,
                                 RequestHead, ServerProtocol, request_head)

VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}


class LlhttpServerProtocol(ServerProtocol):
    __slots__ = ("_parser", "_events", "_url", "_headers", "_in_head", "_in_body", "_progress", "_began",
                 "_pending", "_body_fed", "_failed", "_closed")

    def __init__(self, max_header_bytes: int) -> None:
        super().__init__(max_header_bytes)
        self._parser = _parser(self)
        self._events: deque[RequestHead | bytes | Marker | ProtocolError] = deque()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = False      # between a message's first byte and the end of its head
        self._in_body = False      # between the end of a head and the end of its message
        self._progress = False     # the last feed produced a head, a body piece or an end
        self._began = False        # a message began during the last feed
        self._pending = 0          # bytes fed while a head (or a body's framing) is incomplete
        self._body_fed = 0         # of the last feed: bytes of the last Content-Length body it held
        self._failed = False
        self._closed = False

    # --- llhttp's callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = self._began = True
        self._url = b""
        self._headers = []
        self._pending = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:      # a trailer: refused, as h11's backend and both clients refuse them
            self._fail(ProtocolError(400, MALFORMED))
        # as h11 gives them: llhttp keeps a value's trailing whitespace (RFC 9110 5.5 strips it)
        # and the case of Transfer-Encoding's
        name = name.lower()
        self._headers.append((name, value.rstrip(b" \t") if name != b"transfer-encoding" else value.lower()))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._in_body = self._progress = True
        parser = self._parser
        version = VERSIONS.get(parser.get_http_version())
        if version is None:
            self._fail(ProtocolError(505, "Use HTTP/1.1."))
        try:
            head = request_head(parser.get_method(), self._url, version, self._headers, self._max_header_bytes,
                                check_controls=False)
        except ProtocolError as exc:
            self._fail(exc)
        self._events.append(head)
        self._body_fed = 0 if head.content_length else -1     # -1: not counted (chunked, or none)

    def on_body(self, body: bytes) -> None:
        self._progress = True
        self._events.append(body)
        if self._body_fed >= 0:
            self._body_fed += len(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._progress = True
        self._events.append(END_OF_BODY)

    def _fail(self, exc: ProtocolError) -> NoReturn:
        """Stop parsing: `exc` is what next() raises once it reaches it."""
        self._failed = True
        self._events.append(exc)
        raise exc       # out of llhttp (as HttpParserCallbackError)

    # --- the interface -----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes received from the client; b"" means the client closed its side."""
        if self._failed or self._closed:
            return
        if not data:
            self._closed = True
            if self._in_head or self._in_body:
                self._events.append(ProtocolError(400, "Incomplete request."))
                self._failed = True
            else:
                self._events.append(PEER_CLOSED)
            return
        self._progress = self._began = False
        self._body_fed = -1
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # a request that proposed an upgrade (without a body, or it was refused): served as a
            # plain one; llhttp will not read past it, so a new parser reads what follows
            self._parser = _parser(self)
            if not self._failed and len(data) > upgrade.args[0]:
                self.feed(data[upgrade.args[0]:])
            return
        except httptools.HttpParserCallbackError:
            return              # our own refusal, queued by _fail()
        except httptools.HttpParserError as exc:
            self._failed = True
            reason = str(exc)
            # `HTTP/1.2`, the h2 preface
            status = 505 if reason.startswith("Invalid HTTP version") or "PRI" in reason else 400
            self._events.append(ProtocolError(status, "Use HTTP/1.1." if status == 505 else MALFORMED))
            return
        if self._in_head:
            if self._began:
                # the head began in these bytes: it is at most what follows the last end of a head
                # or chunked body in them (a head cannot hold an empty line), less a Content-Length
                # body just before it (less too much if that body held an empty line: the next
                # bytes are all counted, so a head is never let grow past the limit by more than one feed)
                end = data.rfind(b"\r\n\r\n")
                tail = len(data) - (end + 4 if end >= 0 else 0)
                self._pending = max(0, tail - self._body_fed) if self._body_fed > 0 else tail
            else:
                self._pending += len(data)
        elif self._in_body and not self._progress:
            self._pending += len(data)
        else:
            self._pending = 0
        if self._pending > self._max_header_bytes:
            self._failed = True
            self._events.append(ProtocolError(431, TOO_LARGE))

    def next(self) -> RequestHead | bytes | Marker:
        events = self._events
        if not events:
            return NEED_DATA
        event = events[0]
        # `type(event) is`, which mypy narrows `event` by (an alias of the type it does not)
        if type(event) is bytes:
            events.popleft()
            self._expect_continue = False
            return event
        if type(event) is RequestHead:
            if self._state != 0 or self._request_done:
                return NEED_DATA    # a pipelined request: its turn comes after this one's answer
            events.popleft()
            self._begin(event)
            return event
        if event is END_OF_BODY:
            events.popleft()
            self._request_done = True
            return END_OF_BODY
        if event is PEER_CLOSED:
            return PEER_CLOSED   # and stays
        raise cast(ProtocolError, event)    # which stays too

    @property
    def has_buffered_data(self) -> bool:
        """Whether received bytes of the next request wait in the parser (ask after `next()` said
        NEED_DATA between requests)."""
        return self._in_head or bool(self._events)

    def _next_cycle(self) -> None:
        pass      # llhttp reads one message after another by itself


def _parser(protocol: LlhttpServerProtocol) -> httptools.HttpRequestParser:
    parser = httptools.HttpRequestParser(protocol)
    # h11 takes spaces and tabs after a chunk size (`1f \r\n`), as the client's llhttp is told to
    # (client_llhttp.py); what follows the size is read the same by both, so there is nothing to smuggle
    parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
    return parser
