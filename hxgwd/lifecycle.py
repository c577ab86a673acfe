"""The daemon's task tree and its choreography: start, reload, drain, stop.

    serve()
    ├── signal_loop        SIGHUP -> reload; SIGTERM/SIGINT -> drain; again -> force
    ├── maintenance        closes pooled upstream connections past their idle timeout
    ├── probe_loop         active health probes of backends that have a probe_path
    └── connections        one task per client connection (two, with its reader)
        └── accepting      the accept loops, one per listener; cancelled first on shutdown

Shutdown order: stop accepting and close the listeners (new connects are refused by the kernel),
mark draining (responses now say `Connection: close`), close idle keep-alive connections, then give
in-flight requests `server.shutdown_grace` seconds before cancelling them.
"""

from __future__ import annotations

import signal
from functools import partial
from typing import Awaitable, Callable, Protocol

import attrs
import trio

from hxgwd import events, sdnotify
from hxgwd.config.load import ConfigError
from hxgwd.config.model import Config, Server
from hxgwd.errors import HttpErrors
from hxgwd.http import resolve_parser
from hxgwd.http.tls import context_for
from hxgwd.http.tls_stream import TLSStream
from hxgwd.idle import IdleWork
from hxgwd.logs import Logger
from hxgwd.metrics.gateway import GatewayMetrics
from hxgwd.http.connection import HttpConnection
from hxgwd.http.settings import ConnectionSettings
from hxgwd.pipeline.context import GatewayContext, Host
from hxgwd.pipeline.handle import Gateway
from hxgwd.http.listen import (ACCEPT_BURST, AcceptBalance, IdleConnections, Listener, accept_loop,
                               bound_addresses, open_listeners)
from hxgwd.pipeline.route import Router
from hxgwd.services import Role, Services, open_services
from hxgwd.runtime import Runtime, RuntimeHolder, build_runtime
from hxgwd.http.sockio import SocketIO
from hxgwd.upstream.transports import Transports
from hxgwd.upstream.gates import Gates
from hxgwd.upstream.probe import probe_loop

# A Ctrl-C reaches both processes of a PyInstaller onefile binary, and the bootloader forwards its
# copy: the same signal again within this many seconds is that echo, not an operator insisting.
SIGNAL_ECHO_WINDOW = 0.5
# Longest wait for a reload to read and compile the config (and the key files it names): a FIFO or
# a hung network mount must not leave the daemon reloading for ever.
RELOAD_TIMEOUT = 10.0


@attrs.define
class Lifecycle:
    log: Logger
    draining: bool = False
    listening: bool = False
    forced: bool = False
    idle_scopes: IdleConnections = attrs.field(factory=IdleConnections)
    accepting: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    connections: trio.CancelScope | None = None

    def log_exception(self, where: str, exc: BaseException) -> None:
        self.log.exception(f"unexpected error in {where}", exc)

    def log_refused(self, peer: str, status: int, code: str | None) -> None:
        """A request the HTTP layer answered itself (malformed, too large, too slow): no access
        line comes from the gateway for it, so the operator sees it here."""
        self.log.info("request refused", peer=peer, status=status, code=code)

    def begin_shutdown(self, services: Services | None = None) -> None:
        if self.draining:
            self.forced = True
            if self.connections is not None:
                self.connections.cancel()
            if services is not None:
                services.flush.cancel()
            return
        self.draining = True
        self.accepting.cancel()
        for scope in self.idle_scopes:
            scope.cancel()

    def statistics(self) -> dict[str, object]:
        return {"draining": self.draining, "listening": self.listening, "idle_connections": len(self.idle_scopes)}


