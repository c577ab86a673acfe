"""Active health probes: a GET per backend, every `probe_interval`, reported to the router.

Passive health (the breaker) only learns from real requests, so a backend that went down while
idle is found out by a client's request, and one that came back waits for the breaker's
cooldown and a probe request. A backend with `probe_path` (e.g. "/v1/models", "/health") is
asked directly instead: a 2xx within `probe_timeout` is up, anything else (an error status,
refused, reset, timeout, TLS failure) is down; `Router.probe_result` opens or closes the breakers
of all its deployments. The path is taken from the origin's root, as servers put /health there.

Off the request path, at most one probe per backend in flight and one every few seconds, so this
uses httpx for convenience rather than the pool of the hot path. The loop reads
`holder.current` each round (a round is at most `interval_floor` apart), so a reload that adds,
removes or changes a probe applies within that.
"""

from __future__ import annotations

import ssl

import httpx
import trio

from hxgwd.runtime import BackendRuntime, RuntimeHolder


def probe_url(backend: BackendRuntime) -> str:
    origin = backend.origin
    assert origin is not None and backend.config.probe_path
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    path = backend.config.probe_path
    return f"{origin.scheme}://{host}:{origin.port}{path if path.startswith('/') else '/' + path}"


def probed(holder: RuntimeHolder) -> list[BackendRuntime]:
    return [b for b in holder.current.backends.values()
            if b.config.probe_path and b.config.kind == "openai" and b.origin is not None]


async def probe_once(client: httpx.AsyncClient, backend: BackendRuntime) -> bool:
    cfg = backend.config
    headers = dict(cfg.headers)
    if backend.api_key:
        headers["Authorization"] = f"Bearer {backend.api_key}"
    with trio.move_on_after(cfg.probe_timeout):
        try:
            response = await client.get(probe_url(backend), headers=headers, timeout=cfg.probe_timeout)
        except (httpx.HTTPError, OSError, ssl.SSLError, ValueError):
            return False
        return 200 <= response.status_code < 300
    return False


async def probe_loop(holder: RuntimeHolder, router, *, interval_floor: float = 0.5) -> None:
    """Probe every backend that has a probe_path, for ever; cancel the surrounding scope to stop."""
    clients: dict[object, httpx.AsyncClient] = {}
    due: dict[str, float] = {}
    running: set[str] = set()

    def client_for(backend: BackendRuntime) -> httpx.AsyncClient:
        cfg = backend.config
        verify: object = (cfg.ca_file or True) if cfg.tls_verify else False
        client = clients.get(verify)
        if client is None:
            client = clients[verify] = httpx.AsyncClient(verify=verify, follow_redirects=False)
        return client

    async def probe(backend: BackendRuntime) -> None:
        try:
            ok = await probe_once(client_for(backend), backend)
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
        with trio.CancelScope(shield=True):
            for client in clients.values():
                await client.aclose()
