"""Usage retention: rows older than `[database] retention_days` are deleted, hourly.

A chunk at a time, with a pause between chunks, so that the usage writer gets SQLite's single
write lock in between and a first prune of a big table never holds it for long. Deleting is
idempotent, so several gateway hosts sharing one PostgreSQL may all prune. A failed prune is
logged and tried again at the next hour; it never touches the request path.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from hxgwd.store import Store, StoreError, StoreUnavailable

if TYPE_CHECKING:
    from hxgwd.logs import Logger

DAY = 86400.0
INTERVAL = 3600.0       # seconds between prunes
FIRST_DELAY = 60.0      # the first prune waits this long after start: not while the gateway warms up
CHUNK = 5000            # rows per DELETE
PAUSE = 0.05            # seconds between chunks


class Pruner:
    def __init__(self, store: Store, log: Logger, days: int, *, timeout: float = 15.0, chunk: int = CHUNK,
                 pause: float = PAUSE) -> None:
        self._store, self._log = store, log
        self.days = days
        self._timeout = timeout   # per chunk: the database's connect + statement timeouts
        self._chunk, self._pause = chunk, pause
        self.pruned = 0           # rows deleted since start
        self.last_error: str | None = None

    def statistics(self) -> dict[str, Any]:
        return {"days": self.days, "pruned": self.pruned, "last_error": self.last_error}

    def configure(self, days: int) -> None:
        """A reload: the new retention applies from the next prune."""
        self.days = days

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(FIRST_DELAY)
        while True:
            await self.prune_once(time.time())
            await trio.sleep(INTERVAL)

    async def prune_once(self, now: float) -> int:
        """Delete what is older than the retention; -> rows deleted. Never raises StoreError."""
        if self.days <= 0:
            return 0
        try:
            deleted = await self.delete_before(now - self.days * DAY)
        except StoreError as exc:
            self.last_error = str(exc)
            self._log.warning("usage retention: prune failed; trying again in an hour", error=str(exc))
            return 0
        if deleted:
            self._log.info("usage rows older than the retention deleted", rows=deleted,
                           retention_days=self.days)
        return deleted

    async def delete_before(self, before: float) -> int:
        """Delete usage rows older than `before` (unix seconds), chunk by chunk; -> rows deleted.
        Raises StoreError (what was deleted before it stays deleted, and counted)."""
        deleted = 0
        while True:
            with trio.move_on_after(self._timeout) as scope:
                n = await self._store.prune_usage(before, self._chunk)
            if scope.cancelled_caught:
                raise StoreUnavailable(f"the database did not answer within {self._timeout:g} s")
            deleted += n
            self.pruned += n
            if n < self._chunk:
                return deleted
            await trio.sleep(self._pause)
