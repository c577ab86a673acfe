"""A small HTTP/1.1 client connection pool on trio + h11: the hot-path upstream transport.

One `Pool` per backend origin. At most `max_connections` requests are in flight to it (a request
beyond that waits up to the pool timeout, then 503); up to `max_idle` finished connections are kept
for reuse, newest first, and closed once idle longer than `idle_timeout`. A reused connection can
turn out to have been closed by the upstream while it sat idle: one with anything to read when
taken is closed unused, and a request that fails that way before any response byte arrived, and
within STALE_WINDOW of being sent, is resent once on a fresh connection.

httpx measured 10x slower than this at 64 concurrent requests here, mostly pool bookkeeping; this
pool does one list pop or append per request.
"""

from __future__ import annotations

import math
import ssl
from typing import Any

import h11
import trio

from hxgwd.config.model import Timeouts
from hxgwd.http.h11_writes import END_OF_MESSAGE, splice_headers
from hxgwd.errors import Unavailable, UpstreamError, UpstreamTimeout
from hxgwd.runtime import Origin
from hxgwd.http.sockio import SocketIO
from hxgwd.upstream import Headers, UpstreamRequest

RECEIVE_SIZE = 65536
# A reused connection that fails this soon after the request went out was closed by the upstream
# before it read the request (its keep-alive timer and our reuse crossed): safe to resend. Later,
# the upstream may have read it and died on it, and a resend could run a paid request twice.
STALE_WINDOW = 1.0


class _StaleConnection(Exception):
    """A reused connection failed before the first response byte: safe to resend."""


class _Conn:
    __slots__ = ("stream", "h11", "idle_since", "heard")

    def __init__(self, stream: "SocketIO | _TLSStream") -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=65536)
        self.idle_since = 0.0
        self.heard = False        # any byte received for the current request

    def next_ready(self) -> Any:
        """The next h11 event from the bytes already received, or h11.NEED_DATA."""
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError:
            raise UpstreamError("The upstream sent a malformed HTTP response.") from None

    async def receive(self, deadline: float, *, answering: bool = False) -> Any:
        """The next h11 event; trio.TooSlowError if it needs bytes that do not come by `deadline`.
        `answering`: the request was just sent, so the upstream cannot have answered yet, and h11
        holds nothing (a connection is reused only with nothing left after its last answer): there
        is nothing to parse before the wait."""
        while True:
            if not answering:
                event = self.next_ready()
                if event is not h11.NEED_DATA:
                    return event
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE, deadline, wait_first=answering)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # a reset, not an end: a body delimited by the close would pass for complete
                raise UpstreamError("The upstream connection was reset.") from None
            answering = False
            self.heard = self.heard or bool(data)
            self.h11.receive_data(data)


class _TLSStream:
    """trio's SSLStream behind the same calls as SocketIO (deadlines as numbers)."""

    __slots__ = ("tls",)

    def __init__(self, tls: trio.SSLStream) -> None:
        self.tls = tls

    async def send_all(self, data: bytes, deadline: float) -> None:
        with trio.CancelScope(deadline=deadline) as scope:
            await self.tls.send_all(data)
        if scope.cancelled_caught:
            raise trio.TooSlowError()

    async def receive_some(self, max_bytes: int, deadline: float, *, wait_first: bool = False) -> bytes:
        with trio.CancelScope(deadline=deadline):   # wait_first: SSLStream knows what it buffered
            return await self.tls.receive_some(max_bytes)
        raise trio.TooSlowError()

    def has_pending(self) -> bool:
        return self.tls.transport_stream.socket.is_readable()

    def close(self) -> None:
        """Without awaiting, so without the TLS close_notify."""
        self.tls.transport_stream.socket.close()


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
        return None if event is h11.NEED_DATA else self._piece(event)

    def _piece(self, event: Any) -> bytes:
        if type(event) is h11.Data:
            return bytes(event.data)
        if type(event) is h11.EndOfMessage:
            self._done = True
            return b""
        raise UpstreamError("The upstream closed the connection mid-response.")

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn, reusable=self._done)


