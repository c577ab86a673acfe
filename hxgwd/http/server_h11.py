"""Stage 2, parse: the sans-IO HTTP/1.1 server side of one connection, over h11.

No sockets and no trio here: `feed()` bytes in, `next()` events out, and every `response_*`
method returns the bytes to write. h11 errors are translated to `hxgwd.errors` once, here:
headers over the limit -> 431, anything malformed -> 400. The caller (connection.py) decides the
I/O and the timeouts.
"""

from __future__ import annotations

from typing import Iterable

from http import HTTPStatus

import attrs
import h11

from hxgwd.errors import BadRequest, GatewayError, HeadersTooLarge, VersionNotSupported

Headers = list[tuple[bytes, bytes]]


@attrs.frozen(slots=True)
class RequestHead:
    method: str
    target: str
    headers: Headers                 # names lowercased by h11, in arrival order
    content_length: int | None       # None: chunked; 0 also when no body is framed
    keep_alive: bool

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class EndOfBody:
    """The request body is complete."""


class PeerClosed:
    """The client closed its side between requests."""


REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
NEED_DATA = h11.NEED_DATA
END_OF_MESSAGE = h11.EndOfMessage()   # h11 events are immutable: one serves every message
END_OF_BODY = EndOfBody()
PEER_CLOSED = PeerClosed()
CONTROLS = bytes(range(0x09)) + bytes(range(0x0a, 0x20)) + b"\x7f"   # all but HTAB, which a value may hold