class Reloads:
    """SIGHUP to reloads, for a single process (Daemon) and for a supervisor: each reload runs in a
    task of its own, so that the signal loop keeps taking SIGTERM while a file is read; SIGHUPs
    during a reload make one more after it, not one each. `read` reads and compiles the file off
    the event loop, bounded by RELOAD_TIMEOUT; a read that hangs (a FIFO, a hung mount) is given
    up, and no other starts while it has not returned."""

    def __init__(self, reload: Callable[[], Awaitable[object]]) -> None:
        self._reload = reload
        self.running = False            # a reload task runs
        self._again = False             # a SIGHUP came during it: the file may have changed since it was read
        self.stuck = False              # a reload gave up on a read that has not returned yet

    def request(self, nursery: trio.Nursery) -> None:
        if self.running:
            self._again = True
            return
        self.running = True
        nursery.start_soon(self._while_asked)

    async def _while_asked(self) -> None:
        try:
            while True:
                self._again = False
                await self._reload()
                if not self._again:
                    return
        finally:
            self.running = False

    async def read(self, path: str, generation: int) -> Runtime:
        """The file compiled as `generation`; ConfigError if it is bad, or could not be read in time."""
        if self.stuck:
            raise ConfigError(["an earlier reload is still blocked reading the config"])

        def build() -> Runtime:
            try:
                return build_runtime(path, generation)
            finally:
                self.stuck = False

        self.stuck = True         # until the read returns, even after we stopped waiting
        with trio.move_on_after(RELOAD_TIMEOUT) as waited:
            new: Runtime = await trio.to_thread.run_sync(build, abandon_on_cancel=True)
        if waited.cancelled_caught:
            raise ConfigError([f"reading the config took over {RELOAD_TIMEOUT:g} s (a FIFO, a hung mount?)"])
        return new


class Announce(Protocol):
    """Where the daemon says it is ready, reloading or stopping: systemd (sdnotify), or, in a
    worker, its supervisor (workers/worker.py), which speaks to systemd for the host."""

    def ready(self, status: str) -> object: ...
    def reloading(self) -> object: ...
    def stopping(self, status: str = ...) -> object: ...


@attrs.define
class Daemon:
    """What lives for the whole process, across reloads."""

    holder: RuntimeHolder
    log: Logger
    config_path: str | None = None          # None: SIGHUP does nothing (a worker: its supervisor reloads)
    announce: Announce = sdnotify
    role: Role = Role()                       # what this process keeps of the host's services
    # a worker's link to the host (workers/worker.py); None for a single process
    host: Host | None = None
    context: GatewayContext | None = None     # while serving
    accept_burst: int = ACCEPT_BURST          # a worker shares its listeners: SHARED_ACCEPT_BURST
    accept_balance: AcceptBalance | None = None   # ... and says how many connections it holds
    router: Router = attrs.field(factory=Router)
    transports: Transports = attrs.field(default=attrs.Factory(
        lambda self: Transports(self.holder.current.config.server.http_parser, log=self.log), takes_self=True))
    gates: Gates = attrs.field(factory=Gates)
    services: Services | None = None
    metrics: GatewayMetrics = attrs.field(factory=GatewayMetrics)
    # what restart-only settings are running with: the config at start, whatever reloads came since
    started_with: Config = attrs.field(init=False)
    reloads: Reloads = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.started_with = self.holder.current.config
        self.reloads = Reloads(self.reload)

    async def reload(self) -> bool:
        """Read, check and compile the config off the event loop; swap it in, or keep the old one."""
        old = self.holder.current
        if self.reloads.stuck:
            self.log.error("reload refused: an earlier one is still blocked reading the config",
                           generation=old.generation)
            self.metrics.reloaded("rejected")
            self.holder.reloaded("rejected", ["an earlier reload is still blocked reading the config"])
            return False
        self.announce.reloading()
        assert self.config_path is not None, "reload() needs the config file's path"
        try:
            new = await self.reloads.read(self.config_path, old.generation + 1)
        except ConfigError as exc:
            self.log.error("reload rejected, still serving the previous config", event="reload",
                           result="rejected", generation=old.generation, problems=exc.problems)
            self.announce.ready(f"serving generation {old.generation} (last reload rejected)")
            self.metrics.reloaded("rejected")
            self.holder.reloaded("rejected", exc.problems)
            return False
        except Exception as exc:     # a bug of the config code: still never worth the running daemon
            self.log.exception("reload failed, still serving the previous config", exc)
            self.log.error("reload failed", event="reload", result="failed", generation=old.generation)
            self.announce.ready(f"serving generation {old.generation} (last reload failed)")
            self.metrics.reloaded("failed")
            self.holder.reloaded("failed", [f"{type(exc).__name__} (see the log)"])
            return False
        self.apply(new)
        self.announce.ready(f"serving generation {new.generation}")
        return True

    def apply(self, new: Runtime, worker: bool = False) -> None:
        """Swap `new` in, with what depends on it: one step, no await. A `worker`'s supervisor
        logs the reload (and warns of restart-only settings) once for the host."""
        for setting in needs_restart(self.started_with, new.config) if not worker else ():
            self.log.warning("changed setting takes effect only after a restart", setting=setting)
        self.holder.swap(new)
        self.router.configure(new.config.routing)
        self.router.retain(new.deployments)
        self.transports.retain(new.backends.values(), new.config.server.http_parser)
        self.gates.retain(new.deployments.values())
        if self.services is not None:
            self.services.configure(new.config)
        self.log.configure(new.config.log.level, new.config.log.access_log)
        if worker:
            self.log.info("worker on a new generation", generation=new.generation)
        else:
            self.log.info("config reloaded", event="reload", result="ok", generation=new.generation,
                          config=self.config_path, models=len({d.model for d in new.deployments.values()}),
                          backends=len(new.backends))
        self.metrics.reloaded("ok")
        self.holder.reloaded("ok")


