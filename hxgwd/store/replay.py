"""Reading the spool back into the store: the oldest sealed segment first, batch_size lines at a
time, each segment deleted once all its records are in the store (usage.py decides when).

A segment is read as raw lines and decoded one chunk at a time, in a worker thread: the decoding
is CPU work that holds the GIL, and short bursts of it keep the loop's lag low. Lines that do not
parse (a torn write after a power cut) are skipped and counted as corrupt, never retried.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, Callable

import trio

from hxgwd.pipeline.record import RequestRecord
from hxgwd.store.schema import records_from_lines
from hxgwd.store.spool import Spool

if TYPE_CHECKING:
    from hxgwd.logs import Logger


class Replay:
    def __init__(self, spool: Spool, log: Logger, batch_size: int, fsync: bool) -> None:
        self._spool = spool
        self._log = log
        self._batch_size = batch_size
        self._fsync = fsync
        self._lines: list[bytes] = []          # raw lines of the segment being replayed
        self._chunk: list[RequestRecord] = []   # decoded, next to go to the store
        self._path: str | None = None
        self.replayed = 0     # rows the store inserted from the spool
        self.corrupt = 0      # spool lines that did not parse

    def pending(self) -> bool:
        return bool(self._chunk or self._lines or self._spool.replay_waiting())

    async def step(self, store_batch: Callable[[list[RequestRecord]], Awaitable[int | None]]) -> None:
        """Move one chunk to the store with `store_batch` (-> rows inserted, None if it failed)."""
        await trio.lowlevel.checkpoint()   # the write loop calls us in a loop: never spin
        if not self._chunk:
            if not self._lines and not await self._next_segment():
                return
            lines = self._lines[:self._batch_size]
            del self._lines[:self._batch_size]
            records, bad = await trio.to_thread.run_sync(records_from_lines, lines)
            if bad:
                self.corrupt += bad
                self._log.warning("usage spool segment has unreadable lines (a torn write?); skipped",
                                  path=self._path, lines=bad)
            self._chunk = records
        if self._chunk:
            inserted = await store_batch(self._chunk)
            if inserted is None:
                return
            self.replayed += inserted
            self._chunk = []
        if not self._lines and self._path is not None:
            self._spool.remove(self._path)
            self._path = None
            if not self._spool.replay_waiting():
                self._log.info("usage spool replayed into the store", event="spool_replayed", replayed_total=self.replayed)

    async def _next_segment(self) -> bool:
        """Load the oldest sealed segment's lines (sealing the active one if it is the only one
        with records to replay)."""
        paths = self._spool.sealed()
        if not paths and self._spool.replay_waiting():
            await self._spool.seal(self._fsync)
            paths = self._spool.sealed()
        if not paths:
            return False
        path = paths[0]
        try:
            lines = await trio.to_thread.run_sync(self._spool.read, path)
        except OSError as exc:
            self._spool.quarantine(path, exc.strerror or str(exc))
            return False
        if not lines:
            self._spool.remove(path)
            return False
        self._lines, self._path = lines, path
        return True
