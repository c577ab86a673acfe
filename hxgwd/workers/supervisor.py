"""The supervisor: with `[server] workers` above 1, the process systemd and the operator see. It
binds the listeners once (workers inherit them and accept on the same sockets: the kernel queues
connections while a worker restarts, and no worker's death closes a listener), starts the
workers, and speaks for the host:

    supervise()
    ├── signal_loop      SIGHUP -> reload (all workers or none); SIGTERM/SIGINT -> drain; again -> force
    ├── services         the host's limiter counters, budget seeding, usage retention (no serving)
    └── keep_running     one per worker slot: start, watch, log its end, restart with backoff

READY=1 goes to systemd when every worker serves. A reload is read and checked here, once; then
every worker compiles what was read ("prepare") and all switch ("commit"), or none does
("abort"): a bad file is logged once, here. SIGTERM closes the listeners and drains every
worker; each writes its usage records and exits, then the supervisor exits 0 (3 when forced).
A worker that dies is logged with its exit status or signal and restarted after a backoff (0.5 s
doubling to 30 s, back to 0.5 s after a minute of serving); CRASH_LOOP deaths in CRASH_WINDOW
are reported as a crash loop, in the log and systemd's status line. A worker that dies before
the host first served stops the start: the daemon exits with the worker's status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from functools import partial
from typing import Any, Callable

import trio

from hxgwd import sdnotify
from hxgwd.config.load import ConfigError
from hxgwd.http.listen import Listener, bound_addresses, open_listeners
from hxgwd.commandline import EXIT_TEMPFAIL
from hxgwd.lifecycle import RELOAD_TIMEOUT, Reloads, needs_restart, take_signals
from hxgwd.limits.limiter import HostLimiter
from hxgwd.logs import Logger
from hxgwd.runtime import Runtime, RuntimeHolder
from hxgwd.services import USAGE_FLUSH_TIMEOUT, Role, Services, open_services
from hxgwd.workers import limits, views
from hxgwd.workers.balance import GONE, ConnectionCounts
from hxgwd.workers.channel import Peer, PeerGone, RemoteError, answer_all
from hxgwd.workers.slot import Slot, StartFailed, describe_error, describe_exit, worker_command

CALL_TIMEOUT = 5.0
EXIT_MARGIN = 5.0          # past shutdown_grace + the usage flush: a worker still running is killed
CANNOT_START = 127         # the "exit status" of a worker that could not be started (as shells say it)
HEARTBEAT = 2.0            # seconds between pings of a serving worker
STUCK_AFTER = 10.0         # a serving worker that answers no ping this long is killed, and restarted


class Supervisor:
    def __init__(self, runtime: Runtime, log: Logger, config_path: str, count: int) -> None:
        self.holder = RuntimeHolder(runtime)
        self.log = log
        self.config_path = config_path
        self.slots = [Slot(i) for i in range(count)]
        self.limiter = HostLimiter(runtime.config.limits)
        self.started_with = runtime.config
        self.listeners: list[Listener] = []
        self.services: Services | None = None
        self.draining = False
        self.forced = False
        self.ever_ready = False
        self.started_at = time.time()
        self.exit_status = 0               # 3 when forced or a worker had to be killed; 75 after an upgrade
        st = os.stat(sys.executable)
        self.program: tuple[int, int] | None = (st.st_dev, st.st_ino)
        self._stop = trio.Event()            # set when draining: backoff sleeps end
        self.reloads = Reloads(self.reload)
        self._task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
        self._nursery: trio.Nursery | None = None     # for catch-ups
        self.connections, self._connections_fd = ConnectionCounts.create(count)

    # --- the process tree ------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.holder.current.config
        self.listeners = await open_listeners(cfg.server.listen, cfg.server.backlog)
        self._task_status = task_status
        try:
            async with trio.open_nursery() as outer:
                self._nursery = outer
                await outer.start(self._signal_loop)
                async with open_services(self.holder.current, self.log,
                                         Role(limiter=self.limiter, serving=False)) as services:
                    self.services = services
                    async with trio.open_nursery() as workers:
                        for slot in self.slots:
                            workers.start_soon(self._keep_running, slot)
                outer.cancel_scope.cancel()
        finally:
            self._close_listeners()
        self.log.info("stopped", forced=self.forced)

    def summaries(self) -> list[dict[str, Any]]:
        """Each worker as /admin/stats and /status show it, with the connections it holds."""
        return [{**slot.summary(), "connections": self.connections.get(slot.index) if slot.serving else None}
                for slot in self.slots]

    def stopping(self) -> bool:
        """`draining`, read anew after an await (a signal may have set it meanwhile)."""
        return self.draining

    def program_replaced(self) -> bool:
        """The program file is not the one this supervisor runs (a package upgrade replaced it): a
        worker started now would run the new file's code on this process's unpacked libraries.
        The daemon drains and exits 75 instead (EX_TEMPFAIL): systemd restarts it whole."""
        try:
            st = os.stat(sys.executable)
            now = (st.st_dev, st.st_ino)
        except OSError:
            now = None
        if now == self.program:
            return False
        if not self.draining:
            self.log.error("the program file changed (an upgrade?): stopping to be restarted whole",
                           program=sys.executable)
            self.exit_status = EXIT_TEMPFAIL
            self._begin_drain()
        return True

    async def _keep_running(self, slot: Slot) -> None:
        while not self.draining:
            status = await self._run_once(slot)
            if self.stopping():
                return
            cause = describe_exit(status)
            if not self.ever_ready:
                self.log.error("worker failed at start: stopping", worker=slot.index, exit=cause)
                raise StartFailed(slot.index, status if status > 0 else 128 - status)
            if self.program_replaced():
                return
            if status == 0:     # drained by a SIGTERM of its own: an operator recycling it
                slot.last_exit, slot.serving, slot.restarts = cause, False, slot.restarts + 1
                self.log.info("worker stopped on its own: starting a new one", worker=slot.index)
                continue
            wait = slot.died(cause, time.monotonic())
            if slot.looping:
                self.log.error("worker crash loop: restarting with backoff", worker=slot.index, exit=cause,
                               deaths=len(slot.deaths), within_s=round(slot.deaths[-1] - slot.deaths[0], 1),
                               backoff_s=wait)
                sdnotify.notify(f"STATUS=worker {slot.index} is crash-looping ({cause})")
            else:
                self.log.error("worker died: restarting", worker=slot.index, exit=cause, backoff_s=wait)
            with trio.move_on_after(wait):
                await self._stop.wait()

    async def _run_once(self, slot: Slot) -> int:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fds = [child.fileno(), self._connections_fd] + [listener.socket.fileno() for listener in self.listeners]
            env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}   # systemd hears the supervisor
            # a session of its own: a terminal's Ctrl-C reaches the supervisor, which drains the workers
            process = await trio.lowlevel.open_process(
                worker_command(self.config_path, slot.index, child.fileno()), pass_fds=fds, env=env,
                start_new_session=True)
        except OSError as exc:         # no fork (out of processes or memory): a death like any other
            parent.close()
            self.log.error("cannot start a worker", worker=slot.index, error=exc.strerror or str(exc))
            return CANNOT_START
        finally:
            child.close()
        slot.pid, slot.generation, slot.serving_since = process.pid, 0, 0.0
        peer = Peer(parent, self._handlers(slot),
                    on_error=lambda what, exc: self.log.error("control channel: " + what, worker=slot.index,
                                                               error=f"{type(exc).__name__}: {exc}"[:300]))
        slot.peer = peer
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.run)
                nursery.start_soon(self._watch, slot, peer, process)
                if self.draining:      # started while the drain began: it has nothing to serve
                    nursery.start_soon(self._drain_one, slot)
                status = await process.wait()
                with trio.move_on_after(1):
                    await peer.closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            slot.peer, slot.serving = None, False
            self.connections.set(slot.index, GONE)
            if process.returncode is None:     # the supervisor itself is failing: no worker outlives it
                process.kill()
        return status

    async def _watch(self, slot: Slot, peer: Peer, process: trio.Process) -> None:
        """A worker whose loop is stuck (a bug spinning, a blocking call) serves nobody and holds
        its connections: one that answers no ping for STUCK_AFTER seconds is killed, and its
        death restarts it. The drain has its own deadline (_drain_one)."""
        while True:
            await trio.sleep(HEARTBEAT)
            if not slot.serving or self.draining:
                continue
            try:
                await peer.call("ping", None, STUCK_AFTER)
            except trio.TooSlowError:
                if self.stopping():        # it was draining meanwhile: _drain_one has it
                    continue
                self.log.error("worker stuck: no answer to pings, killing it", worker=slot.index, pid=process.pid,
                               waited_s=STUCK_AFTER)
                process.kill()
                return
            except (PeerGone, RemoteError):
                return

    # --- what workers ask ------------------------------------------------------------------------

    def _handlers(self, slot: Slot) -> dict[str, Callable[[Any], Any]]:
        return {"hello": partial(self._hello, slot), "ready": partial(self._ready, slot),
                "stopping": lambda args: None, "gather": self._gather, "keys_changed": self._keys_changed,
                "find_response": self._find_response, **limits.handlers(self.limiter)}

    def _hello(self, slot: Slot, args: dict[str, Any]) -> dict[str, Any]:
        return {"count": len(self.slots), "connections_fd": self._connections_fd, **what_was_read(self.holder.current),
                "listeners": [[listener.listen, listener.socket.fileno()] for listener in self.listeners]}

    def _ready(self, slot: Slot, args: dict[str, Any]) -> None:
        first = not slot.serving
        slot.serving, slot.generation = True, args["generation"]
        if first:
            slot.serving_since = time.monotonic()
            self.log.info("worker serving", worker=slot.index, pid=slot.pid, generation=slot.generation)
        if slot.generation != self.holder.current.generation and not self.reloads.running:
            self._start(self._catch_up, slot)
        if not self.ever_ready and all(s.serving for s in self.slots):
            self.ever_ready = True
            addresses = bound_addresses(self.listeners)
            self.log.info("all workers serving", workers=len(self.slots), addresses=addresses,
                          generation=self.holder.current.generation)
            sdnotify.ready(f"listening on {', '.join(addresses)} with {len(self.slots)} workers")
            self._task_status.started(addresses)
        elif self.ever_ready and first and all(s.serving for s in self.slots):
            sdnotify.notify(f"STATUS=serving generation {self.holder.current.generation} with {len(self.slots)} workers")

    async def _gather(self, args: dict[str, Any]) -> dict[str, Any]:
        what = args["what"]
        serving = [s for s in self.slots if s.serving and s.peer is not None]
        docs = await answer_all([partial(s.peer.call, "view", {"what": what}, CALL_TIMEOUT - 1)  # type: ignore[union-attr]
                                 for s in serving])
        by_index = {s.index: d for s, d in zip(serving, docs)}
        workers = []
        for slot, summary in zip(self.slots, self.summaries()):
            doc = by_index.get(slot.index)
            workers.append({**summary, "doc": None if isinstance(doc, Exception) else doc})
        return {"workers": workers, "host": views.host_view(what, self)}

    async def _keys_changed(self, args: Any) -> None:
        serving = [s for s in self.slots if s.serving and s.peer is not None]
        await answer_all([partial(s.peer.call, "refresh_keys", None, CALL_TIMEOUT * 2)  # type: ignore[union-attr]
                          for s in serving])

    async def _find_response(self, args: dict[str, Any]) -> str | None:
        serving = [s for s in self.slots if s.serving and s.peer is not None]
        found = await answer_all([partial(s.peer.call, "response_home", args, CALL_TIMEOUT - 1)  # type: ignore[union-attr]
                                  for s in serving])
        return next((f for f in found if isinstance(f, str)), None)

    # --- reload ----------------------------------------------------------------------------------

    async def reload(self) -> bool:
        try:
            return await self._reload()
        finally:
            for slot in self.slots:        # a worker that came up during the reload
                if slot.serving and slot.generation != self.holder.current.generation:
                    self._start(self._catch_up, slot)

    async def _reload(self) -> bool:
        old = self.holder.current
        sdnotify.reloading()
        path, generation = self.config_path, old.generation + 1
        try:
            new = await self.reloads.read(path, generation)
        except ConfigError as exc:
            return await self._reload_refused("rejected", exc.problems, old)
        except Exception as exc:
            self.log.exception("reload failed, still serving the previous config", exc)
            return await self._reload_refused("failed", [f"{type(exc).__name__} (see the log)"], old)
        serving = [s for s in self.slots if s.serving and s.peer is not None]
        offer = what_was_read(new)
        answers = await answer_all([partial(s.peer.call, "prepare", offer, RELOAD_TIMEOUT + CALL_TIMEOUT)  # type: ignore[union-attr]
                                    for s in serving])
        problems = [f"worker {s.index}: " + ("; ".join(a["problems"]) if isinstance(a, dict) else describe_error(a))
                    for s, a in zip(serving, answers) if not isinstance(a, dict) or a["problems"]]
        if problems:
            return await self._reload_refused("failed", problems, old)
        for setting in needs_restart(self.started_with, new.config):
            self.log.warning("changed setting takes effect only after a restart", setting=setting)
        self.holder.swap(new)
        self.limiter.configure(new.config)
        if self.services is not None:
            self.services.configure(new.config)
        self.log.configure(new.config.log.level, new.config.log.access_log)
        committed = await answer_all([partial(s.peer.call, "commit", {"generation": generation}, CALL_TIMEOUT)  # type: ignore[union-attr]
                                      for s in serving])
        for slot, result in zip(serving, committed):
            if isinstance(result, int):
                slot.generation = result
            else:     # it died meanwhile: it restarts on the new generation
                self.log.warning("a worker did not confirm the reload", worker=slot.index, error=describe_error(result))
        self.holder.reloaded("ok")
        self.log.info("config reloaded", event="reload", result="ok", generation=generation, config=path,
                      workers=[s.index for s, r in zip(serving, committed) if isinstance(r, int)])
        sdnotify.ready(f"serving generation {generation} with {len(self.slots)} workers")
        return True

    async def _reload_refused(self, result: str, problems: list[str], old: Runtime) -> bool:
        self.log.error("reload " + result + ", every worker still serves the previous config", event="reload",
                       result=result, generation=old.generation, problems=problems)
        self.holder.reloaded(result, problems)
        serving = [s for s in self.slots if s.serving and s.peer is not None]
        await answer_all([partial(s.peer.call, "abort", {"result": result, "problems": problems}, CALL_TIMEOUT)  # type: ignore[union-attr]
                          for s in serving])
        sdnotify.ready(f"serving generation {old.generation} (last reload {result})")
        return False

    def _start(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    async def _catch_up(self, slot: Slot) -> None:
        """A worker that started on an older generation than the host's takes the current one."""
        rt, peer = self.holder.current, slot.peer
        if peer is None or rt.read is None:
            return
        offer = what_was_read(rt)
        try:
            answer = await peer.call("prepare", offer, RELOAD_TIMEOUT + CALL_TIMEOUT)
            if not answer["problems"]:
                slot.generation = await peer.call("commit", {"generation": rt.generation}, CALL_TIMEOUT)
                return
            error = "; ".join(answer["problems"])
        except (PeerGone, RemoteError, trio.TooSlowError) as exc:
            error = describe_error(exc)
        self.log.warning("a worker could not take the current generation", worker=slot.index,
                         generation=rt.generation, error=error[:300])

    # --- stop ------------------------------------------------------------------------------------

    async def _signal_loop(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        def stop(signum: int) -> None:
            self.log.info("shutdown requested" if not self.draining else "forced shutdown",
                          signal=signal.Signals(signum).name)
            if self.draining:
                self.forced = True
            self._begin_drain()

        await take_signals(self.reloads.request, stop, task_status=task_status)

    def _begin_drain(self) -> None:
        sdnotify.stopping()
        self.draining = True
        self._stop.set()
        self._close_listeners()
        for slot in self.slots:
            self._start(self._drain_one, slot)

    async def _drain_one(self, slot: Slot) -> None:
        peer, pid = slot.peer, slot.pid
        if peer is None:
            return
        server = self.holder.current.config.server
        with trio.move_on_after(server.shutdown_grace + USAGE_FLUSH_TIMEOUT + EXIT_MARGIN):
            with contextlib.suppress(PeerGone, RemoteError, trio.TooSlowError):   # the deadline still holds
                await peer.call("drain", {"force": self.forced}, CALL_TIMEOUT)
            await peer.closed.wait()
            return
        if slot.peer is peer and pid is not None:
            self.forced = True
            self.log.error("worker did not stop in time: killed", worker=slot.index, pid=pid)
            with contextlib.suppress(ProcessLookupError):     # it ended meanwhile
                os.kill(pid, signal.SIGKILL)

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            listener.close()


def what_was_read(rt: Runtime) -> dict[str, Any]:
    """A generation as workers compile it: what the supervisor read (runtime.ConfigRead)."""
    assert rt.read is not None, "a supervisor's runtimes are read from its file"
    return {"generation": rt.generation, "path": rt.read.path, "text": rt.read.text, "files": dict(rt.read.files)}
