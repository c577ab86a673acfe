"""The PostgreSQL store, for several gateway hosts sharing one database: psycopg 3, sync API.

psycopg's async API is asyncio-only, so we run its sync API in worker threads (`threads.py`);
`cancel_safe()` stops a statement on trio cancel. Every connection carries
statement_timeout (server-side bound of any statement, the backstop of every cancel),
connect_timeout, TCP keepalives and tcp_user_timeout (a host that vanished mid-query does not
hold a thread for the kernel's 15-minute retransmission limit).

Usage rows go in with one binary COPY per batch into a temporary staging table, then one
INSERT ... SELECT ... ON CONFLICT (request_id) DO NOTHING: COPY is the fast path (measured 2.5x
executemany), and the staging table gives COPY the idempotency it lacks on its own. The staging
table's ts is a float (unix seconds) so the COPY sends plain doubles; to_timestamp() converts in
the server. It is created once per connection, in a statement of its own (inside a batch's
transaction a rollback would take it away), and emptied at every COMMIT. Temporary tables need
session state: behind PgBouncer, use session pooling, not transaction pooling.
COPY's write_row fills a 32 KiB buffer, so the worker thread hands the GIL back per 32 KiB sent, not per
row. (One INSERT ... SELECT FROM jsonb_array_elements(%s) of the batch measured the same: ~6 us
of client and 10-16 us of server CPU per row.)

Durability: "nothing lost" assumes the server's synchronous_commit is not off. With it off, a
server crash forgets commits it already acknowledged (measured in the outage test: 8-16 of 2,000
rows with `pg_ctl -m immediate`); we do not override the server's setting.

Migrations take a transaction-scoped advisory lock, so two hosts running `hxgwd db migrate` at
once apply each version once.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from hxgwd.config.model import Database
from hxgwd.store.base import KeyExists, RecordRejected, StoreTimeout, StoreUnavailable, redact_url
from hxgwd.store import schema
from hxgwd.store.schema import Row
from hxgwd.store.sql import KEY_COLUMNS, SQLStore, one
from hxgwd.store.threads import STOP_TIMEOUT, Connections, Engine

POOL_SIZE = 4
_COPY_TYPES = {"text": "text", "float": "float8", "bool": "bool", "int4": "int4", "int8": "int8"}
_STAGE_TYPES = {"text": "text", "float": "double precision", "bool": "boolean", "int4": "integer", "int8": "bigint"}
_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS usage_in ("
          + ", ".join(f"{c} {_STAGE_TYPES[k]}" for c, _, k in schema.USAGE_COLUMNS)
          + ") ON COMMIT DELETE ROWS")
_COLUMNS = ", ".join(schema.COLUMN_NAMES)
_COPY = f"COPY usage_in ({_COLUMNS}) FROM STDIN (FORMAT BINARY)"
_MERGE = (f"INSERT INTO usage ({_COLUMNS}) SELECT "
          + ", ".join("to_timestamp(ts)" if c == "ts" else c for c in schema.COLUMN_NAMES)
          + " FROM usage_in ON CONFLICT (request_id) DO NOTHING")
_EPOCH = {"created_at", "expires_at", "revoked_at"}
_KEY_SELECT = ("SELECT " + ", ".join(f"extract(epoch FROM {c})::float8" if c in _EPOCH else c for c in KEY_COLUMNS)
               + " FROM api_keys")


class _Postgres(Engine):
    def __init__(self, url: str, database: Database, password: str | None) -> None:
        self.url = url
        statement_ms = int(database.statement_timeout * 1000)
        options = conninfo_to_dict(url).get("options") or ""
        self.kwargs: dict[str, Any] = {
            "autocommit": True,           # transactions are explicit: `with conn.transaction()`
            "connect_timeout": max(1, math.ceil(database.connect_timeout)),
            "application_name": "hxgwd",
            "options": f"{options} -c statement_timeout={statement_ms}".strip(),
            "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
            "tcp_user_timeout": statement_ms + int(database.connect_timeout * 1000),
        }
        if password is not None:
            self.kwargs["password"] = password
        self.staged: weakref.WeakSet[psycopg.Connection[Row]] = weakref.WeakSet()   # connections that have usage_in

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, **self.kwargs)

    def stop(self, conn: psycopg.Connection) -> None:
        try:
            conn.cancel_safe(timeout=STOP_TIMEOUT - 1)
        except Exception:
            pass   # the server-side statement_timeout still bounds it

    def reusable(self, conn: psycopg.Connection) -> bool:
        return not conn.closed and not conn.broken and conn.info.transaction_status == TransactionStatus.IDLE

    def stale(self, conn: psycopg.Connection, exc: BaseException) -> bool:
        return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) and (conn.closed or conn.broken)


class PostgresStore(SQLStore):
    engine = "postgresql"
    _PARAM = "%s"
    _TS_PARAM = "to_timestamp(%s)"
    _ERRORS = "count(*) FILTER (WHERE status >= 400)"
    _GROUP = {"key": "key", "model": "model", "deployment": "deployment",
              "day": f"floor(extract(epoch FROM ts) / {schema.DAY_BUCKET})::bigint"}

    def __init__(self, url: str, database: Database, password: str | None = None) -> None:
        self.url_for_display = redact_url(url)
        self._pg = _Postgres(url, database, password)
        super().__init__(Connections(self._pg, POOL_SIZE))

    def _translate(self, exc: Exception) -> Exception:
        if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError, UnicodeError, OverflowError)):
            return RecordRejected(f"postgresql: {exc}")
        if isinstance(exc, errors.UndefinedTable):   # down at start, back without the schema
            return StoreUnavailable(f"postgresql {self.url_for_display}: the schema is missing; "
                                    f"run `hxgwd db migrate` ({str(exc).strip()})")
        if isinstance(exc, (errors.QueryCanceled, errors.LockNotAvailable)) and "timeout" in str(exc):
            # "canceling statement due to statement timeout" (or lock_timeout, if the server sets one)
            return StoreTimeout(f"postgresql {self.url_for_display}: timed out: {str(exc).strip()}")
        if isinstance(exc, psycopg.Error):
            # down, refused, connect timed out, cancelled, read-only
            return StoreUnavailable(f"postgresql {self.url_for_display}: {str(exc).strip()}")
        return exc

    def _version_sync(self, conn: psycopg.Connection) -> int:
        if one(conn.execute("SELECT to_regclass('schema_version')").fetchone())[0] is None:
            return 0
        return int(one(conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone())[0])

    def _migrate_sync(self, conn: psycopg.Connection) -> tuple[int, int]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (schema.SCHEMA_LOCK,))
            conn.execute(schema.POSTGRES_VERSION_TABLE)
            before = self._version_sync(conn)
            migrations = schema.MIGRATIONS["postgresql"]
            for version in range(before + 1, len(migrations) + 1):
                description, statements = migrations[version - 1]
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version, description) VALUES (%s, %s)",
                             (version, description))
            return before, max(before, len(migrations))

    def _insert_usage_sync(self, conn: psycopg.Connection, rows: list[Row]) -> int:
        if conn not in self._pg.staged:
            # in its own (autocommit) statement: created inside the batch's transaction, a rollback
            # (a timeout, a cancel) would drop the table while we still believed it there
            conn.execute(_STAGE)
            self._pg.staged.add(conn)
        try:
            with conn.transaction():
                with conn.cursor() as cur:
                    with cur.copy(_COPY) as copy:
                        copy.set_types([_COPY_TYPES[k] for _, _, k in schema.USAGE_COLUMNS])
                        for row in rows:
                            copy.write_row(row)
                    cur.execute(_MERGE)
                    return cur.rowcount
        except errors.UndefinedTable:
            self._pg.staged.discard(conn)   # DISCARD TEMP, or a pooler gave us another session
            raise

    def _count_sync(self, conn: psycopg.Connection) -> int:
        return int(one(conn.execute("SELECT count(*) FROM usage").fetchone())[0])

    def _prune_sync(self, conn: psycopg.Connection, before: float, limit: int) -> int:
        return conn.execute("DELETE FROM usage WHERE request_id IN (SELECT request_id FROM usage "
                            "WHERE ts < to_timestamp(%s) ORDER BY ts LIMIT %s)", (before, limit)).rowcount

    def _insert_key_sync(self, conn: psycopg.Connection, name: str, prefix: str, digest: bytes, models: str,
                         admin: bool, rpm: int | None, tpm: int | None, budget_usd: float | None,
                         budget_period: str, created_at: float, expires_at: float | None) -> Row:
        try:
            with conn.transaction():
                key_id = one(conn.execute(
                    "INSERT INTO api_keys (name, prefix, sha256, models, admin, rpm, tpm, budget_usd, "
                    "budget_period, created_at, expires_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s), to_timestamp(%s)) RETURNING id",
                    (name, prefix, digest, models, admin, rpm, tpm, budget_usd, budget_period, created_at,
                     expires_at)).fetchone())[0]
                return one(conn.execute(f"{_KEY_SELECT} WHERE id = %s", (key_id,)).fetchone())
        except errors.UniqueViolation:
            raise KeyExists(f"a key named {name!r} exists; revoke it first") from None

    def _select_keys_sync(self, conn: psycopg.Connection, where: str, args: tuple[object, ...]) -> list[Row]:
        query = _KEY_SELECT + (" WHERE " + where.format(p="%s") if where else "") + " ORDER BY name, id"
        return conn.execute(sql.SQL(query), args).fetchall()

    def _revoke_sync(self, conn: psycopg.Connection, name: str) -> Row | None:
        with conn.transaction():
            row = conn.execute("UPDATE api_keys SET revoked_at = now() WHERE name = %s AND revoked_at IS NULL "
                               "RETURNING id", (name,)).fetchone()
            if row is None:
                return None
            return conn.execute(f"{_KEY_SELECT} WHERE id = %s", (row[0],)).fetchone()

    def _active_sync(self, conn: psycopg.Connection) -> list[Row]:
        return conn.execute(f"{_KEY_SELECT} WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
                            ).fetchall()
