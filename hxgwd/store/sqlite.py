"""The SQLite store: one file on the local disk, for a single gateway host (the default).

WAL mode and synchronous=NORMAL: readers never block the writer, and a commit costs no fsync
(a power cut may lose the last commits, never corrupt the file). `isolation_level=None`, so we
issue BEGIN IMMEDIATE ourselves for every write: it takes the write lock up front, so a busy
database waits in SQLite's busy handler (busy_timeout) instead of failing a read->write upgrade.

Connections are opened with check_same_thread=False because trio's worker threads are not
pinned; `threads.Connections` hands one connection to one thread at a time. A connection is
stopped with `interrupt()` on cancel; that does not end a wait on the busy handler, which is why
busy_timeout is bounded by database.statement_timeout.

The file and its directory (mode 0750) are created on first use, unless the store was opened
with create=False (the CLI commands that only read or change rows): then a missing file is a
NoDatabase error and nothing is made. The file is 0640 (it holds key hashes and usage). When
root creates it (a CLI command before the daemon ever ran), it is given to the owner of its
directory, so the daemon's user can still open it; SQLite then gives the -wal and -shm files the
same owner.
"""

from __future__ import annotations

import functools
import itertools
import os
import sqlite3
import time
import urllib.parse
from typing import Any

from hxgwd.config.model import Database
from hxgwd.store.base import KeyExists, NoDatabase, RecordRejected, StoreTimeout, StoreUnavailable
from hxgwd.store import schema
from hxgwd.store.schema import Row
from hxgwd.store.sql import KEY_COLUMNS, SQLStore, one
from hxgwd.store.threads import Connections, Engine

POOL_SIZE = 4
_COLUMNS = ", ".join(schema.COLUMN_NAMES)
# a batch goes in as multi-row INSERTs of 256, 128, ... 1 rows (at most 9 statements, each prepared
# once and cached by sqlite3): one sqlite3_step, so one GIL hand-back, per statement. Measured for
# 1,000 rows: 4.4 ms, against 12 ms for one INSERT ... SELECT FROM json_each(?) and 2.5-4 s for
# executemany under load. ON CONFLICT, not OR IGNORE: that would also drop a row that breaks a NOT
# NULL without a word.
MAX_CHUNK = 256            # x 24 columns: 6,144 parameters, under SQLite's limit of 32,766
_ROW = "(" + ", ".join("?" * len(schema.COLUMN_NAMES)) + ")"


@functools.cache
def _insert_sql(rows: int) -> str:
    return f"INSERT INTO usage ({_COLUMNS}) VALUES {', '.join([_ROW] * rows)} ON CONFLICT (request_id) DO NOTHING"


_KEY_SELECT = f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys"


class _SQLite(Engine):
    def __init__(self, path: str, busy_timeout: float, create: bool) -> None:
        self.path, self.busy_timeout, self.create = path, busy_timeout, create
        self._files: dict[int, tuple[int, int]] = {}    # id(conn) -> (st_dev, st_ino) it opened

    def connect(self) -> sqlite3.Connection:
        try:
            if self.create:
                _create_file(self.path)
                target, uri = self.path, False
            elif not os.path.exists(self.path):
                raise NoDatabase(f"no database at {self.path} yet: `hxgwd db migrate`, `hxgwd keys create` "
                                 "or the daemon's first start creates it")
            else:   # mode=rw: should the file go right now, sqlite3 fails instead of making a new one
                target, uri = f"file:{urllib.parse.quote(os.path.abspath(self.path))}?mode=rw", True
            conn = sqlite3.connect(target, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False, uri=uri)
        except OSError as exc:
            raise sqlite3.OperationalError(f"cannot create {self.path}: {exc.strerror}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA journal_size_limit = 67108864")   # truncate a big WAL back to 64 MiB
            st = os.stat(self.path)
        except BaseException:
            conn.close()
            raise
        self._files[id(conn)] = (st.st_dev, st.st_ino)
        return conn

    def current(self, conn: sqlite3.Connection) -> bool:
        # A connection keeps writing to the file it opened even once that file is deleted or
        # replaced, and those rows are gone for good. A new connection to a file without the
        # schema fails its inserts instead, so the records go to the spool (replayed once a
        # restart has migrated the new file).
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return self._files.get(id(conn)) == (st.st_dev, st.st_ino)

    def close(self, conn: sqlite3.Connection) -> None:
        self._files.pop(id(conn), None)
        super().close(conn)

    def stop(self, conn: sqlite3.Connection) -> None:
        conn.interrupt()

    def reusable(self, conn: sqlite3.Connection) -> bool:
        return not conn.in_transaction   # our `with _write(conn)` always ends its transaction


