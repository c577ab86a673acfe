"""The sans-I/O server side of one HTTP/1.1 connection, whichever parser reads it.

No sockets, no trio, no clock: `feed()` bytes in, `next()` events out, and every `response_*`
method returns the bytes to write; the caller (connection.py) does the I/O and the deadlines.

    protocol = server_protocol("httptools" | "h11", max_header_bytes)
    protocol.feed(data)        # b"": the client closed its side
    protocol.next()            # RequestHead | bytes (a body piece) | END_OF_BODY | PEER_CLOSED | NEED_DATA,
                               # or ProtocolError (400, 431 or 505) for malformed input

The parsers only read. The answers are written here, by heads.py from checked values, with our own
small state machine: one response per request, its framing (Content-Length, chunked, or to the
close for an HTTP/1.0 client), no body to a HEAD, `Connection: close` when the connection ends
with it, and whether the connection can carry another request.

Both backends accept the same requests and refuse the same ones (a differential fuzz test holds
them to it). llhttp is strict by default; what h11 lets through and llhttp does not is refused in
server_h11.py, and what llhttp lets through and h11 does not is refused by `request_head()` below,
for both (see test_http_server_protocol.py, STRICTNESS).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from hxgwd.http import heads
# re-exported: the server side's events and header list, as connection.py and the backends take them
from hxgwd.http.events import END_OF_BODY as END_OF_BODY
from hxgwd.http.events import NEED_DATA as NEED_DATA
from hxgwd.http.events import PEER_CLOSED as PEER_CLOSED
from hxgwd.http.events import Marker
from hxgwd.http.heads import Headers as Headers


class HttpError(Exception):
    """A request the HTTP layer refuses: its status, and a short reason for the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ProtocolError(HttpError):
    """Malformed input: 400, 431 (a head over the limit) or 505 (not HTTP/1.x). Nothing after it
    on the connection can be trusted."""


class Errors(Protocol):
    """How the application words a refusal: the HTTP layer knows statuses, not answer formats."""

    def refusal(self, error: HttpError) -> Exception:
        """The application's exception for a refusal of the HTTP layer (400, 408, 413, 431, 505):
        raised to the handler when reading the body fails, and answered by `answer()`."""

    def answer(self, exc: Exception) -> tuple[int, Headers, bytes] | None:
        """Status, headers and body answering `exc`; None if it is not one the application
        raises on purpose: a bug, logged, and answered as `refusal(INTERNAL_ERROR)` is."""


class PlainErrors:
    """Refusals as they are, answered in plain text: for an application with no format of its own."""

    def refusal(self, error: HttpError) -> Exception:
        return error

    def answer(self, exc: Exception) -> tuple[int, Headers, bytes] | None:
        if isinstance(exc, HttpError):
            return exc.status, [(b"content-type", b"text/plain; charset=utf-8")], exc.message.encode() + b"\n"
        return None


INTERNAL_ERROR = HttpError(500, "Internal error.")




class RequestHead:
    __slots__ = ("method", "target", "headers", "content_length", "keep_alive", "version", "expects_continue")

    def __init__(self, method: str, target: str, headers: Headers, content_length: int | None,
                 keep_alive: bool, version: bytes = b"1.1", expects_continue: bool = False) -> None:
        self.method = method
        self.target = target                  # origin form; an absolute-form target is reduced to it
        self.headers = headers                # names lowercased, in arrival order
        self.content_length = content_length  # None: chunked; 0 also when no body is framed
        self.keep_alive = keep_alive
        self.version = version                # b"1.1" or b"1.0"
        self.expects_continue = expects_continue

    def __repr__(self) -> str:
        return f"<RequestHead {self.method} {self.target} HTTP/{self.version.decode()}>"

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


# all but HTAB, which a value may hold: DEL and the C0 controls would be forwarded to an upstream,
# whose parser may cut the head there (RFC 9110, 5.5)
CONTROLS = bytes(range(0x09)) + bytes(range(0x0a, 0x20)) + b"\x7f"
MALFORMED = "Malformed HTTP request."
TOO_LARGE = "Request headers are too large."


