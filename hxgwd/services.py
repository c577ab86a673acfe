"""What the request path uses besides the config snapshot, opened once at start for the process:
the limiter (memory or Redis), and, when `[database] url` is set, the store with its usage sink,
key cache, and the seeder of the limiter's budgets from recorded usage (limits/seed.py). Their
tasks live in one nursery here; `open_services` closes them in order.

A database that is down at start does not stop the daemon: usage records go to the spool and
store keys wait for the cache's first load, while config keys work. A PostgreSQL schema that is
older than this version does stop it (exit 78): run `hxgwd db migrate` first; SQLite, owned by
this host alone, is migrated in place.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import attrs
import trio

from hxgwd.config import model as m
from hxgwd.limits.limiter import Limiter, open_limiter
from hxgwd.limits.seed import BudgetSeeder
from hxgwd.runtime import Principal, Runtime

if TYPE_CHECKING:                 # the store's modules are imported only when [database] url is set
    from hxgwd.logs import Logger
    from hxgwd.store import Store
    from hxgwd.store.keys import KeyCache
    from hxgwd.store.retention import Pruner
    from hxgwd.store.usage import UsageSink

USAGE_FLUSH_TIMEOUT = 10.0   # at shutdown, after the drain: memory to the store, else to the spool


@attrs.define
class Services:
    limiter: Limiter
    # all four, or none without a database
    store: Store | None = None
    usage: UsageSink | None = None
    keys: KeyCache | None = None
    pruner: Pruner | None = None
    # the flush of usage records at shutdown: shielded from the drain's end, cut by a forced stop
    flush: trio.CancelScope = attrs.field(factory=lambda: trio.CancelScope(shield=True))

    def configure(self, config: m.Config) -> None:
        """A reload: what of the new config applies without a restart."""
        self.limiter.configure(config)
        if self.pruner is not None:
            self.pruner.configure(config.database.retention_days)

    def key_lookups(self, rt: Runtime) -> tuple[Callable[[bytes], Principal | None], ...]:
        return (rt.keys.get, self.keys.lookup) if self.keys is not None else (rt.keys.get,)

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"limits": self.limiter.statistics()}
        if self.usage is not None and self.keys is not None and self.pruner is not None:
            out["usage"] = self.usage.statistics()
            out["keys"] = self.keys.statistics()
            out["retention"] = self.pruner.statistics()
        return out


@asynccontextmanager
async def open_services(rt: Runtime, log: Logger) -> AsyncIterator[Services]:
    cfg = rt.config
    async with open_limiter(cfg, log, rt.redis_password) as limiter:
        if not cfg.database.url:
            yield Services(limiter)
            return
        from hxgwd.store import StoreUnavailable, open_store, redact_url
        from hxgwd.store.keys import KeyCache
        from hxgwd.store.retention import Pruner
        from hxgwd.store.usage import UsageSink

        store = open_store(cfg.database, rt.db_password)
        try:
            answered = True
            usage = UsageSink(store, cfg.database, log)
            # the spool's lock first: a start it refuses (exit 73) must not leave a new SQLite file
            await usage.open()
            try:
                await store.ensure_schema()
            except StoreUnavailable as exc:
                answered = False
                log.error("database unreachable at start: usage goes to the spool, store keys wait",
                          database=redact_url(cfg.database.url), error=str(exc))
            keys = KeyCache(store, log, refresh=cfg.database.key_refresh,
                            load_timeout=cfg.database.connect_timeout)
            pruner = Pruner(store, log, cfg.database.retention_days,
                            timeout=cfg.database.connect_timeout + cfg.database.statement_timeout)
            async with trio.open_nursery() as nursery:
                await nursery.start(usage.run)
                # after the usage writer has started: records it replays at start are counted
                seeder = BudgetSeeder(limiter, store, log, cfg.database.connect_timeout + cfg.database.statement_timeout)
                await nursery.start(seeder.run, answered)
                await nursery.start(keys.run)
                nursery.start_soon(pruner.run)
                services = Services(limiter, store, usage, keys, pruner)
                try:
                    yield services
                finally:
                    with services.flush:
                        await usage.aclose(timeout=USAGE_FLUSH_TIMEOUT)
                    nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(5, shield=True):
                await store.aclose()
