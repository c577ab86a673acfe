"""A small HTTP/1.1 client connection pool on trio: the hot-path upstream transport.

One `Pool` per backend origin. The protocol is `hxgwd.http`'s sans-I/O client connection (llhttp
or h11, as `[server] http_parser` says); this module does the sockets and deadlines, over
`SocketIO` or, for https, `TLSStream` (the same TLS code as the server's listeners).

By default a pool has no cap on connections, as nginx's upstreams have none: LLM answers stream for
minutes, so a few hundred concurrent chats need a few hundred connections, and a cap turned them
into 503s (issue 15: 1,000 slow streams, cap 256, 16,173 refusals; with no cap all served). With
`max_connections = N` at most N requests are in flight to the backend; one beyond waits up to the
pool timeout, then gets a 503 that names the gateway's own limit (`PoolFull`, fault "gateway").
Up to `max_idle` finished connections are kept for reuse, newest first, and closed once idle
longer than `idle_timeout`. A reused connection can turn out to have been closed by the upstream
while it sat idle: one with anything to read when taken is closed unused, and a request that fails
that way before any response byte arrived, and within STALE_WINDOW of being sent, is resent once
on a fresh connection.

httpx measured 10x slower than this at 64 concurrent requests here, mostly pool bookkeeping; this
pool does one list pop or append per request.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import socket
import ssl
from typing import TYPE_CHECKING

import trio

from hxgwd.config.model import Timeouts
from hxgwd.errors import BadRequest, UpstreamError, UpstreamTimeout
from hxgwd.http.events import Marker
from hxgwd.http.client import END_OF_MESSAGE, NEED_DATA, ResponseError, ResponseHead
from hxgwd.http.parsers import client_protocol
from hxgwd.http.heads import BadHeader
from hxgwd.http.sockio import SocketIO
from hxgwd.http.tls_stream import TLSStream
from hxgwd.runtime import Origin
from hxgwd.upstream import Headers, PoolFull, UpstreamRequest
from hxgwd.upstream.causes import broken_detail, connect_cause, reset_cause

if TYPE_CHECKING:
    from hxgwd.logs import Logger

RECEIVE_SIZE = 65536
MAX_RESPONSE_HEAD = 65536
# A reused connection that fails this soon after the request went out was closed by the upstream
# before it read the request (its keep-alive timer and our reuse crossed): safe to resend. Later,
# the upstream may have read it and died on it, and a resend could run a paid request twice.
STALE_WINDOW = 1.0
FULL_LOG_INTERVAL = 10.0     # at most one "pool full" log line per pool this often, with a count


class _StaleConnection(Exception):
    """A reused connection failed before the first response byte: safe to resend."""


class _Conn:
    __slots__ = ("stream", "proto", "idle_since", "received")

    def __init__(self, stream: SocketIO | TLSStream, parser: str) -> None:
        self.stream = stream
        self.proto = client_protocol(parser, MAX_RESPONSE_HEAD)
        self.idle_since = 0.0
        self.received = 0         # bytes received for the current request ("reset after N bytes")

    def next_ready(self) -> ResponseHead | bytes | Marker:
        """The next event from the bytes already received, or NEED_DATA."""
        try:
            return self.proto.next()
        except ResponseError as exc:
            raise UpstreamError("The upstream sent a malformed HTTP response.",
                                cause=f"malformed response ({exc})") from None

    async def receive(self, deadline: float, *, answering: bool = False) -> ResponseHead | bytes | Marker:
        """The next event; trio.TooSlowError if it needs bytes that do not come by `deadline`.
        `answering`: the request was just sent, so the upstream cannot have answered yet, and the
        protocol holds nothing (a connection is reused only with nothing left after its last
        answer): there is nothing to parse before the wait."""
        while True:
            if not answering:
                event = self.next_ready()
                if event is not NEED_DATA:
                    return event
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE, deadline, wait_first=answering)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # a reset, not an end: a body delimited by the close would pass for complete
                raise UpstreamError("The upstream connection was reset.",
                                    cause=reset_cause(self.received, exc)) from None
            answering = False
            self.received += len(data)
            self.proto.feed(data)


class PooledResponse:
    """An upstream response being read; `aclose()` returns the connection or closes it."""

    __slots__ = ("status", "headers", "_pool", "_conn", "_done")

    def __init__(self, pool: "Pool", conn: _Conn, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers
        self._pool = pool
        self._conn = conn
        self._done = False

    async def receive(self, deadline: float = math.inf) -> bytes:
        """The next piece of the body; b"" at its end; trio.TooSlowError if none by `deadline`."""
        if self._done:
            return b""
        return self._piece(await self._conn.receive(deadline))

    def receive_ready(self) -> bytes | None:
        """The next piece if it has already arrived (b"" at the end), else None; never waits."""
        if self._done:
            return b""
        event = self._conn.next_ready()
        return None if event is NEED_DATA else self._piece(event)

    def _piece(self, event: ResponseHead | bytes | Marker) -> bytes:
        if type(event) is bytes:
            return event
        if event is END_OF_MESSAGE:
            self._done = True
            return b""
        raise UpstreamError("The upstream sent a malformed HTTP response.", cause="malformed response")

    async def aclose(self) -> None:
        # None only once closed, after which the response is not read (receive() would fail on it)
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is not None:
            self._pool._release(conn, reusable=self._done)


class Pool:
    def __init__(self, origin: Origin, *, max_connections: int, max_idle: int, idle_timeout: float,
                 ssl_context: ssl.SSLContext | None, parser: str = "h11", name: str = "",
                 log: Logger | None = None) -> None:
        self.origin = origin
        self.name = name or origin.host
        self.max_connections = max_connections        # 0: no cap
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.parser = parser
        self._ssl = ssl_context
        self._family = _ip_family(origin.host)         # None: a host name, resolved at each connect
        self._slots = trio.Semaphore(max_connections) if max_connections > 0 else None
        self._idle: list[_Conn] = []
        self._log = log                                # hxgwd.logs.Logger, or None
        self._full_logged_at = -math.inf
        self._refused_unlogged = 0
        self.in_flight = 0
        self.opened = 0
        self.refused = 0

    def __repr__(self) -> str:
        o = self.origin
        return f"<Pool {o.scheme}://{o.host}:{o.port} in_flight={self.in_flight} idle={len(self._idle)}>"

    def statistics(self) -> dict[str, int]:
        return {"in_flight": self.in_flight, "idle": len(self._idle), "opened": self.opened,
                "max_connections": self.max_connections, "refused": self.refused}

    async def request(self, req: UpstreamRequest, timeouts: Timeouts) -> PooledResponse:
        """Send `req` and wait for the response head; the caller must `aclose()` the response."""
        if self._slots is not None:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                with trio.CancelScope(deadline=trio.current_time() + timeouts.pool) as wait:
                    await self._slots.acquire()
                if wait.cancelled_caught:
                    raise self._full(timeouts.pool) from None
        self.in_flight += 1
        try:
            conn = self._take_idle()
            if conn is not None:
                try:
                    return await self._exchange(conn, req, timeouts.first_byte, reused=True)
                except _StaleConnection:
                    pass
            conn = await self._connect(timeouts.connect)
            return await self._exchange(conn, req, timeouts.first_byte, reused=False)
        except BaseException:
            self.in_flight -= 1
            if self._slots is not None:
                self._slots.release()
            raise

    def _full(self, waited: float) -> PoolFull:
        self.refused += 1
        self._refused_unlogged += 1
        now = trio.current_time()
        if self._log is not None and now - self._full_logged_at >= FULL_LOG_INTERVAL:
            self._log.warning("requests refused at the gateway's own connection limit for a backend", event="pool_full",
                              backend=self.name, setting="backends[].max_connections",
                              max_connections=self.max_connections, waited_s=waited,
                              refused=self._refused_unlogged)
            self._full_logged_at, self._refused_unlogged = now, 0
        return PoolFull(f"The gateway's own limit of {self.max_connections} connections to backend "
                        f"'{self.name}' (backends[].max_connections) is reached, and none freed up "
                        f"within {waited:g} s.", retry_after=1, cause="pool full")

    async def _exchange(self, conn: _Conn, req: UpstreamRequest, timeout: float, reused: bool) -> PooledResponse:
        deadline = trio.current_time() + timeout
        try:
            body = req.body
            pieces = () if isinstance(body, bytes) else body    # an upload: sent as it is, never joined
            try:
                data = conn.proto.request(req.method.encode(), req.path.encode(),
                                          [(b"host", self.origin.host_header), *req.headers],
                                          body if isinstance(body, bytes) else b"",
                                          None if isinstance(body, bytes) else sum(map(len, pieces)))
            except BadHeader:
                raise BadRequest("A header of the request cannot be sent upstream.", code="bad_header") from None
            conn.received = 0
            try:
                await conn.stream.send_all(data, deadline)
                for piece in pieces:
                    await conn.stream.send_all(piece, deadline)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if reused:
                    raise _StaleConnection() from None
                detail = broken_detail(exc)
                raise UpstreamError("The upstream connection broke while sending.",
                                    cause="reset while sending" + (f" ({detail})" if detail else "")) from None
            sent = trio.current_time()
            try:
                event = await conn.receive(deadline, answering=True)   # 1xx are skipped by the protocol
            except UpstreamError:
                # closed while idle in the pool, and only noticed now: nothing was processed
                if reused and not conn.received and trio.current_time() - sent < STALE_WINDOW:
                    raise _StaleConnection() from None
                raise
        except trio.TooSlowError:
            _close_now(conn)
            raise UpstreamTimeout("The upstream did not answer in time.", code="upstream_first_byte_timeout",
                                  cause=f"first byte timeout ({timeout:g} s)") from None
        except BaseException:
            _close_now(conn)
            raise
        if type(event) is ResponseHead:
            return PooledResponse(self, conn, event.status, event.headers)
        _close_now(conn)
        raise UpstreamError("The upstream sent a malformed HTTP response.", cause="malformed response")

    def _take_idle(self) -> _Conn | None:
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()
            # Anything that arrived while it sat idle (an answer to nothing, a close) would be
            # read as the answer to the next request: that connection is done.
            if now - conn.idle_since < self.idle_timeout and not conn.stream.has_pending():
                return conn
            _close_now(conn)
        return None

    async def _connect(self, timeout: float) -> _Conn:
        o = self.origin
        try:
            with trio.fail_after(timeout):
                sock = await self._open_socket()
                if self._ssl is None:
                    stream: SocketIO | TLSStream = SocketIO(sock)
                else:
                    stream = TLSStream(sock, self._ssl, server_side=False, server_hostname=o.host)
                    try:
                        await stream.do_handshake()
                    except BaseException:
                        stream.close()
                        raise
        except trio.TooSlowError:
            raise UpstreamTimeout("Connecting to the upstream timed out.", code="upstream_connect_timeout",
                                  cause=f"connect timeout ({timeout:g} s)") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise UpstreamError("Cannot connect to the upstream.", code="upstream_connect_failed",
                                cause=connect_cause(exc)) from None
        self.opened += 1
        return _Conn(stream, self.parser)

    async def _open_socket(self) -> socket.socket:
        """A connected TCP socket, set up as trio's SocketStream sets one up. To an IP address, a
        plain non-blocking connect(): trio.open_tcp_stream's resolver and happy-eyeballs tasks
        cost 268 against 103 us of CPU a connection here (a ramp of new streams opens one each)."""
        o = self.origin
        if self._family is None:
            tcp = await trio.open_tcp_stream(o.host, o.port)
            return socket.socket(fileno=tcp.socket.detach())
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if hasattr(socket, "TCP_NOTSENT_LOWAT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 2 ** 14)
            error = sock.connect_ex((o.host, o.port))
            if error == errno.EINPROGRESS:
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
        except BaseException:
            sock.close()
            raise
        return sock

    def _release(self, conn: _Conn, *, reusable: bool) -> None:
        self.in_flight -= 1
        if self._slots is not None:
            self._slots.release()
        # bytes after the answer (more than its length said, a second answer) are not the next
        # request's answer: such a connection is closed, not reused (proto.reusable says so)
        if reusable and conn.proto.reusable and len(self._idle) < self.max_idle:
            conn.proto.start_next()
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
        else:
            _close_now(conn)

    def sweep(self) -> None:
        """Close idle connections past their idle timeout (called periodically)."""
        now = trio.current_time()
        keep = [c for c in self._idle if now - c.idle_since < self.idle_timeout]
        for conn in self._idle:
            if conn not in keep:
                _close_now(conn)
        self._idle = keep

    def close_idle(self) -> None:
        for conn in self._idle:
            _close_now(conn)
        self._idle = []


def _ip_family(host: str) -> socket.AddressFamily | None:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


def _close_now(conn: _Conn) -> None:
    conn.stream.close()
