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
    # with a database: the store; the usage sink and key cache where requests are served; the
    # pruner where the host's duties are done (a single process does both)
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
        if self.usage is not None:
            out["usage"] = self.usage.statistics()
        if self.keys is not None:
            out["keys"] = self.keys.statistics()
        if self.pruner is not None:
            out["retention"] = self.pruner.statistics()
        return out


@attrs.frozen
class Role:
    """What a process keeps of the host's services: a single process, everything (the default).
    `limiter`: one made by the caller (a worker's, whose counters its supervisor keeps), else
    opened here. `serving`: requests are served here (usage sink, key cache). `host_duties`: this
    process prunes old usage and seeds the limiter's budgets (with Redis, every server seeds: its
    marker keys make that once per period). `spool_dir` and `adopt`: the usage spool's, when not
    the default."""

    limiter: Limiter | None = None
    serving: bool = True
    host_duties: bool = True
    spool_dir: str | None = None
    adopt: tuple[str, ...] = ()


@asynccontextmanager
async def open_services(rt: Runtime, log: Logger, role: Role = Role()) -> AsyncIterator[Services]:
    cfg = rt.config
    serving, host_duties, spool_dir, adopt = role.serving, role.host_duties, role.spool_dir, role.adopt
    async with _limiter(cfg, log, rt.redis_password, role.limiter) as limiter:
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
            usage = UsageSink(store, cfg.database, log, spool_dir=spool_dir, adopt=adopt) if serving else None
            # the spool's lock first: a start it refuses (exit 73) must not leave a new SQLite file
            if usage is not None:
                await usage.open()
            try:
                await store.ensure_schema()
            except StoreUnavailable as exc:
                answered = False
                log.error("database unreachable at start: usage goes to the spool, store keys wait",
                          database=redact_url(cfg.database.url), error=str(exc))
            timeout = cfg.database.connect_timeout + cfg.database.statement_timeout
            keys = KeyCache(store, log, refresh=cfg.database.key_refresh,
                            load_timeout=cfg.database.connect_timeout) if serving else None
            pruner = Pruner(store, log, cfg.database.retention_days, timeout=timeout) if host_duties else None
            async with trio.open_nursery() as nursery:
                if usage is not None:
                    await nursery.start(usage.run)
                # after the usage writer has started: records it replays at start are counted
                if host_duties or cfg.redis.url:
                    await nursery.start(BudgetSeeder(limiter, store, log, timeout).run, answered)
                if keys is not None:
                    await nursery.start(keys.run)
                if pruner is not None:
                    nursery.start_soon(pruner.run)
                services = Services(limiter, store, usage, keys, pruner)
                try:
                    yield services
                finally:
                    if usage is not None:
                        with services.flush:
                            await usage.aclose(timeout=USAGE_FLUSH_TIMEOUT)
                    nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(5, shield=True):
                await store.aclose()


@asynccontextmanager
async def _limiter(config: m.Config, log: Logger, password: str | None,
                   given: Limiter | None) -> AsyncIterator[Limiter]:
    if given is not None:
        yield given
        return
    async with open_limiter(config, log, password) as limiter:
        yield limiter