def _create_file(path: str) -> None:
    if os.path.exists(path):
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o750, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        return
    try:
        if os.geteuid() == 0:
            st = os.stat(directory)
            if st.st_uid != 0:
                os.fchown(fd, st.st_uid, st.st_gid)
    finally:
        os.close(fd)


class _write:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error (an interrupt included)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


class SQLiteStore(SQLStore):
    engine = "sqlite"
    _GROUP = {"key": "key", "model": "model", "deployment": "deployment",
              "day": f"CAST(ts / {schema.DAY_BUCKET} AS INTEGER)"}

    def __init__(self, path: str, database: Database, create: bool = True) -> None:
        self.path = path
        self.url_for_display = database.url
        super().__init__(Connections(_SQLite(path, database.statement_timeout, create), POOL_SIZE))

    def _translate(self, exc: Exception) -> Exception:
        if isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, OverflowError,
                            UnicodeError)):   # a value SQLite will not take; ProgrammingError is our bug
            return RecordRejected(f"sqlite: {exc}")
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY:
            # another connection held the lock for all of busy_timeout (= statement_timeout)
            return StoreTimeout(f"sqlite {self.path}: timed out: {exc}")
        if isinstance(exc, (sqlite3.Error, OSError)):
            # I/O error, disk full, no such table, interrupted, not a database
            return StoreUnavailable(f"sqlite {self.path}: {exc}")
        return exc

    def _version_sync(self, conn: sqlite3.Connection) -> int:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone() is None:
            return 0
        return int(one(conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone())[0])

    def _migrate_sync(self, conn: sqlite3.Connection) -> tuple[int, int]:
        with _write(conn):
            conn.execute(schema.SQLITE_VERSION_TABLE)
            before = self._version_sync(conn)
            migrations = schema.MIGRATIONS["sqlite"]
            for version in range(before + 1, len(migrations) + 1):
                description, statements = migrations[version - 1]
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version, applied_at, description) VALUES (?, ?, ?)",
                             (version, time.time(), description))
            return before, max(before, len(migrations))

    def _insert_usage_sync(self, conn: sqlite3.Connection, rows: list[Row]) -> int:
        new = done = 0
        with _write(conn):
            while done < len(rows):
                size = min(MAX_CHUNK, 1 << ((len(rows) - done).bit_length() - 1))
                chunk = rows[done:done + size]
                new += conn.execute(_insert_sql(size), list(itertools.chain.from_iterable(chunk))).rowcount
                done += size
        return new

    def _count_sync(self, conn: sqlite3.Connection) -> int:
        return int(one(conn.execute("SELECT count(*) FROM usage").fetchone())[0])

    def _prune_sync(self, conn: sqlite3.Connection, before: float, limit: int) -> int:
        with _write(conn):
            return conn.execute("DELETE FROM usage WHERE rowid IN "
                                "(SELECT rowid FROM usage WHERE ts < ? ORDER BY ts LIMIT ?)", (before, limit)).rowcount

    def _insert_key_sync(self, conn: sqlite3.Connection, name: str, prefix: str, digest: bytes, models: str,
                         admin: bool, rpm: int | None, tpm: int | None, budget_usd: float | None,
                         budget_period: str, created_at: float, expires_at: float | None) -> Row:
        try:
            with _write(conn):
                cur = conn.execute(
                    "INSERT INTO api_keys (name, prefix, sha256, models, admin, rpm, tpm, budget_usd, "
                    "budget_period, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, prefix, digest, models, int(admin), rpm, tpm, budget_usd, budget_period,
                     created_at, expires_at))
                return one(conn.execute(f"{_KEY_SELECT} WHERE id = ?", (cur.lastrowid,)).fetchone())
        except sqlite3.IntegrityError:
            raise KeyExists(f"a key named {name!r} exists; revoke it first") from None

    def _select_keys_sync(self, conn: sqlite3.Connection, where: str, args: tuple[object, ...]) -> list[Row]:
        sql = _KEY_SELECT + (" WHERE " + where.format(p="?") if where else "") + " ORDER BY name, id"
        return conn.execute(sql, args).fetchall()

    def _revoke_sync(self, conn: sqlite3.Connection, name: str) -> Row | None:
        with _write(conn):
            row = conn.execute(f"{_KEY_SELECT} WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), row[0]))
            revoked: Row | None = conn.execute(f"{_KEY_SELECT} WHERE id = ?", (row[0],)).fetchone()
            return revoked

    def _active_sync(self, conn: sqlite3.Connection) -> list[Row]:
        return conn.execute(f"{_KEY_SELECT} WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)",
                            (time.time(),)).fetchall()