def connection_settings(server: Server) -> ConnectionSettings:
    """What a client connection needs of `[server]` (hxgwd/http/ knows no config)."""
    return ConnectionSettings(
        max_header_bytes=server.max_header_bytes, max_body_bytes=server.max_body_bytes,
        header_timeout=server.header_timeout, body_timeout=server.body_timeout,
        body_total_timeout=server.body_total_timeout, keepalive_timeout=server.keepalive_timeout,
        write_timeout=server.write_timeout)


def needs_restart(old: Config, new: Config) -> list[str]:
    changed = [f"server.{name}" for name in ("listen", "backlog", "max_connections", "http_parser", "workers")
               if getattr(old.server, name) != getattr(new.server, name)]
    changed += [f"redis.{name}" for name in ("url", "password_env", "password_file")
                if getattr(old.redis, name) != getattr(new.redis, name)]
    changed += [f"database.{name}" for name in ("url", "password_env", "password_file", "spool_dir")
                if getattr(old.database, name) != getattr(new.database, name)]
    return changed


async def serve(daemon: Daemon, *, life: Lifecycle | None = None, handle_signals: bool = True,
                listeners: list[Listener] | None = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> Lifecycle:
    """`listeners`: bound already (a worker's, inherited from its supervisor); else bound here."""
    life = life or Lifecycle(daemon.log)
    cfg = daemon.holder.current.config
    daemon.router.configure(cfg.routing)
    daemon.router.on_breaker = events.breaker_logger(daemon.log)
    # Bound before any task starts and before the services make anything (the SQLite file, the
    # spool): a busy port fails plainly (exit 71) and leaves nothing behind.
    if listeners is None:
        listeners = await open_listeners(cfg.server.listen, cfg.server.backlog)
    try:
        async with trio.open_nursery() as outer:
            if handle_signals:   # up to the very end: a second signal also cuts the flush of usage records
                await outer.start(signal_loop, daemon, life)
            async with open_services(daemon.holder.current, daemon.log, daemon.role) as services:
                daemon.services = services
                await _serve(daemon, life, services, listeners, task_status)
            outer.cancel_scope.cancel()
    finally:
        for listener in listeners:
            listener.close()
    daemon.log.info("stopped", forced=life.forced)
    return life


async def _serve(daemon: Daemon, life: Lifecycle, services: Services, listeners: list[Listener],
                 task_status: trio.TaskStatus[list[str]]) -> None:
    cfg = daemon.holder.current.config
    idle = IdleWork(life.log_exception, after_batch=daemon.log.flush)
    daemon.context = GatewayContext(
        daemon.holder, daemon.router, daemon.transports, daemon.gates, services, daemon.log, idle,
        is_listening=lambda: life.listening,
        is_cutting_off=lambda: life.connections is not None and life.connections.cancel_called,
        metrics=daemon.metrics, host=daemon.host)
    gateway = Gateway(daemon.context)

    # [server] -> its ConnectionSettings, rebuilt after a reload
    built_for, built = cfg.server, connection_settings(cfg.server)

    def settings() -> ConnectionSettings:
        nonlocal built_for, built
        server = daemon.holder.current.config.server
        if server is not built_for:
            built_for, built = server, connection_settings(server)
        return built

    # the parser is chosen once: the upstream side reads with the same one (needs_restart)
    parser = resolve_parser(cfg.server.http_parser)
    errors = HttpErrors()

    async def serve_connection(stream: SocketIO, listen: str) -> None:
        runtime = daemon.holder.current    # TLS or not, and which certificate: as at the accept
        tls = context_for(runtime.tls, runtime.config.server, listen)
        await HttpConnection(stream if tls is None else TLSStream.server(stream.socket, tls),
                             settings, gateway, life, parser=parser, errors=errors).run()

    def on_resource_error(exc: OSError) -> None:
        daemon.log.error("accept failed, backing off", error=exc.strerror)

    addresses = bound_addresses(listeners)
    try:
        async with trio.open_nursery() as root:
            await root.start(idle.run)   # cancelled after the connections end; runs what is left
            root.start_soon(maintenance, daemon.transports)
            root.start_soon(probe_loop, daemon.holder, daemon.router, daemon.transports)
            async with trio.open_nursery() as connections:
                life.connections = connections.cancel_scope
                with life.accepting:
                    slots = trio.Semaphore(cfg.server.max_connections)
                    daemon.metrics.connections = lambda: (cfg.server.max_connections - slots.value,
                                                          len(life.idle_scopes))
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(accept_loop, listener, slots, life.idle_scopes, connections,
                                                 partial(serve_connection, listen=listener.listen),
                                                 on_resource_error, daemon.accept_burst, daemon.accept_balance)
                        life.listening = True
                        runtime = daemon.holder.current
                        tls = [listener.address for listener in listeners
                               if context_for(runtime.tls, runtime.config.server, listener.listen)]
                        # the one startup line: what is served, from which file (events.py)
                        daemon.log.info("listening", event="started", **events.started_fields(
                            runtime, daemon.config_path or runtime.source, addresses, tls, parser))
                        daemon.announce.ready(f"listening on {', '.join(addresses)}")
                        task_status.started(addresses)
                life.listening = False
                for listener in listeners:
                    listener.close()
                grace = daemon.holder.current.config.server.shutdown_grace
                connections.cancel_scope.deadline = trio.current_time() + grace
                daemon.log.info("draining", grace_seconds=grace)
            root.cancel_scope.cancel()
    finally:
        for listener in listeners:
            listener.close()
        daemon.transports.close()


async def signal_loop(daemon: Daemon, life: Lifecycle,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    def stop(signum: int) -> None:
        daemon.log.info("shutdown requested" if not life.draining else "forced shutdown",
                        signal=signal.Signals(signum).name)
        daemon.announce.stopping()
        life.begin_shutdown(daemon.services)

    await take_signals(daemon.reloads.request if daemon.config_path else None, stop, task_status=task_status)


async def take_signals(reload: Callable[[trio.Nursery], None] | None, stop: Callable[[int], None], *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """SIGHUP -> `reload` (given a nursery for its task; None: ignored); SIGTERM/SIGINT -> `stop`,
    the first to drain, another to force; the same signal again within SIGNAL_ECHO_WINDOW is the
    PyInstaller bootloader's echo of a Ctrl-C, not an operator insisting."""
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as reloads:
            task_status.started()
            last: tuple[int, float] | None = None
            async for signum in signals:
                now = trio.current_time()
                if signum == signal.SIGHUP:
                    if reload is not None:
                        reload(reloads)
                    continue
                if last is not None and last[0] == signum and now - last[1] < SIGNAL_ECHO_WINDOW:
                    continue
                last = (signum, now)
                stop(signum)


async def maintenance(transports: Transports, interval: float = 5.0) -> None:
    while True:
        await trio.sleep(interval)
        transports.sweep()
