"""One request and its response as the handler sees them: the head, the body when asked for,
and the answer, whole or streamed. The I/O, deadlines and limits are the connection's
(connection.py), which makes these once per request.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, AsyncIterator

import trio

from hxgwd.http.protocol import END_OF_BODY, Headers, HttpError, RequestHead
from hxgwd.http.settings import ConnectionSettings

if TYPE_CHECKING:
    from hxgwd.http.connection import HttpConnection


class ClientGone(Exception):
    """The client closed the connection or stopped reading; nothing more can be sent."""


class Request:
    """A request as the handler sees it: the head now, the body when asked for."""

    __slots__ = ("head", "peer", "max_body_bytes", "_conn", "_settings", "_received", "_body_due")

    def __init__(self, head: RequestHead, peer: str, conn: "HttpConnection", settings: ConnectionSettings) -> None:
        self.head = head
        self.peer = peer
        # the connection's bound, unless the handler sets this request's own before reading
        # (an upload endpoint may take more than a JSON one)
        self.max_body_bytes = settings.max_body_bytes
        self._conn = conn
        self._settings = settings
        self._received = 0
        self._body_due = math.inf    # set when the body is first asked for

    async def body_chunks(self) -> AsyncIterator[bytes]:
        """The body piece by piece as it arrives, never more than one piece held."""
        while (piece := await self._next_piece()) is not None:
            yield piece

    async def read_body(self) -> bytes:
        """The whole body (bounded by `max_body_bytes`); a loop, not an async generator, which
        costs more than the read itself for the usual body that arrived with its head."""
        parts = []
        while (piece := await self._next_piece()) is not None:
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _next_piece(self) -> bytes | None:
        conn = self._conn
        limit = self.max_body_bytes
        if self._received == 0:
            if self.head.content_length is not None and self.head.content_length > limit:
                conn.closing = True
                raise conn.errors.refusal(HttpError(413, f"Request body is larger than {limit} bytes."))
            if self._body_due == math.inf:
                self._body_due = trio.current_time() + self._settings.body_total_timeout
            if conn.protocol.waiting_for_100_continue and self.head.content_length != 0:
                await conn.send(conn.protocol.response_continue())
        try:
            event = await conn.next_event(self._settings.body_timeout, "body", self._body_due)
        except HttpError as exc:     # timed out, or malformed
            conn.closing = True      # the rest of the body may still come: no next request after it
            raise conn.errors.refusal(exc) from None
        if event is END_OF_BODY:
            conn.watch_for_hangup()
            return None
        if type(event) is not bytes:
            raise ClientGone()
        self._received += len(event)
        if self._received > limit:
            conn.closing = True
            raise conn.errors.refusal(HttpError(413, f"Request body is larger than {limit} bytes."))
        return event


class Response:
    """Sends one response: whole (`send_full`) or streamed (`start`, `send`..., `end`).

    A streamed head goes out with the first piece of the body (or with the end): one write and
    one delivery to the client instead of two, which on loopback cost more than the rest of a
    piece's way (a streamed chat: bench/ab.py in the commit). So a caller sends that piece right
    after `start`, without waiting in between (the proxy starts a stream once its first event is
    in hand)."""

    __slots__ = ("_conn", "started", "_extra", "_head")

    def __init__(self, conn: "HttpConnection", extra_headers: Headers) -> None:
        self._conn = conn
        self._extra = extra_headers
        self.started = False
        self._head = b""           # a streamed head not yet written

    def add_header(self, name: bytes, value: bytes) -> None:
        """A header for whatever response is sent, error answers included."""
        self._extra.append((name, value))

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        self.started = True
        conn = self._conn
        await conn.send(conn.protocol.response_full(status, headers + self._extra + conn.closing_headers(), body))

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        conn = self._conn
        self._head = conn.protocol.response_head(status, headers + self._extra + conn.closing_headers())

    async def send(self, data: bytes) -> None:
        await self._conn.send(self._with_head(self._conn.protocol.response_body(data)))

    async def end(self, data: bytes = b"") -> None:
        """The end of the body, after its last piece `data` if given (one write for both)."""
        protocol = self._conn.protocol
        await self._conn.send(self._with_head(protocol.response_body(data) + protocol.response_end()))

    def _with_head(self, data: bytes) -> bytes:
        if not self._head:
            return data
        data, self._head = self._head + data, b""
        return data
