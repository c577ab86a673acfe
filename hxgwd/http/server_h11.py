"""The server protocol's h11 backend: pure Python, the reference. h11 only reads here; the answers
are ours (protocol.py), so its send side is never used: each request gets a fresh h11.Connection,
fed what the last one held beyond its request.

What llhttp takes and h11 refuses: runs of spaces between the request line's parts, which are made
one space before h11 sees the line.

h11 is more lenient than llhttp in places, and what it takes that llhttp refuses is refused here,
by a look at the head's own bytes (kept until h11 parsed the head, at most max_header_bytes), once
per request: a bare LF as a line end, obs-fold (a line continued by a space or tab), Content-Length
twice or as a list (h11 merges them), whitespace after a Transfer-Encoding value (h11 strips it), control characters in values, an empty line before the
request line (taken, as llhttp does), methods llhttp does not know, a target in none of the
forms llhttp reads, or an absolute one whose authority holds a character llhttp refuses there.
Trailers after a chunked body are refused by both backends.
"""

from __future__ import annotations

import re

import h11

import hxgwd.http.h11_chunks  # noqa: F401  (llhttp's chunk extension grammar)

from hxgwd.http.events import Marker
from hxgwd.http.protocol import (END_OF_BODY, MALFORMED, NEED_DATA, PEER_CLOSED, TOO_LARGE, ProtocolError,
                                 RequestHead, ServerProtocol, request_head)

# llhttp's methods in HTTP mode (RTSP's and PRI excepted), as it parses them: h11 takes any token
METHODS = frozenset(b"""DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH
    SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE
    PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY""".split())
_HEAD_END = re.compile(rb"\n\r?\n")              # where h11 ends a head
_CONTENT_LENGTH = re.compile(rb"\ncontent-length:[ \t]*([^\r\n]*)", re.IGNORECASE)
_TE_TRAILING_WS = re.compile(rb"\ntransfer-encoding:[^\r\n]*[ \t]\r\n", re.IGNORECASE)   # h11 strips it; llhttp does not
_SPACES = re.compile(rb"  +")
_TARGET = re.compile(rb"/|\*\Z|[A-Za-z]+://")   # origin, asterisk or absolute form, as llhttp reads them
_AUTHORITY = re.compile(rb'[A-Za-z]+://[^/?"#<>\\^`{|}]*(?:[/?]|\Z)')   # what llhttp takes in one


