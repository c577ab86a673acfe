"""Byte streams for the hot path: a connected non-blocking socket read and written with plain
system calls while they succeed, and trio's readiness waits only when they would block.

Why not trio.SocketStream: each of its calls goes through a conflict detector, an error-translating
context manager and a yield to the scheduler even when the kernel took or had the bytes at once,
and a deadline costs a CancelScope around every call. Profiled here, that was a tenth of the
gateway's CPU per request. Here a deadline is a plain number, and a CancelScope is opened only
around a wait that actually happens.

Every wait still goes through trio (`wait_readable` / `wait_writable`), so cancellation, deadlines
and fairness keep working: a call that returns without waiting is not a checkpoint, and callers
that could loop without ever waiting must checkpoint themselves.

Errors are trio's: the peer gone -> trio.BrokenResourceError, closed here ->
trio.ClosedResourceError, deadline passed -> trio.TooSlowError. A receive returns b"" only for an
orderly end (FIN); a reset is BrokenResourceError, since a body that ends with the connection is
complete only when the connection ended cleanly.
"""

from __future__ import annotations

import errno
import math
import select
import socket

import trio

_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable


class SocketIO:
    __slots__ = ("socket",)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock

    async def send_all(self, data: bytes | bytearray | memoryview, deadline: float = math.inf, *, stall_timeout: float | None = None) -> None:
        """All of `data` by `deadline`; with `stall_timeout`, each time the peer takes some, the
        deadline moves to that long from then: a slow reader that keeps reading is not cut off."""
        sock = self.socket
        sent = _send_now(sock, data)
        if sent == len(data):
            return
        view = memoryview(data)
        with trio.CancelScope(deadline=deadline) as scope:
            while sent < len(view):
                await _wait_writable(sock)
                taken = _send_now(sock, view[sent:])
                sent += taken
                if taken and stall_timeout is not None:
                    scope.deadline = trio.current_time() + stall_timeout
        if scope.cancelled_caught:
            raise trio.TooSlowError()

    async def receive_some(self, max_bytes: int, deadline: float = math.inf, *, wait_first: bool = False) -> bytes:
        """Up to `max_bytes`; b"" when the peer closed (or reset) the connection. `wait_first`:
        the peer cannot have sent anything yet (it is answering what we just sent), so skip the
        recv() that would only fail with EAGAIN and wait for readability at once."""
        sock = self.socket
        if not wait_first:
            data = _receive_now(sock, max_bytes)
            if data is not None:
                return data
        if deadline == math.inf:      # a watch for the client hanging up, say: no scope to pay for
            return await _receive_when_ready(sock, max_bytes)
        with trio.CancelScope(deadline=deadline):
            return await _receive_when_ready(sock, max_bytes)
        raise trio.TooSlowError()   # only reached when the scope was cancelled by its deadline

    def receive_now(self, max_bytes: int) -> bytes | None:
        """What the socket holds right now (b"" at its end), or None if nothing; never waits."""
        return _receive_now(self.socket, max_bytes)

    def has_pending(self) -> bool:
        """Whether anything waits to be read (bytes, the end, a reset), without taking it."""
        return socket_has_pending(self.socket)

    def shutdown_write(self) -> None:
        """Send the end (FIN); receiving goes on. OSError if the connection is gone."""
        self.socket.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Close at once (no lingering, no await); a task waiting on the socket gets
        trio.ClosedResourceError."""
        sock = self.socket
        if sock.fileno() >= 0:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


async def _receive_when_ready(sock: socket.socket, max_bytes: int) -> bytes:
    while True:
        await _wait_readable(sock)
        data = _receive_now(sock, max_bytes)
        if data is not None:
            return data


def socket_has_pending(sock: socket.socket) -> bool:
    """Whether the kernel holds anything to read on `sock` (bytes, the end, a reset), untaken.
    poll(), not recv(MSG_PEEK): the same answer without an exception on the usual "nothing"
    (0.74 against 1.19 µs here; the pool asks once per reused connection)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _send_now(sock: socket.socket, data: bytes | bytearray | memoryview) -> int:
    """How much send() takes without blocking (0 when it would block)."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise _broken(sock, exc) from None


def _receive_now(sock: socket.socket, max_bytes: int) -> bytes | None:
    """What recv() gives without blocking; None when it would block."""
    try:
        return sock.recv(max_bytes)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise _broken(sock, exc) from None


def _broken(sock: socket.socket, exc: OSError) -> Exception:
    if sock.fileno() < 0:
        return trio.ClosedResourceError("the socket was closed")
    # the errno's name too (ECONNRESET): the pool's failure causes quote it (upstream/causes.py)
    name = errno.errorcode.get(exc.errno or 0, "")
    return trio.BrokenResourceError(f"socket error: {name} {exc.strerror or exc}".replace(":  ", ": "))

