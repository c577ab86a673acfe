"""What the SQLite and PostgreSQL stores share: the async methods, key material, row mapping.

Each engine supplies the SQL as small synchronous functions `fn(conn, ...)`; this class runs them
through `threads.Connections` (worker thread, own limiter, stop-on-cancel) and turns driver
errors into StoreUnavailable / RecordRejected with `_translate`, so callers (the usage sink, the
key cache, the CLI) never import a driver.
"""

from __future__ import annotations

import abc
import hashlib
import secrets
import time
from typing import Any, Callable, TypeVar

from hxgwd.pipeline.record import RequestRecord
from hxgwd.runtime import Principal
from hxgwd.store.base import BY, KeyInfo, Store, StoreError
from hxgwd.store import schema
from hxgwd.store.schema import Row
from hxgwd.store.threads import Connections

T = TypeVar("T")

KEY_PREFIX = "sk-hx-"
SHOWN_PREFIX = 10          # characters of a key kept for display: "sk-hx-" and 4 random ones
KEY_COLUMNS = ("id", "name", "prefix", "models", "admin", "rpm", "tpm", "budget_usd", "budget_period",
               "created_at", "expires_at", "revoked_at", "sha256")


def new_key() -> tuple[str, bytes, str]:
    """-> (key, its SHA-256 digest, its public prefix)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).digest(), key[:SHOWN_PREFIX]


def one(row: Row | None) -> Row:
    """The row of a query that always returns one (an aggregate, INSERT ... RETURNING)."""
    if row is None:
        raise StoreError("the database returned no row where it always returns one")
    return row


def key_info(row: Row) -> KeyInfo:
    doc = dict(zip(KEY_COLUMNS, row))
    doc.pop("sha256")
    doc["models"] = schema.models_tuple(doc["models"])
    return KeyInfo(**doc)


def principal(row: Row) -> Principal:
    info = key_info(row)
    return Principal(info.name, frozenset(info.models) if info.models else None, info.admin, bytes(row[-1]),
                     info.rpm, info.tpm, info.budget_usd, info.budget_period, source="store")


class SQLStore(Store):
    engine = ""
    # how the engine spells: a parameter, a unix-seconds parameter compared with ts, the error
    # count, and each grouping ("day" is a DAY_BUCKET-second bucket number, made a date in Python)
    _PARAM = "?"
    _TS_PARAM = "?"
    _ERRORS = "sum(status >= 400)"
    _GROUP: dict[str, str] = {}

    def __init__(self, conns: Connections) -> None:
        self._conns = conns

    # --- what an engine provides (abstract: an engine missing one fails when it is made) --------

    @abc.abstractmethod
    def _translate(self, exc: Exception) -> Exception:
        """A driver error -> StoreUnavailable or RecordRejected (or exc itself, if a bug)."""

    @abc.abstractmethod
    def _migrate_sync(self, conn: Any) -> tuple[int, int]: ...

    @abc.abstractmethod
    def _version_sync(self, conn: Any) -> int: ...

    @abc.abstractmethod
    def _insert_usage_sync(self, conn: Any, rows: list[Row]) -> int:
        """Insert rows (USAGE_COLUMNS order) in one transaction, a few statements or a COPY, not one per row:
        a worker thread that hands the GIL back around every row's statement waits out the event
        loop thread's switch interval (5 ms) each time it takes it back (1,000 rows: 2.5-4 s under
        load). Idempotent on request_id; -> how many rows were new."""

    @abc.abstractmethod
    def _count_sync(self, conn: Any) -> int: ...

    @abc.abstractmethod
    def _prune_sync(self, conn: Any, before: float, limit: int) -> int:
        """Delete at most `limit` usage rows with ts < before, oldest first; -> rows deleted."""

    @abc.abstractmethod
    def _insert_key_sync(self, conn: Any, name: str, prefix: str, digest: bytes, models: str, admin: bool,
                         rpm: int | None, tpm: int | None, budget_usd: float | None, budget_period: str,
                         created_at: float, expires_at: float | None) -> Row: ...

    @abc.abstractmethod
    def _select_keys_sync(self, conn: Any, where: str, args: tuple[object, ...]) -> list[Row]: ...

    @abc.abstractmethod
    def _revoke_sync(self, conn: Any, name: str) -> Row | None: ...

    @abc.abstractmethod
    def _active_sync(self, conn: Any) -> list[Row]: ...

    # --- the Store interface -------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any, retry_stale: bool = True) -> T:
        try:
            return await self._conns.call(fn, *args, retry_stale=retry_stale)
        except StoreError:
            raise
        except Exception as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    async def migrate(self) -> tuple[int, int]:
        return await self._call(self._migrate_sync)

    async def schema_status(self) -> tuple[int, int]:
        return await self._call(self._version_sync), schema.expected_version(self.engine)

    async def insert_usage(self, records: list[RequestRecord]) -> int:
        if not records:
            return 0
        return await self._call(self._insert_rows_sync, records)

    def _insert_rows_sync(self, conn: Any, records: list[RequestRecord]) -> int:
        # converting 1000 records costs milliseconds of CPU: here, in the worker thread, not on the loop
        return self._insert_usage_sync(conn, [schema.row_values(r) for r in records])

    async def count_usage(self) -> int:
        return await self._call(self._count_sync)

    async def prune_usage(self, before: float, limit: int) -> int:
        return await self._call(self._prune_sync, before, limit)

    async def usage_summary(self, since: float | None = None, until: float | None = None, by: str = "key",
                            key: str | None = None, tz: str = "UTC") -> list[dict[str, Any]]:
        if by not in BY:
            raise ValueError(f"by: one of {', '.join(BY)}")
        rows = await self._call(self._summary_sync, since, until, by, key)
        return schema.summary_rows(by, rows, tz)

    def _summary_sync(self, conn: Any, since: float | None, until: float | None, by: str,
                      key: str | None) -> list[Row]:
        where, args = [], []
        for condition, value in ((f"ts >= {self._TS_PARAM}", since), (f"ts < {self._TS_PARAM}", until),
                                 (f"key = {self._PARAM}", key)):
            if value is not None:
                where.append(condition)
                args.append(value)
        query = (f"SELECT {self._GROUP[by]} AS g, count(*), {self._ERRORS}, sum(prompt_tokens), "
                 "sum(completion_tokens), sum(total_tokens), sum(cost_usd), sum(total_ms) FROM usage"
                 + (" WHERE " + " AND ".join(where) if where else "") + " GROUP BY g")
        rows: list[Row] = conn.execute(query, args).fetchall()
        return rows

    async def spend_by_key(self, since: float) -> dict[str, float]:
        return dict(await self._call(self._spend_sync, since))

    def _spend_sync(self, conn: Any, since: float) -> list[Row]:
        # a range of the ts index (a day or a month of rows); statement_timeout bounds it on PostgreSQL,
        # the caller's cancel (interrupt) on SQLite
        rows: list[Row] = conn.execute(f"SELECT key, coalesce(sum(cost_usd), 0) FROM usage WHERE ts >= "
                                       f"{self._TS_PARAM} AND key IS NOT NULL GROUP BY key", (since,)).fetchall()
        return rows

    async def create_key(self, name: str, *, models: tuple[str, ...] = (), admin: bool = False,
                         rpm: int | None = None, tpm: int | None = None, budget_usd: float | None = None,
                         budget_period: str = "month", expires_at: float | None = None) -> tuple[str, KeyInfo]:
        if not name or not name.strip():
            raise ValueError("a key needs a name")
        if budget_period not in ("day", "month"):
            raise ValueError("budget_period: day or month")
        key, digest, prefix = new_key()
        # not retried on a stale connection: a lost COMMIT ack would make the retry say KeyExists
        row = await self._call(self._insert_key_sync, name, prefix, digest, schema.models_text(tuple(models)),
                               bool(admin), rpm, tpm, budget_usd, budget_period, time.time(), expires_at,
                               retry_stale=False)
        return key, key_info(row)

    async def list_keys(self, include_revoked: bool = False) -> list[KeyInfo]:
        where = "" if include_revoked else "revoked_at IS NULL"
        return [key_info(r) for r in await self._call(self._select_keys_sync, where, ())]

    async def get_key(self, name: str) -> KeyInfo:
        from hxgwd.store.base import KeyNotFound

        rows = await self._call(self._select_keys_sync, "name = {p}", (name,))
        if not rows:
            raise KeyNotFound(f"no key named {name!r}")
        live = [r for r in rows if r[KEY_COLUMNS.index("revoked_at")] is None]
        return key_info(live[0] if live else max(rows, key=lambda r: r[KEY_COLUMNS.index("revoked_at")]))

    async def revoke_key(self, name: str) -> KeyInfo:
        from hxgwd.store.base import KeyNotFound

        row = await self._call(self._revoke_sync, name)
        if row is None:
            raise KeyNotFound(f"no unrevoked key named {name!r}")
        return key_info(row)

    async def active_keys(self) -> list[Principal]:
        return [principal(r) for r in await self._call(self._active_sync)]

    async def aclose(self) -> None:
        await self._conns.aclose()