class ServerConn:
    """One client connection's protocol state. Not thread-safe; one task drives it."""

    def __init__(self, max_header_bytes: int) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._max_header_bytes = max_header_bytes
        self._head_only = False      # the request is a HEAD: its answer is sent without a body

    def __repr__(self) -> str:
        return f"<ServerConn client={self._h11.their_state} server={self._h11.our_state}>"

    # --- input -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes received from the client; b"" means the client closed its side."""
        self._h11.receive_data(data)

    def next(self) -> RequestHead | bytes | EndOfBody | PeerClosed | type[h11.NEED_DATA]:
        """The next complete thing received: a head, a body piece (bytes), or NEED_DATA."""
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise _translate(exc) from None
        if type(event) is h11.Data:
            return bytes(event.data)
        if type(event) is h11.Request:
            # h11's Headers is a Sequence whose iteration is a Python generator: copied once here
            headers = list(event.headers)
            values = b"".join([v for _, v in headers])
            # h11 bounds a head that is still arriving; one that arrived whole is measured here
            size = len(event.target) + len(values) + sum([len(n) + 4 for n, _ in headers])
            if size > self._max_header_bytes:
                raise HeadersTooLarge("Request headers are too large.")
            # h11 takes any byte but NUL and whitespace other than SP/HTAB in a value (names it
            # checks strictly): DEL and the C0 controls would be forwarded to an upstream, whose
            # parser may cut the head there (RFC 9110, 5.5). One pass over all values, not a regex each.
            if len(values.translate(None, CONTROLS)) != len(values):
                raise BadRequest("Control character in a request header.", code="bad_http")
            if event.http_version not in (b"1.1", b"1.0"):   # h11 takes "HTTP/2.0" (the h2 preface too)
                raise VersionNotSupported("Use HTTP/1.1.")
            self._head_only = event.method == b"HEAD"
            return _head(event, headers)
        if type(event) is h11.EndOfMessage:
            return END_OF_BODY
        if type(event) is h11.ConnectionClosed:
            return PEER_CLOSED
        if event is h11.PAUSED:   # a pipelined request waits for the current response to finish
            return NEED_DATA
        return NEED_DATA if event is h11.NEED_DATA else self.next()

    @property
    def has_buffered_data(self) -> bool:
        """Whether received bytes wait in the parser. Costs a copy of them (h11 has no cheaper
        public way to ask): ask after `next()` said NEED_DATA, when they are at most part of a head."""
        data, _closed = self._h11.trailing_data
        return bool(data)

    @property
    def waiting_for_100_continue(self) -> bool:
        return self._h11.they_are_waiting_for_100_continue

    # --- output ------------------------------------------------------------------------------

    def response_continue(self) -> bytes:
        return self._h11.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))

    def response_head(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        framing, rest = _split(headers)
        head = self._h11.send(h11.Response(status_code=status, headers=framing,
                                           reason=REASONS.get(status, b"")))
        return splice_headers(head, rest)

    def response_body(self, data: bytes) -> bytes:
        return self._h11.send(h11.Data(data=data)) if data and not self._head_only else b""

    def response_end(self) -> bytes:
        return self._h11.send(END_OF_MESSAGE)

    def response_full(self, status: int, headers: Headers, body: bytes) -> bytes:
        """A whole response with a Content-Length, as one write (the head alone to a HEAD)."""
        framing, rest = _split(headers)
        framing.append((b"content-length", str(len(body)).encode()))
        h = self._h11
        head = h.send(h11.Response(status_code=status, headers=framing, reason=REASONS.get(status, b"")))
        return b"".join((splice_headers(head, rest),
                         h.send(h11.Data(data=body)) if body and not self._head_only else b"",
                         h.send(END_OF_MESSAGE)))

    def response_error(self, exc: GatewayError, headers: Headers = ()) -> bytes:
        """An error answer, closing the connection; b"" if a response was already begun."""
        if not self.can_start_response:
            return b""
        head = [(b"content-type", b"application/json"), (b"connection", b"close"),
                *exc.headers(), *headers]
        try:
            return self.response_full(exc.status, head, exc.body())
        except h11.LocalProtocolError:
            return b""

    def send_failed(self) -> None:
        self._h11.send_failed()

    # --- state -------------------------------------------------------------------------------

    @property
    def can_start_response(self) -> bool:
        return self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def response_complete(self) -> bool:
        return self._h11.our_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    @property
    def closes_after_response(self) -> bool:
        """The response said (or HTTP/1.0 implied) that the connection ends with it."""
        return self._h11.our_state in (h11.MUST_CLOSE, h11.CLOSED)

    @property
    def request_complete(self) -> bool:
        # MUST_CLOSE: the whole request came, with `Connection: close` (or over HTTP/1.0)
        return self._h11.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    @property
    def reusable(self) -> bool:
        return self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE

    def start_next_cycle(self) -> None:
        self._h11.start_next_cycle()


# h11 sees only the headers that frame the message, so its state machine (keep-alive, length,
# chunking) stays the authority; the others are written after them as they are. Every one of those
# was validated once already: parsed by h11 from the client or upstream, or ours (constants, ids
# matched against a pattern, config values checked at load). Re-validating each on every send was
# a fifth of the gateway's CPU per request in profiles.
FRAMING = frozenset((b"connection", b"content-length", b"transfer-encoding"))


def _split(headers: Iterable[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    framing, rest = [], []
    for header in headers:
        (framing if header[0] in FRAMING else rest).append(header)
    return framing, rest


def splice_headers(head: bytes, rest: list[tuple[bytes, bytes]]) -> bytes:
    """Insert header lines before the blank line that ends `head`."""
    if not rest:
        return head
    return head[:-2] + b"".join([name + b": " + value + b"\r\n" for name, value in rest]) + b"\r\n"


def _head(event: h11.Request, headers: Headers) -> RequestHead:
    length = None
    keep_alive = event.http_version == b"1.1"
    chunked = False
    for name, value in headers:
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and b"close" in value.lower():
            keep_alive = False
        elif name == b"transfer-encoding":
            chunked = True
    if chunked and length is not None:
        # h11 frames the body by Transfer-Encoding, as it must; whatever sent both may frame it
        # otherwise, so nothing after this request on the connection is trusted (RFC 9112, 6.3)
        length, keep_alive = None, False
    elif not chunked and length is None:
        length = 0          # neither header: no body (RFC 9112, 6.3)
    target = event.target
    if target[:1] != b"/":
        # absolute form (`GET http://host/path`), which servers must accept (RFC 9112, 3.2.2)
        scheme, sep, rest = target.partition(b"://")
        if sep and scheme.lower() in (b"http", b"https"):
            end = next((i for i, c in enumerate(rest) if c in b"/?"), len(rest))    # after host:port
            target = rest[end:] if rest[end:end + 1] == b"/" else b"/" + rest[end:]
    return RequestHead(
        method=event.method.decode("ascii"),
        target=target.decode("ascii", errors="replace"),
        headers=headers,
        content_length=length,
        keep_alive=keep_alive,
    )


def _translate(exc: h11.RemoteProtocolError) -> GatewayError:
    if exc.error_status_hint == 431:
        return HeadersTooLarge("Request headers are too large.")
    return BadRequest("Malformed HTTP request.", code="bad_http")
