"""Stage 1, listen: bind the listening sockets and accept connections, at most
`server.max_connections` at a time; the rest wait in the kernel's backlog, costing us nothing.
At the cap, a client waiting there gets the place of the keep-alive connection idle the longest,
so that idle keep-alive connections cannot lock new clients out. Connections in the middle of a
request are never closed for it, and neither are new ones yet to send their first: their bytes may
be on the way, and a burst of clients would close each other before any is served (they have
header_timeout to send it).

Connections are accepted in bursts: after one readiness wait, every connection already queued is
taken with plain non-blocking accept() calls, none of which goes through the scheduler. An accept
through trio's SocketListener yields once per connection, and every yield waits a whole scheduling
round of the busy connections: measured here, 64 connections arriving while 64 others were busy
waited up to 0.5 s to be accepted, and their first requests showed it as a p99 ten times the p50.
"""

from __future__ import annotations

import errno
import socket
from typing import Awaitable, Callable, Iterator, Protocol

import trio

from hxgwd.http.addresses import parse_listen
from hxgwd.http.sockio import SocketIO

# Out of descriptors or memory: back off and retry instead of dying (trio.serve_listeners does the same).
RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# A connection that died in the backlog, or was refused by a firewall: skip it (as trio does).
SKIPPED_ERRORS = {getattr(errno, name) for name in (
    "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
    "EOPNOTSUPP", "ENETUNREACH") if hasattr(errno, name)}
# Most connections taken per readiness wait, so that a flood of them cannot hold the loop either.
ACCEPT_BURST = 64
# ... when other processes accept on the same socket (workers): the first one woken would take a
# whole burst of new connections. Measured with 64 connections opened at once to 2 workers, the
# split was 42/22, 44/20, 57/7 with 64; 36/28, 42/22, 34/30 with 4 (1: 37/27, 33/31, 40/24).
SHARED_ACCEPT_BURST = 4
# How long a process that holds more connections than the others lets them take new ones first.
BALANCE_DEFER = 0.002


class AcceptBalance(Protocol):
    """Processes accepting on one listener, each told how many connections the others hold: the
    kernel wakes them all for a new connection and the first to run takes it, which left 64 of 64
    keep-alive connections on one of two workers in a benchmark round. One that is ahead waits
    BALANCE_DEFER before it accepts, so that the others take them first (and it still does, should
    they be busy or gone)."""

    def ahead(self) -> bool: ...
    def opened(self) -> None: ...
    def closed(self) -> None: ...


class IdleConnections:
    """The connections waiting for a request, as their idle waits' cancel scopes: all of them are
    closed when the daemon drains; the keep-alive ones, longest idle first (a dict keeps insertion
    order), when the accept loop needs room."""

    __slots__ = ("_keep_alive", "_new", "_changed")

    def __init__(self) -> None:
        self._keep_alive: dict[trio.CancelScope, None] = {}   # waiting for their next request
        self._new: set[trio.CancelScope] = set()              # waiting for their first
        self._changed: trio.Event | None = None               # an accept loop at the cap waits on it

    def add(self, scope: trio.CancelScope, *, keep_alive: bool) -> None:
        if keep_alive:
            self._keep_alive[scope] = None
            if self._changed is not None:
                self.notify()
        else:
            self._new.add(scope)

    def discard(self, scope: trio.CancelScope) -> None:
        self._keep_alive.pop(scope, None)
        self._new.discard(scope)

    def __len__(self) -> int:
        return len(self._keep_alive) + len(self._new)

    def __iter__(self) -> Iterator[trio.CancelScope]:
        return iter([*self._keep_alive, *self._new])

    def close_longest_idle(self) -> bool:
        """Cancel the wait of the keep-alive connection idle the longest, which then closes; False
        if none is idle."""
        scope = next(iter(self._keep_alive), None)
        if scope is None:
            return False
        del self._keep_alive[scope]
        scope.cancel()
        return True

    def notify(self) -> None:
        """A connection went idle or ended: room for a client waiting at the cap."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_for_change(self) -> None:
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()


class Listener:
    """One bound, listening, non-blocking socket; `listen`: the server.listen entry it was bound for."""

    __slots__ = ("socket", "listen")

    def __init__(self, sock: socket.socket, listen: str) -> None:
        self.socket = sock
        self.listen = listen

    @property
    def address(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        if self.socket.fileno() >= 0:
            trio.lowlevel.notify_closing(self.socket)   # wakes an accept loop still waiting on it
            self.socket.close()


async def open_listeners(addresses: tuple[str, ...], backlog: int) -> list[Listener]:
    listeners: list[Listener] = []
    try:
        for addr in addresses:
            host, port = parse_listen(addr)
            for family, type_, proto, _name, sockaddr in await trio.socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                sock = socket.socket(family, type_, proto)
                listeners.append(Listener(sock, addr))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(backlog)
                sock.setblocking(False)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def bound_addresses(listeners: list[Listener]) -> list[str]:
    return [listener.address for listener in listeners]


async def accept_loop(listener: Listener, slots: trio.Semaphore, idle: IdleConnections, nursery: trio.Nursery,
                      serve: Callable[[SocketIO], Awaitable[None]],
                      on_resource_error: Callable[[OSError], None], burst: int = ACCEPT_BURST,
                      balance: AcceptBalance | None = None) -> None:
    """Accept until cancelled; `serve` runs in `nursery`, each connection holding one of `slots`,
    and registering in `idle` while it waits for a request; at most `burst` per readiness wait."""

    async def run(stream: SocketIO) -> None:
        try:
            await serve(stream)
        finally:
            slots.release()
            idle.notify()
            if balance is not None:
                balance.closed()

    sock = listener.socket
    while True:
        try:
            await _take_slot(sock, slots, idle)
        except trio.ClosedResourceError:   # the listener was closed: nothing more to accept
            return
        try:
            await trio.lowlevel.wait_readable(sock)
            if balance is not None and balance.ahead():
                await trio.sleep(BALANCE_DEFER)
        except trio.ClosedResourceError:
            slots.release()
            return
        except BaseException:
            slots.release()
            raise
        for taken in range(burst):   # one slot is held at the top of each turn
            try:
                conn, _addr = sock.accept()
            except BlockingIOError:
                slots.release()
                break
            except OSError as exc:
                slots.release()
                if exc.errno in SKIPPED_ERRORS:
                    break
                if exc.errno not in RESOURCE_ERRORS:
                    raise
                on_resource_error(exc)
                await trio.sleep(0.1)
                break
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if balance is not None:
                balance.opened()
            nursery.start_soon(run, SocketIO(conn))
            if taken + 1 == burst:
                break
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                break


async def _take_slot(sock: socket.socket, slots: trio.Semaphore, idle: IdleConnections) -> None:
    """One of `slots`. At the cap, once a client waits in the backlog, the keep-alive connection
    idle the longest is closed for it; with none idle, wait until one is or one ends."""
    while True:
        try:
            slots.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        await trio.lowlevel.wait_readable(sock)    # no one waits: no one is closed
        if idle.close_longest_idle():
            await slots.acquire()                  # its slot, as soon as its task has closed it
            return
        await idle.wait_for_change()