class Pool:
    def __init__(self, origin: Origin, *, max_connections: int, max_idle: int, idle_timeout: float,
                 ssl_context: ssl.SSLContext | None) -> None:
        self.origin = origin
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._ssl = ssl_context
        self._slots = trio.Semaphore(max_connections)
        self._idle: list[_Conn] = []
        self.in_flight = 0
        self.opened = 0

    def __repr__(self) -> str:
        o = self.origin
        return f"<Pool {o.scheme}://{o.host}:{o.port} in_flight={self.in_flight} idle={len(self._idle)}>"

    def statistics(self) -> dict[str, int]:
        return {"in_flight": self.in_flight, "idle": len(self._idle), "opened": self.opened}

    async def request(self, req: UpstreamRequest, timeouts: Timeouts) -> PooledResponse:
        """Send `req` and wait for the response head; the caller must `aclose()` the response."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.CancelScope(deadline=trio.current_time() + timeouts.pool) as wait:
                await self._slots.acquire()
            if wait.cancelled_caught:
                raise Unavailable("The backend's connection limit is reached.", code="upstream_pool_full") from None
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
            self._slots.release()
            raise

    async def _exchange(self, conn: _Conn, req: UpstreamRequest, timeout: float, reused: bool) -> PooledResponse:
        # h11 frames the request (host, length); the other headers were validated where they came
        # from (the client's request by h11, ours at config load) and are spliced in as they are
        framing = [(b"host", self.origin.host_header), (b"content-length", str(len(req.body)).encode())]
        deadline = trio.current_time() + timeout
        try:
            head = conn.h11.send(h11.Request(method=req.method, target=req.path, headers=framing))
            data = b"".join((splice_headers(head, req.headers),
                             conn.h11.send(h11.Data(data=req.body)) if req.body else b"",
                             conn.h11.send(END_OF_MESSAGE)))
            conn.heard = False
            try:
                await conn.stream.send_all(data, deadline)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if reused:
                    raise _StaleConnection() from None
                raise UpstreamError("The upstream connection broke while sending.") from None
            sent = trio.current_time()
            try:
                event = await conn.receive(deadline, answering=True)
                while type(event) is h11.InformationalResponse:    # 100 Continue, 103 Early Hints
                    event = await conn.receive(deadline)
            except UpstreamError:
                # closed while idle in the pool, and only noticed now: nothing was processed
                if reused and not conn.heard and trio.current_time() - sent < STALE_WINDOW:
                    raise _StaleConnection() from None
                raise
        except trio.TooSlowError:
            _close_now(conn)
            raise UpstreamTimeout("The upstream did not answer in time.", code="upstream_first_byte_timeout") from None
        except BaseException:
            _close_now(conn)
            raise
        if type(event) is h11.Response:
            return PooledResponse(self, conn, event.status_code, list(event.headers))
        _close_now(conn)
        if reused and type(event) is h11.ConnectionClosed and trio.current_time() - sent < STALE_WINDOW:
            raise _StaleConnection()
        raise UpstreamError("The upstream closed the connection without answering.")

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
                tcp = await trio.open_tcp_stream(o.host, o.port)
                if self._ssl is None:
                    stream: SocketIO | _TLSStream = SocketIO.adopt(tcp)
                else:
                    tls = trio.SSLStream(tcp, self._ssl, server_hostname=o.host, https_compatible=True)
                    stream = _TLSStream(tls)
                    try:
                        await tls.do_handshake()
                    except BaseException:
                        stream.close()
                        raise
        except trio.TooSlowError:
            raise UpstreamTimeout("Connecting to the upstream timed out.", code="upstream_connect_timeout") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError):
            raise UpstreamError("Cannot connect to the upstream.", code="upstream_connect_failed") from None
        self.opened += 1
        return _Conn(stream)

    def _release(self, conn: _Conn, *, reusable: bool) -> None:
        self.in_flight -= 1
        self._slots.release()
        c = conn.h11
        # bytes after the answer (more than its length said, a second answer) are not the next
        # request's answer: such a connection is closed, not reused
        if (reusable and c.our_state is h11.DONE and c.their_state is h11.DONE and not c.trailing_data[0]
                and len(self._idle) < self.max_idle):
            c.start_next_cycle()
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


def _close_now(conn: _Conn) -> None:
    conn.stream.close()

