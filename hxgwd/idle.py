"""Work for the event loop's quiet moments: a request's bookkeeping once its answer is out.

Serving one client at a time, the loop is busy from a request's head to its answer, and the client's
next request arrives while this one's bookkeeping (the access-log line and the usage record, ~30 µs)
still runs: that bookkeeping sat on the next request's latency. Deferred here, it runs at the next
moment the loop has nothing else to do, typically while a request waits for its upstream. Such a
moment is found with trio's `wait_all_tasks_blocked` (public API, kept in trio.testing), which wakes
its caller only after an I/O poll found nothing to run.

Under load those moments are rare, so the queue is bounded: at `max_pending` the task that defers
runs the lot itself, which costs what running each at once would have. Outside `run()` (before the
daemon serves, after it stopped) work is done at once.
"""

from __future__ import annotations

from typing import Any, Callable

import trio
import trio.testing


class IdleWork:
    def __init__(self, on_error: Callable[[str, BaseException], None], max_pending: int = 128) -> None:
        self._on_error = on_error
        self._max_pending = max_pending
        self._pending: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._wanted = trio.Event()
        self._running = False

    def defer(self, fn: Callable[..., None], *args: Any) -> None:
        """Call fn(*args) at the next quiet moment; it must not raise (errors are only logged)."""
        if not self._running:
            self._call(fn, args)
            return
        self._pending.append((fn, args))
        if len(self._pending) >= self._max_pending:
            self.run_pending()
        elif len(self._pending) == 1:
            self._wanted.set()

    def run_pending(self) -> None:
        pending, self._pending = self._pending, []
        for fn, args in pending:
            self._call(fn, args)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        task_status.started()
        try:
            while True:
                # waiting for idleness only when there is work: with none, an idle waiter would make
                # the loop poll without sleeping, forever
                await self._wanted.wait()
                self._wanted = trio.Event()
                await trio.testing.wait_all_tasks_blocked()
                self.run_pending()
        finally:
            self._running = False
            self.run_pending()

    def _call(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self._on_error("deferred work", exc)