def request_head(method: bytes, target: bytes, version: bytes, headers: Headers, max_header_bytes: int,
                 *, check_controls: bool) -> RequestHead:
    """A parsed head checked by the rules both backends share; ProtocolError if it breaks one.
    One pass over the headers: this runs once per request on the hot path."""
    if version != b"1.1" and version != b"1.0":   # h11 takes "HTTP/2.0", the h2 preface included
        raise ProtocolError(505, "Use HTTP/1.1.")
    length = None
    chunked = upgrade = connection_upgrade = expect = False
    keep_alive = version == b"1.1"
    hosts = 0
    # every byte of the head as a client writes it ("M T HTTP/v", ": ", CRLFs): what the backends
    # count while a head is still arriving, so a head near the limit is taken or refused however
    # it was cut into reads (only extra whitespace around values, which parsers drop, is not seen)
    size = len(method) + len(target) + len(version) + 11
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            if length is not None:      # h11 merges equal ones; llhttp refuses any second
                raise ProtocolError(400, MALFORMED)
            length = int(value)
        elif name == b"host":
            hosts += 1
        elif name == b"transfer-encoding":
            # only `chunked`, once: h11 refuses `gzip, chunked`, which llhttp takes
            if chunked or value.lower() != b"chunked":
                raise ProtocolError(400, MALFORMED)
            chunked = True
        elif name == b"connection":
            tokens = [token.strip() for token in value.lower().split(b",")]
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens and version == b"1.0":
                keep_alive = True
            connection_upgrade = connection_upgrade or b"upgrade" in tokens
        elif name == b"expect":
            expect = value.lower() == b"100-continue"
        elif name == b"upgrade":
            upgrade = True
    if size > max_header_bytes:     # a head still arriving is bounded by the backend
        raise ProtocolError(431, TOO_LARGE)
    if check_controls:
        values = b"".join([v for _, v in headers])
        if len(values.translate(None, CONTROLS)) != len(values):
            raise ProtocolError(400, "Control character in a request header.")
    if chunked and length is not None:
        # whatever sent both may frame the body otherwise than we would (RFC 9112, 6.3): llhttp
        # refuses it, and so does h11's backend
        raise ProtocolError(400, MALFORMED)
    if hosts > 1 or (hosts == 0 and version == b"1.1"):    # RFC 9112, 3.2: h11 refuses, llhttp takes
        raise ProtocolError(400, MALFORMED)
    if method == b"CONNECT":
        raise ProtocolError(400, "CONNECT is not supported.")
    if upgrade and connection_upgrade and (chunked or length):
        # llhttp does not read the body of a request that proposes an upgrade; we never switch
        # protocols, so one without a body is served as a plain request, one with a body refused
        raise ProtocolError(400, "An upgrade is not supported.")
    if not chunked and length is None:
        length = 0          # neither header: no body (RFC 9112, 6.3)
    if target[:1] != b"/":
        if target[:1] == b"*" and target != b"*":     # llhttp reads `*:` or `*x` as a target; h11 refuses
            raise ProtocolError(400, MALFORMED)
        target = _origin_form(target)
    return RequestHead(method.decode("ascii"), target.decode("ascii", errors="replace"), headers, length,
                       keep_alive, version, expect and version == b"1.1")


def _origin_form(target: bytes) -> bytes:
    # absolute form (`GET http://host/path`), which servers must accept (RFC 9112, 3.2.2)
    scheme, sep, rest = target.partition(b"://")
    if sep and scheme.lower() in (b"http", b"https"):
        end = next((i for i, c in enumerate(rest) if c in b"/?"), len(rest))    # after host:port
        return rest[end:] if rest[end:end + 1] == b"/" else b"/" + rest[end:]
    return target


# The response's state: one response per request.
IDLE, SEND_RESPONSE, SEND_BODY, DONE = range(4)
FRAMING = frozenset((b"connection", b"content-length", b"transfer-encoding"))
NO_BODY_STATUS = frozenset((204, 304))
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


