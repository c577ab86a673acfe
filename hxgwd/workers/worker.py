"""One worker: the daemon of lifecycle.py on listeners inherited from the supervisor, with the
host's parts reached over the control channel (channel.py).

At start the worker says "hello" and gets what the supervisor read (config text and secret files,
so that every worker compiles the same generation), the listeners' descriptors, and its place
(index, count). It tells the supervisor when it serves ("ready"); the supervisor drives reloads
("prepare", then "commit" or "abort": all workers or none) and the drain ("drain"). What it
answers for the host (/admin/stats, /admin/routing, /metrics, /status) it asks of every worker
through the supervisor ("gather") and merges (merge.py). If the supervisor goes away, the worker
drains and exits: nothing would restart it, and systemd stops the unit anyway.

Per worker, by design: connections, the upstream pools and concurrency gates (each worker holds
its share of a backend's max_connections and a deployment's max_concurrency: `shares`), the
router's learned state and breakers (README "Workers"), the usage journal (its own spool
directory) and writer, and the store key cache. Kept by the supervisor for the host: the limiter's
counters (limits.py), the budgets' seeding and the usage retention.
"""

from __future__ import annotations

import gc
import os
import socket
import time
from typing import Any, Callable

import attrs
import trio

from hxgwd.config import model as m
from hxgwd.config.load import ConfigError
from hxgwd.http.listen import SHARED_ACCEPT_BURST, Listener
from hxgwd.lifecycle import RELOAD_TIMEOUT, Daemon, Lifecycle, serve
from hxgwd.logs import Logger
from hxgwd.runtime import ConfigRead, Runtime, RuntimeHolder, build_runtime
from hxgwd.services import Role
from hxgwd.workers import views
from hxgwd.workers.balance import ConnectionCounts
from hxgwd.workers.channel import Peer, PeerGone, RemoteError
from hxgwd.workers.limits import WorkerLimiter

HELLO_TIMEOUT = 30.0     # the supervisor answers at once; a start under heavy load may be slow
GATHER_TIMEOUT = 5.0     # a host view: every worker's part, through the supervisor
KEYS_TIMEOUT = 10.0      # every worker re-reads the store's keys


def shares(index: int, count: int) -> Callable[[m.Config], m.Config]:
    """The config as worker `index` of `count` serves it: its share of each deployment's
    max_concurrency and max_queue and of each backend's max_connections and max_idle_connections.
    Each worker is a smaller host: its gates, pools and router's queueing model agree on the same
    caps (bench/routing: routers that saw the host's caps but only their own in-flight requests
    overloaded small deployments, +33 % mean time in the saturation scenario; with shares, +1 %)."""

    def share(amount: int) -> int:
        return worker_share(amount, index, count)

    def adjust(config: m.Config) -> m.Config:
        return attrs.evolve(
            config,
            models=tuple(attrs.evolve(md, max_concurrency=share(md.max_concurrency), max_queue=share(md.max_queue))
                         for md in config.models),
            backends=tuple(attrs.evolve(b, max_connections=share(b.max_connections),
                                        max_idle_connections=share(b.max_idle_connections))
                           for b in config.backends))
    return adjust


