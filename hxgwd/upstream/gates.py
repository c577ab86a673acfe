"""Per-deployment concurrency caps with a bounded, timed wait: backpressure toward the client.

A deployment with `max_concurrency = N` has at most N requests in flight; up to `max_queue` more
wait for a slot, each at most `queue_timeout` seconds. A request that finds the queue full, or
waits too long, is failed over to the next deployment (or gets 503). So when every backend hangs,
what the gateway holds is bounded by config, not by how many clients keep trying.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Iterable

import trio

from hxgwd.errors import Unavailable
from hxgwd.runtime import Deployment


class DeploymentBusy(Unavailable):
    code = "deployment_busy"


class Gate:
    __slots__ = ("limit", "max_queue", "in_use", "waiting", "_sem", "rejected")

    def __init__(self, limit: int, max_queue: int) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.in_use = 0
        self.waiting = 0
        self.rejected = 0
        self._sem = trio.Semaphore(limit)

    @asynccontextmanager
    async def slot(self, timeout: float) -> AsyncIterator[None]:
        try:
            self._sem.acquire_nowait()
        except trio.WouldBlock:
            if self.waiting >= self.max_queue:
                self.rejected += 1
                raise DeploymentBusy("The deployment is at its concurrency limit.", retry_after=1) from None
            self.waiting += 1
            try:
                with trio.move_on_after(timeout) as wait:
                    await self._sem.acquire()
            finally:
                self.waiting -= 1
            if wait.cancelled_caught:
                self.rejected += 1
                raise DeploymentBusy("No slot of the deployment freed up in time.", retry_after=1) from None
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
            self._sem.release()


class Gates:
    """Gates by deployment id; a reload that changes a cap starts a new gate for new requests."""

    def __init__(self) -> None:
        self._gates: dict[tuple[str, int, int], Gate] = {}

    def get(self, dep: Deployment) -> Gate | None:
        """The deployment's gate, or None when it has no cap (the common, free case)."""
        cfg = dep.config
        if cfg.max_concurrency <= 0:
            return None
        key = (dep.id, cfg.max_concurrency, cfg.max_queue)
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = Gate(cfg.max_concurrency, cfg.max_queue)
        return gate

    def statistics(self) -> dict[str, dict[str, int]]:
        return {dep_id: {"limit": g.limit, "in_use": g.in_use, "waiting": g.waiting, "rejected": g.rejected}
                for (dep_id, _, _), g in self._gates.items()}

    def retain(self, deployments: Iterable[Deployment]) -> None:
        live = {(d.id, d.config.max_concurrency, d.config.max_queue) for d in deployments}
        for key, gate in list(self._gates.items()):
            if key not in live and gate.in_use == 0 and gate.waiting == 0:
                del self._gates[key]
