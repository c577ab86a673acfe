"""TLSStream: a TLS connection with the calls of `SocketIO` that `HttpConnection` makes, for
the TLS listeners of `[server] tls_listen` (the context comes from `hxgwd.http.tls`)."""

from __future__ import annotations

import math
import socket
import ssl

import trio

from hxgwd.http.sockio import _receive_now, _send_now, _wait_readable, _wait_writable, socket_has_pending

SEND_SLICE = 65536       # plaintext encrypted per step of a send: what waits for the kernel stays small
RECEIVE_SIZE = 65536


class TLSStream:
    """A TLS connection over a non-blocking socket, with the calls of SocketIO (deadlines as plain
    numbers), for HttpConnection, and as SocketIO: system calls and OpenSSL (through ssl.SSLObject
    and memory buffers) while they do not block, trio's readiness waits only when they would.
    trio.SSLStream, tried first, took 110-135 µs more CPU per keep-alive request than this (both
    alternated with wrk, 4 rounds): its locks, conflict detector and the trio.SocketStream under
    it cost scheduler passes on every call, and it has no receive_now.

    The handshake happens in the first receive, the reader task's: so it falls under the deadline
    of the connection's first request head (header_timeout from the connect), and a client that
    connects and never finishes it holds its slot no longer than one that sends nothing.

    One task may receive while another sends (HttpConnection's reader and request loop). TLS
    records leave in the order OpenSSL made them, whichever task made them (the handshake's and
    its tickets come from receives): all go through `_unsent`, and only one task at a time waits
    for the socket to take the rest (trio allows one waiter per direction).
    `socket` is the TCP socket under it (peer address, shutdown before a linger)."""

    __slots__ = ("socket", "_tls", "_incoming", "_outgoing", "_unsent", "_flushing", "_handshaken")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        self._unsent = bytearray()     # records made, not yet taken by the kernel (SEND_SLICE or so at most)
        self._flushing = trio.Lock()
        self._handshaken = False

    @classmethod
    def server(cls, sock: socket.socket, context: ssl.SSLContext) -> "TLSStream":
        return cls(sock, context, server_side=True)

    @property
    def ssl_object(self) -> ssl.SSLObject:
        """Version, cipher, ALPN protocol, peer certificate."""
        return self._tls

    async def do_handshake(self, deadline: float = math.inf) -> None:
        """A client's, before its first send; a server's happens in its first receive."""
        while not self._handshaken:
            if self._decrypt(0) is None:
                await self._flush(deadline)
                await self._receive_more(deadline, wait_first=False)
        await self._flush(deadline)

    async def send_all(self, data: bytes | bytearray | memoryview, deadline: float = math.inf, *, stall_timeout: float | None = None) -> None:
        """All of `data` by `deadline`; with `stall_timeout`, each time the socket takes more, the
        deadline moves to that long from then. Encrypted a slice at a time, so that what waits
        for the kernel stays small however large `data` is."""
        if not self._handshaken:
            await self.do_handshake(deadline)
        view = memoryview(data)
        for start in range(0, len(view), SEND_SLICE):
            try:
                self._tls.write(view[start:start + SEND_SLICE])
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS: {exc.reason or exc}") from None
            if not self._send_now():
                await self._flush(deadline, stall_timeout)
                if stall_timeout is not None:
                    deadline = trio.current_time() + stall_timeout

    async def receive_some(self, max_bytes: int, deadline: float = math.inf, *, wait_first: bool = False) -> bytes:
        """Up to `max_bytes` of plaintext; b"" at the end (TLS's close_notify, or the TCP end
        without it: HTTP/1.1 never needs close_notify to find the end of a request)."""
        while True:
            data = self._decrypt(max_bytes)
            if not self._send_now():          # the handshake's records, or an alert
                await self._flush(deadline)
            if data is not None:
                return data
            await self._receive_more(deadline, wait_first)
            wait_first = False

    def receive_now(self, max_bytes: int) -> bytes | None:
        """Plaintext that arrived already (b"" at the end), or None if no whole record has; never
        waits. What OpenSSL has to send on the way goes now or with the next send or receive."""
        data = self._decrypt(max_bytes)
        if data is None:
            raw = _receive_now(self.socket, RECEIVE_SIZE)
            if raw is not None:
                self._feed(raw)
                data = self._decrypt(max_bytes)
        self._send_now()
        return data

    def has_pending(self) -> bool:
        """Whether anything waits to be read (plaintext, bytes, the end, a reset), without taking it."""
        return bool(self._tls.pending() or self._incoming.pending) or socket_has_pending(self.socket)

    def shutdown_write(self) -> None:
        """TLS's close_notify, then the TCP end (FIN); receiving goes on. OSError if the
        connection is gone."""
        self._close_notify()
        self.socket.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """At once, without awaiting: TLS's close_notify goes if the kernel takes it now (strict
        clients report an end without it as a possible truncation)."""
        sock = self.socket
        if sock.fileno() < 0:
            return
        self._close_notify()
        trio.lowlevel.notify_closing(sock)
        sock.close()

    def _close_notify(self) -> None:
        if not self._handshaken:
            return
        try:
            self._tls.unwrap()
        except ssl.SSLError:           # wants the peer's close_notify, which is not waited for
            pass
        try:
            self._send_now()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    # --- without waiting -----------------------------------------------------------------------

    def _decrypt(self, max_bytes: int) -> bytes | None:
        """Plaintext from the bytes received so far (after the handshake, which this drives);
        b"" at the end; None while it needs more bytes from the peer."""
        try:
            if not self._handshaken:
                self._tls.do_handshake()
                self._handshaken = True
            return self._tls.read(max_bytes) if max_bytes else b""
        except ssl.SSLWantReadError:
            return None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""
        except ssl.SSLError as exc:
            try:
                self._send_now()       # the alert that tells the peer why
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            raise trio.BrokenResourceError(f"TLS: {exc.reason or exc}") from None

    def _feed(self, raw: bytes) -> None:
        if raw:
            self._incoming.write(raw)
        else:
            self._incoming.write_eof()

    def _send_now(self) -> bool:
        """Hand the kernel what it takes of the records made so far; True if it took them all."""
        if self._outgoing.pending:
            self._unsent += self._outgoing.read()
        if self._unsent:
            del self._unsent[:_send_now(self.socket, self._unsent)]
        return not self._unsent

    # --- waits -----------------------------------------------------------------------------------

    async def _receive_more(self, deadline: float, wait_first: bool) -> None:
        """Feed OpenSSL the next bytes from the socket, waiting for them if need be."""
        raw = None if wait_first else _receive_now(self.socket, RECEIVE_SIZE)
        while raw is None:
            if deadline == math.inf:
                await _wait_readable(self.socket)
            else:
                with trio.CancelScope(deadline=deadline) as scope:
                    await _wait_readable(self.socket)
                if scope.cancelled_caught:
                    raise trio.TooSlowError()
            raw = _receive_now(self.socket, RECEIVE_SIZE)
        self._feed(raw)

    async def _flush(self, deadline: float, stall_timeout: float | None = None) -> None:
        """Wait until the kernel took every record made so far."""
        async with self._flushing:
            with trio.CancelScope(deadline=deadline) as scope:
                while not self._send_now():
                    await _wait_writable(self.socket)
                    if stall_timeout is not None:     # writable again: the peer took some
                        scope.deadline = trio.current_time() + stall_timeout
            if scope.cancelled_caught:
                raise trio.TooSlowError()