class H11ServerProtocol(ServerProtocol):
    __slots__ = ("_h11", "_fed", "_head_bytes", "_in_head", "_refused", "_line", "_tail")

    def __init__(self, max_header_bytes: int) -> None:
        super().__init__(max_header_bytes)
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._fed = False       # h11 was given something (bytes or the EOF): else it can only say NEED_DATA
        self._head_bytes = bytearray()   # the bytes of the head h11 has yet to parse
        self._in_head = True
        self._refused: ProtocolError | None = None    # found in a head still arriving
        self._line: bytes | None = b""    # the request line so far, held from h11 until it ends; None once given
        self._tail: bytes | None = None   # of a chunked body: its last bytes received, to check how it ends

    def feed(self, data: bytes) -> None:
        """Bytes received from the client; b"" means the client closed its side."""
        if self._in_head and data:
            if not self._head_bytes:
                data = data.lstrip(b"\r\n")   # llhttp skips empty lines before a request; h11 refuses them
                if not data:
                    return
            self._head_bytes += data
            if _HEAD_END.search(self._head_bytes) is None and not _well_formed(self._head_bytes):
                self._refused = ProtocolError(400, MALFORMED)   # as llhttp, at once, not when the head ends
            if self._line is not None:
                data = self._request_line(data)
                if not data:
                    return
        elif not data and self._line:       # the client's EOF within a request line: h11 gets it all
            self._h11.receive_data(self._line)
            self._line = None
        elif self._tail is not None:
            self._tail = self._tail[-4:] + data
        self._fed = True
        try:
            self._h11.receive_data(data)
        except RuntimeError:    # data after the client's EOF: nothing more can come
            pass

    def _request_line(self, data: bytes) -> bytes:
        """What h11 is to be given of `data` while the request line arrives: nothing until it
        ends, then the line with each run of spaces made one, as llhttp reads it (RFC 9112, 3
        lets a recipient split the line on whitespace), and what followed it."""
        line = self._line + data if self._line else data
        end = line.find(b"\n")
        if end < 0:
            self._line = line
            if len(line) > self._max_header_bytes:      # as h11 would, the line held back
                self._refused = ProtocolError(431, TOO_LARGE)
            return b""
        self._line = None
        if line.find(b"  ", 0, end) >= 0:
            line = _SPACES.sub(b" ", line[:end]) + line[end:]
        return line

    def next(self) -> RequestHead | bytes | Marker:
        if self._refused is not None:
            raise self._refused
        if not self._fed:       # between requests: asking h11 costs as much as parsing a line
            return NEED_DATA
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProtocolError(431, TOO_LARGE) if exc.error_status_hint == 431 else ProtocolError(400, MALFORMED) from None
        # `type(event) is`, which mypy narrows `event` by (an alias of the type it does not)
        if type(event) is h11.Data:
            self._expect_continue = False
            return bytes(event.data)
        if type(event) is h11.Request:
            head = self._request_head(event)
            self._begin(head)
            return head
        if type(event) is h11.EndOfMessage:
            if event.headers:   # trailers: llhttp refuses some (Content-Length); both refuse all
                raise ProtocolError(400, MALFORMED)
            if self._tail is not None:
                # llhttp wants CRLF after the last chunk, where h11 takes a bare LF
                tail, self._tail = self._tail, None
                if not tail[:len(tail) - len(self._h11.trailing_data[0])].endswith(b"\r\n\r\n"):
                    raise ProtocolError(400, MALFORMED)
            self._request_done = True
            return END_OF_BODY
        if type(event) is h11.ConnectionClosed:
            return PEER_CLOSED
        return NEED_DATA      # NEED_DATA, or PAUSED: the next request waits until this one is answered

    def _request_head(self, event: h11.Request) -> RequestHead:
        received = raw = self._head_bytes
        self._in_head = False
        self._head_bytes = bytearray()
        end = _HEAD_END.search(raw)
        raw = raw[:end.end()] if end else raw
        target = event.target
        if not _well_formed(raw) or not _TARGET.match(target) or (target[:1] != b"/" and target != b"*"
                                                                  and not _AUTHORITY.match(target)):
            raise ProtocolError(400, MALFORMED)
        # h11's Headers is a Sequence whose iteration is a Python generator: copied once here
        headers = list(event.headers)
        names = [name for name, _ in headers]
        if b"transfer-encoding" in names and _TE_TRAILING_WS.search(raw):
            raise ProtocolError(400, MALFORMED)      # `chunked \t`: llhttp's backend refuses it
        if b"content-length" in names:
            lengths = _CONTENT_LENGTH.findall(raw)
            if len(lengths) != 1 or not lengths[0].rstrip(b" \t").isdigit():   # `3, 3`; two equal ones
                raise ProtocolError(400, MALFORMED)
        head = request_head(event.method, event.target, event.http_version, headers, self._max_header_bytes,
                            check_controls=True)
        if event.method not in METHODS:
            raise ProtocolError(400, MALFORMED)
        if head.content_length is None:     # chunked: the body's first bytes came with the head
            self._tail = bytes(received[end.end():]) if end else b""
        return head

    @property
    def has_buffered_data(self) -> bool:
        """Whether received bytes of the next head wait in the parser (ask after `next()` said
        NEED_DATA between requests)."""
        return bool(self._head_bytes)

    def _next_cycle(self) -> None:
        data, closed = self._h11.trailing_data
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_header_bytes)
        self._fed = False
        self._in_head = True
        self._line = b""
        if data:
            self.feed(bytes(data))
        if closed:
            self.feed(b"")


def _well_formed(raw: bytearray) -> bool:
    """No bare LF or CR (one that ends the bytes so far may yet be followed by its LF), and no
    obs-fold (a line continued by a space or a tab)."""
    crlf = raw.count(b"\r\n")
    return (raw.count(b"\n") == crlf and raw.count(b"\r") - raw.endswith(b"\r") == crlf
            and b"\n " not in raw and b"\n\t" not in raw)
