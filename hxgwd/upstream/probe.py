"""Active health probes: a GET per backend, every `probe_interval`, reported to the router.

Passive health (the breaker) only learns from real requests, so a backend that went down while
idle is found out by a client's request, and one that came back waits for the breaker's
cooldown and a probe request. A backend with `probe_path` (e.g. "/v1/models", "/health") is
asked directly instead: a 2xx within `probe_timeout` is up, anything else (an error status,
refused, reset, timeout, TLS failure) is down; `Router.probe_result` opens or closes the breakers
of all its deployments. The path is taken from the origin's root, as servers put /health there.

Probes go through the backend's own pool (`Transports`), so a probe trusts exactly the
certificates traffic trusts (its `ca_file`, `tls_verify`) and speaks through the same HTTP
client. (With httpx, probes trusted certifi's bundle and traffic the system's: a backend on a
private CA passed traffic and failed probes, and got its breaker opened.) A probe that finds the
pool at its `max_connections` gives no verdict: a busy backend is not a down one.

At most one probe per backend in flight. The loop reads `holder.current` each round (a round is
at most `interval_floor` apart), so a reload that adds, removes or changes a probe applies within that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from hxgwd.config.model import Timeouts
from hxgwd.errors import GatewayError
from hxgwd.runtime import BackendRuntime, RuntimeHolder
from hxgwd.upstream import PoolFull, UpstreamRequest
from hxgwd.upstream.transports import Transports

if TYPE_CHECKING:
    from hxgwd.pipeline.route import Router

MAX_PROBE_BODY = 1 << 20     # read to its end (up to this) so the connection can be reused


def probe_path(backend: BackendRuntime) -> str:
    path = backend.config.probe_path
    assert path
    return path if path.startswith("/") else "/" + path


def probed(holder: RuntimeHolder) -> list[BackendRuntime]:
    return [b for b in holder.current.backends.values()
            if b.config.probe_path and b.config.kind == "openai" and b.origin is not None]


async def probe_once(transports: Transports, backend: BackendRuntime) -> bool | None:
    """Whether the backend answered the probe with a 2xx in time; None: no verdict (pool full)."""
    cfg = backend.config
    headers = [(name.lower().encode(), value.encode()) for name, value in cfg.headers.items()]
    if backend.api_key:
        headers.append((b"authorization", b"Bearer " + backend.api_key.encode()))
    t = cfg.probe_timeout
    timeouts = Timeouts(connect=t, first_byte=t, between_chunks=t, total=t, pool=t)
    deadline = trio.current_time() + t
    with trio.move_on_after(t):
        try:
            response = await transports.get(backend).request(
                UpstreamRequest("GET", probe_path(backend), headers, b""), timeouts)
        except PoolFull:
            return None
        except GatewayError:
            return False
        try:
            read = 0
            while read <= MAX_PROBE_BODY and (piece := await response.receive(deadline)):
                read += len(piece)
        except (GatewayError, trio.TooSlowError):
            pass                     # the status decides; the connection is closed, not reused
        finally:
            await response.aclose()
        return 200 <= response.status < 300
    return False


async def probe_loop(holder: RuntimeHolder, router: Router, transports: Transports | None = None, *,
                     interval_floor: float = 0.5) -> None:
    """Probe every backend that has a probe_path, for ever; cancel the surrounding scope to stop.
    `transports`: the traffic's (the daemon passes its own); without, the loop keeps its own."""
    own = transports is None
    if transports is None:
        transports = Transports(holder.current.config.server.http_parser)
    due: dict[str, float] = {}
    running: set[str] = set()

    async def probe(backend: BackendRuntime) -> None:
        try:
            ok = await probe_once(transports, backend)
            if ok is not None:
                router.probe_result(backend.name, ok, trio.current_time())
        finally:
            running.discard(backend.name)

    try:
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                backends = probed(holder)
                names = {b.name for b in backends}
                for name in list(due):
                    if name not in names:
                        del due[name]          # gone, or its probe switched off, in a reload
                for backend in backends:
                    interval = max(backend.config.probe_interval, interval_floor)
                    at = due.get(backend.name, now)
                    if at - now > interval:   # a reload shortened the interval
                        at = now
                    if at <= now:
                        due[backend.name] = now + interval
                        if backend.name not in running:     # a slow probe is not stacked up
                            running.add(backend.name)
                            nursery.start_soon(probe, backend)
                # Wake for the next probe due, and at least every interval_floor to see a reload.
                await trio.sleep_until(min(min(due.values(), default=now + interval_floor),
                                           now + interval_floor))
    finally:
        if own:
            transports.close()
