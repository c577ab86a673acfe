"""Keys from the store on the hot path: a dict, refreshed in the background.

`KeyCache.lookup(digest)` is one dict lookup (a store round trip measured ~180 us per key, a dict
~3 us: shared/notes/datastores.md §2). `run()` re-reads every active key every `refresh` seconds
(database.key_refresh) and swaps in a new dict in one assignment, so a key revoked on any host
stops working on every host within `refresh` plus one query. Whole-table reads stay cheap at the
key counts a gateway has (thousands) and need no invalidation protocol.

While the store is unreachable the last good table stays in use (a revocation made meanwhile
waits for the store to come back); keys from the config file are looked up elsewhere and always
work. A store that is down at start does not stop the daemon from starting: `run()` reports
started with an empty table after one bounded attempt, and keeps trying.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from hxgwd.runtime import Principal
from hxgwd.store import Store

if TYPE_CHECKING:
    from hxgwd.logs import Logger


class KeyCache:
    def __init__(self, store: Store, log: Logger, refresh: float = 5.0, load_timeout: float = 5.0) -> None:
        self._store = store
        self._log = log
        self.refresh_interval = refresh
        self.load_timeout = load_timeout   # one read of the table; the first one delays start by at most this
        self._table: dict[bytes, Principal] = {}
        self.loaded_at: float | None = None   # unix time of the last good read
        self.failures = 0                     # consecutive failed reads
        self.last_error: str | None = None

    def lookup(self, digest: bytes) -> Principal | None:
        return self._table.get(digest)

    def __len__(self) -> int:
        return len(self._table)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.refresh()
        task_status.started()
        while True:
            await trio.sleep(self.refresh_interval)
            await self.refresh()

    async def refresh(self) -> bool:
        """Read the active keys now (the admin API may call this after a revoke, to apply it on
        this host at once). False if the store could not be read; the old table stays."""
        error = None
        with trio.move_on_after(self.load_timeout):
            try:
                principals = await self._store.active_keys()
            except Exception as exc:   # StoreUnavailable, or a bug: neither may stop the daemon
                error = str(exc) or type(exc).__name__
            else:
                self._swap(principals)
                return True
        self._failed(error or f"no answer within {self.load_timeout:.1f} s")
        return False

    def _swap(self, principals: list[Principal]) -> None:
        table = {p.digest: p for p in principals}
        old = self._table
        if self.failures:
            self._log.info("key store readable again", event="key_store_back", keys=len(table), failed_reads=self.failures)
        elif self.loaded_at is None or table.keys() != old.keys():
            added = sorted(p.key_name for d, p in table.items() if d not in old)
            removed = sorted(p.key_name for d, p in old.items() if d not in table)
            self._log.info("store keys loaded" if self.loaded_at is None else "store keys changed",
                           keys=len(table), added=added[:20], removed=removed[:20])
        self._table = table
        self.loaded_at = time.time()
        self.failures = 0
        self.last_error = None

    def _failed(self, error: str) -> None:
        self.failures += 1
        self.last_error = error
        if self.failures == 1:
            self._log.warning("cannot read keys from the store; using the last keys read", event="key_store_lost",
                              error=error, keys=len(self._table), loaded_at=self.loaded_at)

    def statistics(self) -> dict[str, Any]:
        return {"keys": len(self._table), "loaded_at": self.loaded_at, "failures": self.failures,
                "last_error": self.last_error}