class ServerProtocol:
    """What both backends share: the request's bookkeeping and the whole response side. A backend
    implements feed(), next() and has_buffered_data, calls _begin() with each head, sets
    _request_done at its end, and resets its parser in _next_cycle()."""

    __slots__ = ("_max_header_bytes", "_state", "_request_done", "_head_only", "_version", "_keep_alive",
                 "_expect_continue", "_closes", "_framing", "_remaining")

    def __init__(self, max_header_bytes: int) -> None:
        self._max_header_bytes = max_header_bytes
        self._state = IDLE
        self._request_done = False
        self._head_only = False         # the request is a HEAD: its answer is sent without a body
        self._version = b"1.1"
        self._keep_alive = False
        self._expect_continue = False   # the client waits for `100 Continue` before its body
        self._closes = False            # the connection ends with this response
        self._framing = 0               # of the response body: 0 none, 1 length, 2 chunked, 3 to the close
        self._remaining = 0             # with a length: body bytes still due

    def __repr__(self) -> str:
        return f"<{type(self).__name__} response={self._state} request_done={self._request_done}>"

    def _begin(self, head: RequestHead) -> None:
        self._state = SEND_RESPONSE
        self._head_only = head.method == "HEAD"
        self._version = head.version
        self._keep_alive = head.keep_alive
        self._expect_continue = head.expects_continue

    # --- input: the backend's ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes received from the client; b"" means the client closed its side."""
        raise NotImplementedError

    def next(self) -> RequestHead | bytes | Marker:
        """The next event: a head, a body piece, END_OF_BODY, PEER_CLOSED or NEED_DATA; raises
        ProtocolError for malformed input."""
        raise NotImplementedError

    @property
    def has_buffered_data(self) -> bool:
        """Whether received bytes of the next request wait in the parser."""
        raise NotImplementedError

    # --- output ------------------------------------------------------------------------------

    @property
    def waiting_for_100_continue(self) -> bool:
        return self._expect_continue and self._state == SEND_RESPONSE

    def response_continue(self) -> bytes:
        self._expect_continue = False
        return CONTINUE

    def response_head(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
        """The head of a streamed response: framed by the caller's Content-Length if it gave one,
        else chunked (to the close, for an HTTP/1.0 client)."""
        length = None
        for name, value in headers:
            if name == b"content-length":
                length = int(value)
        return self._write_head(status, headers, length)

    def response_body(self, data: bytes) -> bytes:
        if self._state != SEND_BODY:
            raise RuntimeError("no response body is being sent")
        framing = self._framing
        if not data or framing == 0:
            return b""
        if framing == 2:
            return b"%x\r\n%s\r\n" % (len(data), data)
        if framing == 1:
            if len(data) > self._remaining:
                raise ValueError("more response body than its Content-Length")
            self._remaining -= len(data)
        return data

    def response_end(self) -> bytes:
        if self._state != SEND_BODY:
            raise RuntimeError("no response body is being sent")
        self._state = DONE
        if self._framing == 2:
            return LAST_CHUNK
        if self._framing == 1 and self._remaining:
            self._closes = True     # the body fell short of its length: the client can only tell by the close
        return b""

    def response_full(self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bytes:
        """A whole response with a Content-Length, as one write (the head alone to a HEAD)."""
        head = self._write_head(status, headers, len(body))
        self._state = DONE
        return head + body if self._framing else head

    def _write_head(self, status: int, headers: Sequence[tuple[bytes, bytes]], length: int | None) -> bytes:
        if self._state > SEND_RESPONSE:
            raise RuntimeError("a response was begun already")
        closes = self._closes or not self._keep_alive
        lines = []
        for header in headers:
            if header[0] in FRAMING:       # ours to write
                if header[0] == b"connection" and b"close" in header[1].lower():
                    closes = True
                continue
            lines.append(header)
        if status < 200 or status in NO_BODY_STATUS:
            framing = 0
        elif length is not None:
            lines.append((b"content-length", b"%d" % length))
            framing = 1
        elif self._version == b"1.1":
            lines.append((b"transfer-encoding", b"chunked"))
            framing = 2
        else:                               # HTTP/1.0 has no chunks: the close ends the body
            framing = 3
            closes = closes or not self._head_only
        if closes:
            lines.append((b"connection", b"close"))
        elif self._version == b"1.0":
            lines.append((b"connection", b"keep-alive"))
        head = heads.response_head(status, lines)   # BadHeader (a ValueError) if one cannot be sent
        self._closes = closes
        self._framing = 0 if self._head_only else framing
        self._remaining = length or 0
        self._expect_continue = False
        self._state = SEND_BODY
        return head

    def send_failed(self) -> None:
        self._closes = True

    # --- state -------------------------------------------------------------------------------

    @property
    def can_start_response(self) -> bool:
        return self._state <= SEND_RESPONSE

    @property
    def response_complete(self) -> bool:
        return self._state == DONE

    @property
    def closes_after_response(self) -> bool:
        """The response said (or HTTP/1.0 implied) that the connection ends with it."""
        return self._closes

    @property
    def request_complete(self) -> bool:
        return self._request_done

    @property
    def reusable(self) -> bool:
        return self._state == DONE and self._request_done and not self._closes

    def start_next_cycle(self) -> None:
        if not self.reusable:
            raise RuntimeError("the connection cannot carry another request")
        self._state = IDLE
        self._request_done = False
        self._next_cycle()

    def _next_cycle(self) -> None:
        raise NotImplementedError
