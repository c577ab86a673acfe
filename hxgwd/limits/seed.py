"""Budget counters seeded from the usage store: a restart, or a Redis that lost its data, does not
forget what keys spent in the current day and month.

At start (before the daemon listens) and then every CHECK_INTERVAL, the limiter names the current
budget periods (the day and the month in `[limits] timezone`) it has not counted from their
beginning: in memory, those that began before this process; in Redis, those whose marker key
(`hxgwd:{budgets}:seeded:2026-12-06`, set when they were seeded) is gone, because the period is
new or Redis restarted empty or was flushed. So a check is one MGET, never a query per request.
For each such period, one query sums every key's recorded cost since the period began (in a
worker thread, bounded by connect_timeout + statement_timeout), and the counters are raised to
it: raised, not added to, as the store also holds what the limiter counted since.

Not counted: what the store does not hold yet. Records still in the usage queue or the spool
(the store was down) at start; and when Redis loses its data, admissions in the moment until the
next check count from zero, and those still in flight then are under the store's sum (at most a
CHECK_INTERVAL of them). A seeding that fails (the store down or slow) is logged, the daemon
serves on, and it is tried again, backing off to RETRY_MAX.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import trio

from hxgwd.limits.limiter import Limiter
from hxgwd.limits.reservation import to_nano
from hxgwd.store import Store, StoreError

if TYPE_CHECKING:
    from hxgwd.logs import Logger

CHECK_INTERVAL = 1.0
RETRY_MAX = 60.0
KINDS = ("day", "month")


class BudgetSeeder:
    def __init__(self, limiter: Limiter, store: Store, log: Logger, timeout: float) -> None:
        self.limiter = limiter
        self.store = store
        self.log = log
        self.timeout = timeout          # each query's: connect_timeout + statement_timeout
        self.failing = False
        self.seeded = 0                 # periods seeded
        self._retry = CHECK_INTERVAL

    async def run(self, at_start: bool = True, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """With at_start, the first round runs before started() (the daemon does not listen yet);
        without (the store did not answer at start), it is left to the loop."""
        if at_start:
            await self.round()
        task_status.started()
        while True:
            await trio.sleep(self._retry if self.failing else CHECK_INTERVAL)
            await self.round()

    async def round(self) -> bool:
        """Seed the periods the limiter has not counted whole; -> False if the store failed."""
        now = self.limiter.clock()
        calendar = self.limiter.local.calendar
        for period in await self.limiter.unseeded([calendar.period(kind, now) for kind in KINDS]):
            with trio.move_on_after(self.timeout) as waited:
                try:
                    spend = await self.store.spend_by_key(period.start)
                except StoreError as exc:
                    self._failed(str(exc))
                    return False
            if waited.cancelled_caught:
                self._failed(f"the query took over {self.timeout:g} s")
                return False
            await self.limiter.seed(period, {k: to_nano(usd) for k, usd in spend.items()})
            self.seeded += 1
            self.log.info("limits: budgets seeded from the usage store", period=period.key, keys=len(spend),
                          spent_usd=round(math.fsum(spend.values()), 6))
        self._succeeded()
        return True

    def _failed(self, error: str) -> None:
        if not self.failing:
            self.log.warning("limits: cannot seed budgets from the usage store; counting from what this "
                             "limiter saw until it can", error=error[:300])
        self.failing = True
        self._retry = min(RETRY_MAX, self._retry * 2)

    def _succeeded(self) -> None:
        self.failing = False
        self._retry = CHECK_INTERVAL
