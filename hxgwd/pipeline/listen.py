"""Stage 1, listen: bind the listening sockets and accept connections, at most
`server.max_connections` at a time; the rest wait in the kernel's backlog, costing us nothing."""

from __future__ import annotations

import errno
from typing import Awaitable, Callable

import trio

from hxgwd.config.load import parse_listen

# Out of descriptors or memory: back off and retry instead of dying (trio.serve_listeners does the same).
RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def open_listeners(addresses: tuple[str, ...], backlog: int) -> list[trio.SocketListener]:
    listeners: list[trio.SocketListener] = []
    try:
        for addr in addresses:
            host, port = parse_listen(addr)
            listeners.extend(await trio.open_tcp_listeners(port, host=host, backlog=backlog))
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners


def bound_addresses(listeners: list[trio.SocketListener]) -> list[str]:
    out = []
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return out


async def accept_loop(listener: trio.SocketListener, slots: trio.Semaphore, nursery: trio.Nursery,
                      serve: Callable[[trio.SocketStream], Awaitable[None]],
                      on_resource_error: Callable[[OSError], None]) -> None:
    """Accept forever; `serve` runs in `nursery`, each connection holding one of `slots`."""

    async def run(stream: trio.SocketStream) -> None:
        try:
            await serve(stream)
        finally:
            slots.release()

    while True:
        await slots.acquire()
        try:
            stream = await listener.accept()
        except OSError as exc:
            slots.release()
            if exc.errno not in RESOURCE_ERRORS:
                raise
            on_resource_error(exc)
            await trio.sleep(0.1)
            continue
        except BaseException:
            slots.release()
            raise
        nursery.start_soon(run, stream)