def worker_share(amount: int, index: int, count: int) -> int:
    """Worker `index`'s part of a host-wide cap: the parts add up to `amount` (0, no cap, stays 0),
    but a worker never gets 0 of a cap (each must be able to serve): a cap smaller than the
    number of workers is exceeded, up to one per worker (README "Workers")."""
    if amount <= 0:
        return amount
    return max(1, amount // count + (1 if index < amount % count else 0))


class SupervisorAnnounce:
    """lifecycle.Announce for a worker: the supervisor tells systemd, for the whole host."""

    def __init__(self, peer: Peer, holder: RuntimeHolder) -> None:
        self.peer = peer
        self.holder = holder

    def ready(self, status: str) -> object:
        return self.peer.notify_nowait("ready", {"generation": self.holder.current.generation, "status": status})

    def reloading(self) -> object:
        return None

    def stopping(self, status: str = "draining connections") -> object:
        return self.peer.notify_nowait("stopping", {"status": status})


class WorkerHost:
    """pipeline.context.Host: the other workers, through the supervisor."""

    def __init__(self, peer: Peer, index: int, count: int) -> None:
        self.peer = peer
        self.index = index
        self.count = count

    async def view(self, what: str) -> Any:
        gathered = await self.peer.call("gather", {"what": what}, timeout=GATHER_TIMEOUT)
        return views.merge_view(what, gathered)

    async def keys_changed(self) -> None:
        await self.peer.call("keys_changed", None, timeout=KEYS_TIMEOUT)

    async def find_response(self, response_id: str, key: str | None) -> str | None:
        try:
            found: str | None = await self.peer.call("find_response", {"id": response_id, "key": key},
                                                     timeout=GATHER_TIMEOUT)
        except (PeerGone, RemoteError, trio.TooSlowError):
            return None
        return found


class Worker:
    def __init__(self, index: int, log: Logger) -> None:
        self.index = index
        self.log = log
        self.daemon: Daemon | None = None
        self.life = Lifecycle(log)
        self.pending: dict[int, Runtime] = {}     # prepared generations, until commit or abort
        self.adjust: Callable[[m.Config], m.Config] | None = None    # its shares, once it knows its place

    def handlers(self) -> dict[str, Callable[[Any], Any]]:
        return {"ping": lambda args: None, "prepare": self.prepare, "commit": self.commit, "abort": self.abort,
                "drain": self.drain,
                "view": self.view, "refresh_keys": self.refresh_keys, "response_home": self.response_home}

    async def prepare(self, args: dict[str, Any]) -> dict[str, Any]:
        """Compile what the supervisor read; keep it for "commit". -> problems, if any."""
        read = ConfigRead(args["path"], args["text"], args["files"])
        generation = args["generation"]
        try:
            with trio.move_on_after(RELOAD_TIMEOUT) as waited:
                runtime = await trio.to_thread.run_sync(build_runtime, read.path, generation, None, read,
                                                        self.adjust, abandon_on_cancel=True)
            if waited.cancelled_caught:
                return {"problems": [f"compiling the config took over {RELOAD_TIMEOUT:g} s"]}
        except ConfigError as exc:
            return {"problems": exc.problems}
        self.pending = {generation: runtime}
        return {"problems": []}

    def commit(self, args: dict[str, Any]) -> int:
        daemon = self._daemon()
        new = self.pending.pop(args["generation"])
        self.pending.clear()
        daemon.apply(new, worker=True)
        return new.generation

    def abort(self, args: dict[str, Any]) -> None:
        """The reload is off (a bad file, or a worker could not take it): the old config serves on."""
        self.pending.clear()
        daemon = self._daemon()
        daemon.metrics.reloaded(args["result"])
        daemon.holder.reloaded(args["result"], args.get("problems", []))

    def drain(self, args: dict[str, Any]) -> None:
        """Stop as SIGTERM stops a single process; `force`, as a second one does."""
        if self.life.draining and not args.get("force"):
            return
        daemon = self.daemon
        self.life.begin_shutdown(daemon.services if daemon is not None else None)

    def view(self, args: dict[str, Any]) -> Any:
        daemon = self._daemon()
        if daemon.context is None:
            return None
        return views.local_view(args["what"], daemon.context, daemon.holder.current)

    async def refresh_keys(self, args: Any) -> bool:
        daemon = self._daemon()
        keys = daemon.services.keys if daemon.services is not None else None
        return await keys.refresh() if keys is not None else True

    def response_home(self, args: dict[str, Any]) -> str | None:
        daemon = self._daemon()
        if daemon.context is None:
            return None
        return daemon.context.response_homes.get(args["id"], args["key"])

    def _daemon(self) -> Daemon:
        if self.daemon is None:
            raise RuntimeError("not started yet")
        return self.daemon


async def run(index: int, control_fd: int, log: Logger) -> Lifecycle:
    log.tags["worker"] = index
    worker = Worker(index, log)
    peer = Peer(socket.socket(fileno=control_fd), worker.handlers(), on_error=lambda what, exc: log.error(
        "control channel: " + what, error=f"{type(exc).__name__}: {exc}"[:300]))
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        hello = await peer.call("hello", {"pid": os.getpid()}, timeout=HELLO_TIMEOUT)
        count = hello["count"]
        read = ConfigRead(hello["path"], hello["text"], hello["files"])
        worker.adjust = shares(index, count)
        runtime = await trio.to_thread.run_sync(build_runtime, read.path, hello["generation"], None, read,
                                                worker.adjust)
        log.configure(runtime.config.log.level, runtime.config.log.access_log)
        listeners = [Listener(socket.socket(fileno=fd), listen) for listen, fd in hello["listeners"]]
        for listener in listeners:
            listener.socket.setblocking(False)
        holder = RuntimeHolder(runtime)

        db = runtime.config.database
        # its own usage spool, the host's limiter counters (unless Redis keeps them), no host duty
        role = Role(limiter=None if runtime.config.redis.url else WorkerLimiter(peer, runtime.config.limits),
                    host_duties=False)
        if db.url:
            from hxgwd.store import adopted_spool_dirs, worker_spool_dir
            role = attrs.evolve(role, spool_dir=worker_spool_dir(db, index), adopt=adopted_spool_dirs(db, index, count))
        daemon = worker.daemon = Daemon(
            holder, log, announce=SupervisorAnnounce(peer, holder), role=role,
            host=WorkerHost(peer, index, count), accept_burst=SHARED_ACCEPT_BURST,
            accept_balance=ConnectionCounts(hello["connections_fd"], count).of(index))

        gc.collect()    # as cli.cmd_run does: what is built by now lives as long as the process
        gc.freeze()

        async def orphaned() -> None:
            await peer.closed.wait()
            if not worker.life.draining:
                log.error("the supervisor is gone: draining")
                worker.life.begin_shutdown(daemon.services)

        nursery.start_soon(orphaned)
        started = time.monotonic()
        await serve(daemon, life=worker.life, listeners=listeners)
        log.info("worker stopped", seconds=round(time.monotonic() - started, 3))
        nursery.cancel_scope.cancel()
    return worker.life
