"""The store: virtual keys and usage records in SQLite (one host) or PostgreSQL (several hosts).

    open_store(config.database, password) -> Store      sqlite:////abs/path.db | postgresql://user@host/db
    store.migrate() / store.schema_status()              versioned schema, ordered SQL per engine
    store.insert_usage(records)                          idempotent on request_id; used by UsageSink only
    store.create_key / list_keys / get_key / revoke_key / active_keys
    store.usage_summary(since, until, by, key, tz)       for `hxgwd usage` and the admin API
    store.spend_by_key(since)                            seeds the budget counters of the limiter

Both drivers are blocking (stdlib sqlite3; psycopg 3's sync API, because its async API is asyncio
only), so every method runs its SQL in a worker thread (`threads.py`) under a CapacityLimiter of
the store's own, and a trio cancellation really stops the statement: `interrupt()` for SQLite,
`cancel_safe()` for PostgreSQL. Nothing on the request path awaits a store: keys are read from
`keys.KeyCache`, records are handed to `usage.UsageSink`, which spools to disk when the store is
down or slow.

Errors: `StoreUnavailable` (cannot reach or use the database now: retry later; `StoreTimeout`, one
of them, when a statement ran out of statement_timeout), `RecordRejected`
(the database refused these rows: retrying will not help), `SchemaError`, `NoDatabase`,
`KeyExists`, `KeyNotFound`; all are `StoreError`.

This module imports nothing heavy: `hxgwd --version` imports it through the CLI hook. Engines and
drivers are imported by `open_store`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hxgwd.store.base import (
    BY, DEFAULT_STATE_DIR, KeyExists, KeyInfo, KeyNotFound, NoDatabase, RecordRejected,
    SchemaError, Store, StoreError, StoreTimeout, StoreUnavailable, default_spool_dir, iso_time,
    legacy_spool_dir, read_password, worker_spool_dir, adopted_spool_dirs, redact_url, schema_problem, sqlite_path)

if TYPE_CHECKING:
    from hxgwd.config.model import Database

__all__ = ["BY", "DEFAULT_STATE_DIR", "KeyExists", "KeyInfo", "KeyNotFound", "NoDatabase", "RecordRejected",
           "SchemaError", "Store", "StoreError", "StoreTimeout", "StoreUnavailable", "default_spool_dir",
           "iso_time", "legacy_spool_dir", "worker_spool_dir", "adopted_spool_dirs", "read_password", "redact_url", "schema_problem", "sqlite_path",
           "open_store"]


def open_store(database: Database, password: str | None = None, create: bool = True) -> Store:
    """The store for a `[database]` config section. Does no I/O: connections (and the SQLite file
    and its directory) are made on first use. `database.url` must not be empty. With
    create=False, a SQLite file that does not exist is not made: every call raises NoDatabase
    (for the commands that only read or change what is there; PostgreSQL never makes one)."""
    url = database.url
    if url.startswith("sqlite:///"):
        from hxgwd.store.sqlite import SQLiteStore

        return SQLiteStore(sqlite_path(url), database, create=create)
    if url.split("://", 1)[0] in ("postgresql", "postgres"):
        from hxgwd.store.postgres import PostgresStore

        return PostgresStore(url, database, password)
    raise ValueError(f"database.url: not a sqlite:/// or postgresql:// URL: {redact_url(url)}")
