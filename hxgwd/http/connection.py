"""One client connection: moves bytes between a socket and the sans-I/O server protocol, applies each phase's
deadline, and calls the handler once per request. Knows HTTP, not OpenAI.

Two tasks per connection. The reader task receives only when given a permit: when the request
loop needs more bytes, and once while a handler runs, so that a client hanging up cancels the
request at once (its upstream call included, and the connection with it) instead of being
noticed at the end. Between requests, the request loop first takes the next request's bytes
itself if they are already waiting in the socket (under load they usually are), which spares the
reader's wake-up. Either way bytes are received only when the parser holds none, so at most one
receive buffer is ever held and a fast client cannot queue memory behind a slow handler.

Phases and answers: idle keep-alive -> silent close; a new connection without a whole head within
header_timeout -> silent close, or 408 once it sent a byte; first byte to last header -> 408;
between body pieces -> 408; a whole body -> 408 after body_total_timeout; body over the limit ->
413; a client that takes none of a write for write_timeout -> connection dropped. An answer given
before the request body was read (a 401, the errors above) keeps the connection only if the rest of
the body is in the parser already; it is never waited for, since a client without a key could
trickle it to hold the connection. Otherwise the answer says `Connection: close`, and what comes
is drained for a moment (LINGER_SECONDS at most) before the close, so that the client, usually
still sending, is not reset before it read the answer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol, Sequence

import trio

from hxgwd.http.events import Marker
from hxgwd.http.exchange import ClientGone, Request, Response
from hxgwd.http.listen import IdleConnections
from hxgwd.http.parsers import server_protocol
from hxgwd.http.protocol import (END_OF_BODY, INTERNAL_ERROR, NEED_DATA, PEER_CLOSED, Errors, Headers, HttpError,
                                 PlainErrors, ProtocolError, RequestHead)
from hxgwd.http.settings import ConnectionSettings
from hxgwd.http.sockio import SocketIO

if TYPE_CHECKING:
    from hxgwd.http.tls_stream import TLSStream

RECEIVE_SIZE = 65536
LINGER_SECONDS = 2.0        # longest read-and-drop of a request body before closing under it
CLOSE: Headers = [(b"connection", b"close")]
YIELD_EVERY = 4             # requests served without a wait before the connection yields the loop:
                            # 16 measured p99 67 ms at 64 conns (saturated), 4 gave 60, yielding
                            # every time 41 ms but gave back most of the gain (bench/ab.py)


class Lifecycle(Protocol):
    draining: bool
    idle_scopes: IdleConnections

    def log_exception(self, where: str, exc: BaseException) -> None: ...

    def log_refused(self, peer: str, status: int, code: str | None) -> None: ...


Handler = Callable[[Request, Response], Awaitable[None]]


class HttpConnection:
    def __init__(self, stream: SocketIO | TLSStream, settings: Callable[[], ConnectionSettings], handler: Handler,
                 life: Lifecycle, *, parser: str = "h11", errors: Errors = PlainErrors()) -> None:
        self.stream = stream
        self._settings = settings
        self._handler = handler
        self._life = life
        self.errors = errors
        first = settings()
        self.protocol = server_protocol(parser, first.max_header_bytes)
        self._write_timeout = first.write_timeout
        self._read_permit = trio.Event()
        self._data_ready = trio.Event()
        self._receiving = False     # the reader is in a receive: whatever comes sets _data_ready
        self._ready_in_a_row = 0    # requests whose bytes were here already (buffered or taken), in a row
        self._cancel_connection = trio.CancelScope()   # replaced by the nursery's in run()
        self._handling = False
        # the first request's head is due header_timeout after the connect, its first byte included:
        # a connection that sends nothing holds its slot that long, not the keep-alive timeout
        self._head_due = trio.current_time() + first.header_timeout
        self.closing = False        # the connection ends after this response, which says so
        self.client_gone = False
        try:
            host, port = stream.socket.getpeername()[:2]
            self.peer = f"{host}:{port}"
        except (OSError, ValueError):
            self.peer = "?"

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_connection = nursery.cancel_scope
                nursery.start_soon(self._read_loop)
                await self._request_loop()
                nursery.cancel_scope.cancel()
            if self.closing and not self.client_gone and not self.protocol.request_complete:
                await self._linger(self._settings().max_body_bytes)
        finally:
            self.stream.close()

    # --- the two tasks -----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        # A client does not send its next request before it has our answer to this one, so after
        # a receive that drained the socket the next one waits for readability at once instead of
        # failing with EAGAIN first (pipelined bytes that came along are in the parser already).
        drained = False
        while True:
            await self._read_permit.wait()
            self._read_permit = trio.Event()
            self._receiving = True
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE, wait_first=drained)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self._receiving = False
            drained = 0 < len(data) < RECEIVE_SIZE
            self.protocol.feed(data)
            self._data_ready.set()
            if not data:
                self.client_gone = True
                if self._handling:
                    # the handler, its upstream call included, and with it the connection: nothing
                    # more can come from or go to a client that hung up (one scope per connection,
                    # not one per request: a CancelScope costs more than the rest of this loop)
                    self._cancel_connection.cancel()
                return

    async def _request_loop(self) -> None:
        while True:
            settings = self._settings()
            self._write_timeout = settings.write_timeout
            try:
                head = await self._next_request(settings)
            except HttpError as exc:     # 400, 408, 431, 505: answer and close
                refusal = self.errors.refusal(exc)
                self._life.log_refused(self.peer, exc.status, getattr(refusal, "code", None))
                await self._send_quietly(self._error_answer(refusal))
                return
            if head is None:
                return
            await self._serve_one(head, settings)
            if self.client_gone or not self.protocol.response_complete or self.protocol.closes_after_response:
                self.closing = True
                return
            if not self.protocol.reusable or self._life.draining:
                return
            self.protocol.start_next_cycle()

    async def _next_request(self, settings: ConnectionSettings) -> RequestHead | None:
        """The next request's head: waits up to the keep-alive timeout for its first byte, then up
        to the header timeout for the rest (for the first request, up to the header timeout from
        the connect for all of it); None when the client closed or stayed idle."""
        due = self._head_due
        # A pipelined request may be in the parser whole already. Asking the parser first, rather
        # than whether it holds any bytes, keeps the question cheap: h11 answers that one only with
        # a copy of its whole buffer, once per request of a pipeline (quadratic in its length).
        event = self.protocol.next()
        if event is NEED_DATA:
            # what the parser holds now is at most part of a head (h11 bounds it), so the copy is too
            if self.protocol.has_buffered_data or self._take_arrived():
                await self._take_turn()
            else:
                self._ready_in_a_row = 0
                if not await self._wait_for_first_byte(min(due, trio.current_time() + settings.keepalive_timeout)):
                    return None
            event = await self.next_event(settings.header_timeout, "head", due)
        else:
            await self._take_turn()
        self._head_due = math.inf
        if event is PEER_CLOSED:
            return None
        if type(event) is not RequestHead:
            raise HttpError(408, "Incomplete request.")
        return event

    async def _take_turn(self) -> None:
        # A client sending back to back, or pipelining, must not keep the loop to itself: answers
        # that need no upstream (/healthz, /v1/models, errors) never yield. Every so often, not
        # every time: a proxied request yields anyway while it waits for its upstream.
        self._ready_in_a_row += 1
        if self._ready_in_a_row % YIELD_EVERY == 0:
            await trio.lowlevel.checkpoint()

    async def _wait_for_first_byte(self, deadline: float) -> bool:
        """Wait, up to `deadline`, for the first byte of the next request."""
        with trio.CancelScope(deadline=deadline) as idle:
            self._life.idle_scopes.add(idle, keep_alive=self._head_due == math.inf)
            try:
                if self._life.draining:
                    return False
                self._data_ready = trio.Event()
                self._ask_for_data()
                await self._data_ready.wait()
            finally:
                self._life.idle_scopes.discard(idle)
        return not idle.cancelled_caught

    def _take_arrived(self) -> bool:
        """Take the next request's bytes if they are in the socket already (the client usually
        sends it while we finish the last one): no wake-up of the reader, no task switch, no idle
        timer. The reader, if waiting, then finds nothing and waits on."""
        try:
            data = self.stream.receive_now(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False        # the reader finds the same and ends the connection
        if not data:           # nothing yet, or the end: the reader's way handles both
            return False
        self.protocol.feed(data)
        return True

    async def _serve_one(self, head: RequestHead, settings: ConnectionSettings) -> None:
        self.closing = self._life.draining or not head.keep_alive
        response = Response(self, [])
        request = Request(head, self.peer, self, settings)
        self._handling = True
        try:
            if self.protocol.request_complete or head.content_length == 0:
                self.watch_for_hangup()
            await self._handler(request, response)
        except ClientGone:
            self.client_gone = True
        except Exception as exc:
            if self.errors.answer(exc) is None:
                self._life.log_exception("request handler", exc)
                exc = self.errors.refusal(INTERNAL_ERROR)
            if not response.started:
                await self._send_quietly(self._error_answer(exc, response._extra))
        finally:
            self._handling = False

    def _error_answer(self, exc: Exception, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        """The answer to `exc`, closing the connection; b"" if a response was begun already."""
        if not self.protocol.can_start_response:
            return b""
        answer = self.errors.answer(exc) or self.errors.answer(self.errors.refusal(INTERNAL_ERROR))
        assert answer is not None, "Errors.answer() answers its own refusal of INTERNAL_ERROR"
        status, own, body = answer
        self.closing = True
        return self.protocol.response_full(status, [*own, *headers, *CLOSE], body)

    def closing_headers(self) -> Headers:
        """`Connection: close` for a response after which the connection ends: asked for, draining,
        or sent before the request body was read (failed, or not wanted) and whose rest has not
        all arrived: waiting for it would let any client, keyless ones included, hold the
        connection with a body trickled in within body_timeout."""
        if not self.closing and not self.protocol.request_complete:
            self.closing = not self._drop_received_body()
        return CLOSE if self.closing else []

    def _drop_received_body(self) -> bool:
        """Drop the unread request body the parser holds, without receiving; True if it was all there."""
        try:
            while (event := self.protocol.next()) is not NEED_DATA:
                if event is END_OF_BODY:
                    return True
                if type(event) is not bytes:
                    return False
        except ProtocolError:       # a malformed chunk: nothing after it can be trusted
            pass
        return False

    async def _linger(self, max_bytes: int) -> None:
        """Closing with part of the request body unread: the kernel answers data that arrives after
        close() with a reset, which can destroy our answer before the client read it (it is
        usually still sending). So stop sending, then read and drop what comes, for a little while."""
        try:
            self.stream.shutdown_write()
        except OSError:
            return
        dropped = 0
        with trio.move_on_after(LINGER_SECONDS):
            while dropped <= max_bytes:
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                dropped += len(data)

    # --- I/O helpers used by Request and Response ----------------------------------------------

    def watch_for_hangup(self) -> None:
        """Let the reader wait for the client while the handler works: EOF cancels the request."""
        self._read_permit.set()

    def _ask_for_data(self) -> None:
        # Not when the reader is already receiving (the watch for a hang-up armed during the last
        # request): a permit then would send it straight back to the socket after this data, in
        # the middle of the next request's work; without one it re-arms when the handler asks it to
        # (watch_for_hangup), and so while the handler waits for its upstream.
        if not self._receiving:
            self._read_permit.set()

    async def next_event(self, timeout: float, phase: str, due: float = math.inf) -> RequestHead | bytes | Marker:
        """The next protocol event, receiving as needed; RequestTimeout after `timeout`, or at
        `due` if sooner."""
        deadline = min(trio.current_time() + timeout, due)
        while True:
            event = self.protocol.next()
            if event is not NEED_DATA:
                return event
            if self.client_gone:
                return PEER_CLOSED
            self._data_ready = trio.Event()
            self._ask_for_data()
            with trio.CancelScope(deadline=deadline) as scope:
                await self._data_ready.wait()
            if scope.cancelled_caught:
                raise HttpError(408, f"Request {phase} not received in time.")

    async def send(self, data: bytes) -> None:
        if not data:
            return
        try:
            timeout = self._write_timeout
            await self.stream.send_all(data, trio.current_time() + timeout, stall_timeout=timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            self.client_gone = True
            self.protocol.send_failed()
            raise ClientGone()

    async def _send_quietly(self, data: bytes) -> None:
        try:
            await self.send(data)
        except ClientGone:
            pass

