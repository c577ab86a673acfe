"""Upstream transports: how a built request reaches a backend and its answer comes back.

Two kinds share one small interface, so routing, transforms, retries and records treat them alike:
`pool.Pool` (HTTP/1.1 over our connection pool, on `hxgwd.http`'s client protocol) and
`echo.EchoBackend` (in-process, no network). `Transports` owns them across config reloads: a
backend whose origin, pool settings and HTTP parser are unchanged keeps its pool and its warm
connections (transports.py). Health probes (probe.py) go through the same pools, so they trust the same
certificates as traffic.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from hxgwd.config.model import Timeouts
from hxgwd.errors import Unavailable

Headers = list[tuple[bytes, bytes]]
# a request body: whole, or in pieces sent one after the other as they are (a large upload is
# never joined into a second copy)
RequestBody = bytes | tuple[bytes | bytearray | memoryview, ...]


@attrs.frozen(slots=True)
class UpstreamRequest:
    method: str
    path: str
    headers: Headers      # without host and content-length: the transport sets those
    body: RequestBody


class PoolFull(Unavailable):
    """A request gave up waiting for a connection under a backend's `max_connections`: the
    gateway's own limit, not the backend's failure (no breaker learns from it)."""

    code = "upstream_pool_full"
    fault = "gateway"


class UpstreamResponse(Protocol):
    status: int
    headers: Headers

    async def receive(self, deadline: float = ...) -> bytes:
        """The next piece of the body, b"" at its end; trio.TooSlowError if none by `deadline`
        (trio clock; no limit by default)."""

    def receive_ready(self) -> bytes | None:
        """The next piece if it has already arrived, else None; never waits. b"" at the end,
        after which receive() returns b"" at once."""

    async def aclose(self) -> None:
        """Release the connection (kept for reuse only if the body was read to its end)."""


class Transport(Protocol):
    async def request(self, req: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse: ...
