"""How many connections each worker holds, in memory every process of the host maps (a memfd the
supervisor makes; workers inherit it): a worker writes its own count as connections open and
close, and reads the others' when the listener wakes it (http/listen.py, AcceptBalance). No
locks: each count has one writer, and an 8-byte aligned store is atomic on the machines we run
on; a stale read only delays an accept by BALANCE_DEFER.

The supervisor marks the slot of a worker that is not serving GONE, so that the others do not
defer to it, and reads the counts for /admin/stats.
"""

from __future__ import annotations

import mmap
import os

GONE = 1 << 62          # a slot with no worker: never the one the others defer to


class ConnectionCounts:
    def __init__(self, fd: int, count: int) -> None:
        self.count = count
        self._map = mmap.mmap(fd, 8 * count)
        self._counts = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, count: int) -> tuple[ConnectionCounts, int]:
        """The supervisor's: -> the counts and the descriptor to pass to the workers."""
        fd = os.memfd_create("hxgwd-connections")
        os.ftruncate(fd, 8 * count)
        counts = cls(fd, count)
        for i in range(count):
            counts.set(i, GONE)
        return counts, fd

    def get(self, index: int) -> int:
        return int(self._counts[index])

    def set(self, index: int, value: int) -> None:
        self._counts[index] = value

    def of(self, index: int) -> WorkerConnections:
        return WorkerConnections(self, index)


class WorkerConnections:
    """One worker's side: http.listen.AcceptBalance."""

    def __init__(self, counts: ConnectionCounts, index: int) -> None:
        self._counts = counts._counts
        self._index = index
        self._others = [i for i in range(counts.count) if i != index]
        self._counts[index] = 0

    def opened(self) -> None:
        self._counts[self._index] += 1

    def closed(self) -> None:
        self._counts[self._index] -= 1

    def ahead(self) -> bool:
        """More than the least loaded other worker, by more than 1 and 1/8 of it."""
        counts = self._counts
        mine = counts[self._index]
        least = min((counts[i] for i in self._others), default=GONE)
        return mine > least + max(1, least >> 3)
