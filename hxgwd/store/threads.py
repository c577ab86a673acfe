"""Blocking database calls from trio: a worker thread each, bounded, and really cancellable.

`Connections.call(fn, *args)` runs `fn(conn, *args)` in a worker thread with a connection of a tiny
pool. Three things matter (measured, see shared/notes/datastores.md §6, §8):

- A CapacityLimiter per store, equal to its connection count, so calls queue in trio (where a
  cancel can reach them) and not inside the driver; and a stuck database cannot use up trio's
  default 40 threads that the rest of the daemon shares.
- `trio.to_thread.run_sync` ignores cancellation by default, and abandoning the thread alone leaves
  the statement running and the connection checked out. So on cancel we abandon the thread *and*
  stop its statement: `interrupt()` (SQLite) or `cancel_safe()` (PostgreSQL). A lock makes sure the
  stop hits the statement of this call, never a later call that reuses the connection. The
  limiter token is only given back when the thread really ends (trio does that), so an abandoned
  thread still counts against the limit.
- A pooled connection may have died while idle (a PostgreSQL restart); a call that fails on one
  is retried once on a fresh connection, if the caller says the call may be repeated.

The pool is our own (a list and a lock) rather than psycopg_pool: we need no background
reconnection, and a fresh connect per failed call recovers the moment the server is back.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

import trio

T = TypeVar("T")
STOP_TIMEOUT = 3.0     # seconds given to interrupt()/cancel_safe() on cancel


class Abandoned(Exception):
    """The trio side gave up on this call before the worker thread began its statement."""


class Engine:
    """What Connections needs to know about a driver."""

    def connect(self) -> Any:
        raise NotImplementedError

    def stop(self, conn: Any) -> None:
        """Stop the statement running on conn, from another thread."""
        raise NotImplementedError

    def reusable(self, conn: Any) -> bool:
        """After a failed call: may conn go back to the pool?"""
        return True

    def current(self, conn: Any) -> bool:
        """Before reuse: does an idle pooled conn still reach the database it was opened on?"""
        return True

    def stale(self, conn: Any, exc: BaseException) -> bool:
        """Did this call fail because an idle pooled connection had died meanwhile?"""
        return False

    def close(self, conn: Any) -> None:
        try:
            conn.close()
        except Exception:
            pass


class _Guard:
    """The connection a worker thread is using right now, so the trio side can stop its statement."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._conn: Any = None
        self.abandoned = False

    def attach(self, conn: Any) -> None:
        with self._lock:
            if self.abandoned:
                raise Abandoned()
            self._conn = conn

    def detach(self) -> None:
        with self._lock:
            self._conn = None

    def stop(self) -> None:
        with self._lock:   # held while stopping: detach (and so reuse of conn) waits for us
            self.abandoned = True
            if self._conn is not None:
                self._engine.stop(self._conn)


class Connections:
    def __init__(self, engine: Engine, size: int) -> None:
        self.engine = engine
        self.limiter = trio.CapacityLimiter(size)
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    async def call(self, fn: Callable[..., T], *args: Any, retry_stale: bool = True) -> T:
        guard = _Guard(self.engine)

        def work() -> T:
            for attempt in (1, 2):
                conn, reused = self._get()
                ok = False
                try:
                    guard.attach(conn)
                    try:
                        result = fn(conn, *args)
                    finally:
                        guard.detach()
                    ok = True
                    return result
                except Exception as exc:
                    if (attempt == 1 and reused and retry_stale and not guard.abandoned
                            and self.engine.stale(conn, exc)):
                        continue
                    raise
                finally:
                    self._put(conn, ok or (not guard.abandoned and self.engine.reusable(conn)))
            raise AssertionError("unreachable")

        try:
            return await trio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=self.limiter)
        except trio.Cancelled:
            # Not on our limiter: it may be full of exactly the stuck calls we want to stop.
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT):
                await trio.to_thread.run_sync(guard.stop, abandon_on_cancel=True)
            raise

    def _get(self) -> tuple[Any, bool]:
        while True:
            with self._lock:
                if not self._idle:
                    break
                conn = self._idle.pop()
            if self.engine.current(conn):
                return conn, True
            self.engine.close(conn)
        return self.engine.connect(), False

    def _put(self, conn: Any, reuse: bool) -> None:
        with self._lock:
            if reuse and not self._closed and len(self._idle) < self.limiter.total_tokens:
                self._idle.append(conn)
                return
        self.engine.close(conn)

    def close(self) -> None:
        """Close the idle connections; those in use are closed when their call ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            self.engine.close(conn)

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.close)
