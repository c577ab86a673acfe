"""`Transports` owns the upstream transports across config reloads: a backend whose origin, pool
settings and HTTP parser are unchanged keeps its pool and its warm connections."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Iterable

from hxgwd.http import resolve_parser
from hxgwd.upstream import Transport
from hxgwd.upstream.echo import EchoBackend
from hxgwd.upstream.pool import Pool

if TYPE_CHECKING:
    from hxgwd.logs import Logger
    from hxgwd.runtime import BackendRuntime


class Transports:
    """`http_parser`: a `[server] http_parser` setting; `log`: where a pool reports refusals."""

    def __init__(self, http_parser: str = "auto", log: Logger | None = None) -> None:
        self.http_parser = resolve_parser(http_parser)
        self._log = log
        self._by_key: dict[tuple[object, ...], Transport] = {}   # the settings a transport is made with
        # per snapshot object: the hot path looks a backend up by identity, not by its settings
        self._by_backend: dict[int, tuple[BackendRuntime, Transport]] = {}

    def get(self, backend: BackendRuntime) -> Transport:
        hit = self._by_backend.get(id(backend))
        if hit is not None and hit[0] is backend:
            return hit[1]
        transport = self._lookup(backend)
        self._by_backend[id(backend)] = (backend, transport)
        return transport

    def _lookup(self, backend: BackendRuntime) -> Transport:
        cfg = backend.config
        if cfg.kind == "echo":
            key: tuple[object, ...] = ("echo", cfg.echo_dimensions, cfg.echo_delay)
        else:
            key = ("http", backend.origin, cfg.max_connections, cfg.max_idle_connections,
                   cfg.idle_timeout, cfg.tls_verify, cfg.ca_file, self.http_parser, backend.name)
        transport = self._by_key.get(key)
        if transport is None:
            if cfg.kind == "echo":
                transport = EchoBackend(cfg.echo_dimensions, cfg.echo_delay)
            else:
                assert backend.origin is not None            # an http backend has a url
                ctx = _ssl_context(cfg.tls_verify, cfg.ca_file) if backend.origin.tls else None
                transport = Pool(backend.origin, max_connections=cfg.max_connections,
                                 max_idle=cfg.max_idle_connections, idle_timeout=cfg.idle_timeout,
                                 ssl_context=ctx, parser=self.http_parser, name=backend.name, log=self._log)
            self._by_key[key] = transport
        return transport

    def pools(self) -> list[Pool]:
        return [t for t in self._by_key.values() if isinstance(t, Pool)]

    def retain(self, backends: Iterable[BackendRuntime], http_parser: str | None = None) -> None:
        """After a reload: forget transports no current backend uses, once they are idle. A new
        `http_parser` setting makes new pools (their connections parse with it from the start)."""
        backends = list(backends)
        if http_parser is not None:
            self.http_parser = resolve_parser(http_parser)
        self._by_backend = {id(b): (b, self._lookup(b)) for b in backends}
        live = {id(self.get(b)) for b in backends}
        for key, transport in list(self._by_key.items()):
            if id(transport) not in live and getattr(transport, "in_flight", 0) == 0:
                close = getattr(transport, "close_idle", None)
                if close:
                    close()
                del self._by_key[key]

    def sweep(self) -> None:
        for pool in self.pools():
            pool.sweep()

    def close(self) -> None:
        for pool in self.pools():
            pool.close_idle()


def _ssl_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
