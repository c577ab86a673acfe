"""The store's base: its errors, `KeyInfo`, the `Store` interface and the helpers every engine
shares. Imports nothing of hxgwd at run time: the engines (sqlite.py, postgres.py, sql.py) import
it, and the package's `open_store` imports them.
"""

from __future__ import annotations

import abc
import os
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from hxgwd.config.model import Database
    from hxgwd.pipeline.record import RequestRecord
    from hxgwd.runtime import Principal

BY = ("key", "model", "deployment", "day")    # usage_summary groupings
DEFAULT_STATE_DIR = "/var/lib/hxgwd"


class StoreError(Exception):
    pass


class StoreUnavailable(StoreError):
    """The database cannot be reached or used right now (down, timed out, locked, schema missing)."""


class StoreTimeout(StoreUnavailable):
    """A statement ran out of `[database] statement_timeout`: the database answers, but this
    query waited too long (a lock held elsewhere, a slow plan). Retry later, like any
    StoreUnavailable; a caller that answers someone says "timed out", not "unreachable"."""


class RecordRejected(StoreError):
    """The database refused the rows themselves; the same rows will be refused again."""


class SchemaError(StoreError):
    """The schema is not at the version this hxgwd expects."""


class NoDatabase(StoreError):
    """The SQLite file does not exist, and this store was opened not to create it."""


class KeyExists(StoreError):
    pass


class KeyNotFound(StoreError):
    pass


class KeyInfo:
    """A stored key as operators see it: never the key, only its public prefix (first 10 chars).

    Times are unix seconds (None: never). A plain class, not attrs: this module stays import-light.
    """

    __slots__ = ("id", "name", "prefix", "models", "admin", "rpm", "tpm", "budget_usd", "budget_period",
                 "created_at", "expires_at", "revoked_at")

    def __init__(self, *, id: int, name: str, prefix: str, models: tuple[str, ...] = (), admin: bool = False,
                 rpm: int | None = None, tpm: int | None = None, budget_usd: float | None = None,
                 budget_period: str = "month", created_at: float = 0.0, expires_at: float | None = None,
                 revoked_at: float | None = None) -> None:
        self.id, self.name, self.prefix, self.models, self.admin = id, name, prefix, tuple(models), bool(admin)
        self.rpm, self.tpm, self.budget_usd, self.budget_period = rpm, tpm, budget_usd, budget_period
        self.created_at, self.expires_at, self.revoked_at = created_at, expires_at, revoked_at

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def as_dict(self, now: float) -> dict[str, Any]:
        """JSON-ready, times as ISO 8601 UTC: for `--json` and the admin API."""
        doc: dict[str, Any] = {name: getattr(self, name) for name in self.__slots__}
        doc["models"] = list(self.models)
        for name in ("created_at", "expires_at", "revoked_at"):
            doc[name] = iso_time(doc[name])
        doc["status"] = self.status(now)
        return doc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyInfo) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self) -> str:
        return f"KeyInfo(name={self.name!r}, prefix={self.prefix!r}, revoked_at={self.revoked_at!r})"


class Store(abc.ABC):
    """One database. Every method is async and runs its SQL in a worker thread, cancellably."""

    engine: str          # "sqlite" or "postgresql"
    url_for_display: str  # the URL without a password, for logs and messages

    @abc.abstractmethod
    async def migrate(self) -> tuple[int, int]:
        """Apply pending migrations, concurrency-safe across processes; -> (from_version, to_version)."""

    @abc.abstractmethod
    async def schema_status(self) -> tuple[int, int]:
        """(current, expected) schema versions; current is 0 for an empty database."""

    async def ensure_schema(self) -> None:
        """At daemon start: SQLite is migrated (it is ours alone); a shared PostgreSQL is only
        checked, never migrated by surprise. Raises SchemaError (or StoreUnavailable)."""
        if self.engine == "sqlite":
            await self.migrate()
            return
        current, expected = await self.schema_status()
        if current != expected:
            raise SchemaError(schema_problem(current, expected))

    @abc.abstractmethod
    async def insert_usage(self, records: list[RequestRecord]) -> int:
        """Insert RequestRecords in one transaction; a request_id already stored is skipped.
        -> rows actually inserted. Raises StoreUnavailable or RecordRejected."""

    @abc.abstractmethod
    async def count_usage(self) -> int: ...

    @abc.abstractmethod
    async def prune_usage(self, before: float, limit: int) -> int:
        """Delete at most `limit` usage rows older than `before` (unix seconds); -> rows deleted."""

    @abc.abstractmethod
    async def usage_summary(self, since: float | None = None, until: float | None = None, by: str = "key",
                            key: str | None = None, tz: str = "UTC") -> list[dict[str, Any]]:
        """Usage in [since, until) (unix seconds; None: unbounded) grouped by one of BY, optionally for
        one key. One dict per group: {by: value, "requests", "errors", "prompt_tokens",
        "completion_tokens", "total_tokens", "cost_usd", "avg_ms"}; day is a date "YYYY-MM-DD" in
        the time zone `tz` (the gateway passes [limits] timezone, the one budgets reset in).
        Sorted by day for by="day", else by cost then requests, largest first."""

    @abc.abstractmethod
    async def spend_by_key(self, since: float) -> dict[str, float]:
        """USD each key spent in usage recorded from `since` (unix seconds) on: what budget
        counters start from at daemon start, or when Redis lost them. Keys with no records are
        absent."""

    @abc.abstractmethod
    async def create_key(self, name: str, *, models: tuple[str, ...] = (), admin: bool = False,
                         rpm: int | None = None, tpm: int | None = None, budget_usd: float | None = None,
                         budget_period: str = "month", expires_at: float | None = None) -> tuple[str, KeyInfo]:
        """Make a new key: -> (the key itself, shown once and never stored, its KeyInfo).
        Raises KeyExists if an unrevoked key has this name."""

    @abc.abstractmethod
    async def list_keys(self, include_revoked: bool = False) -> list[KeyInfo]: ...

    @abc.abstractmethod
    async def get_key(self, name: str) -> KeyInfo:
        """The unrevoked key of this name, else the most recently revoked one; KeyNotFound."""

    @abc.abstractmethod
    async def revoke_key(self, name: str) -> KeyInfo:
        """Revoke the unrevoked key of this name; KeyNotFound if there is none."""

    @abc.abstractmethod
    async def active_keys(self) -> list[Principal]:
        """Principals (source="store") of keys neither revoked nor expired, expiry compared now."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close idle connections; calls still running close theirs when they end."""

    async def close(self) -> None:
        await self.aclose()


def sqlite_path(url: str) -> str:
    """sqlite:////abs/path.db -> /abs/path.db; sqlite:///rel.db -> rel.db (relative to the working
    directory), as in SQLAlchemy URLs."""
    return url[len("sqlite:///"):]


def default_spool_dir(database: Database) -> str:
    """<the SQLite file>-spool (/var/lib/hxgwd/hxgwd.db-spool, beside SQLite's own -wal and -shm:
    two databases in one directory get a spool each), or /var/lib/hxgwd/spool for PostgreSQL."""
    if database.spool_dir:
        return database.spool_dir
    if database.url.startswith("sqlite:///"):
        return os.path.abspath(sqlite_path(database.url)) + "-spool"
    return os.path.join(DEFAULT_STATE_DIR, "spool")


def legacy_spool_dir(database: Database) -> str | None:
    """Where hxgwd before 14 put a SQLite file's spool by default (<its directory>/spool): its
    segments are taken over at start, so an upgrade strands no record there."""
    if database.spool_dir or not database.url.startswith("sqlite:///"):
        return None
    return os.path.join(os.path.dirname(os.path.abspath(sqlite_path(database.url))), "spool")


def worker_spool_dir(database: Database, index: int) -> str:
    """Worker `index`'s spool, beside the single process's: each journals its own records."""
    return os.path.join(default_spool_dir(database), f"worker-{index}")


def adopted_spool_dirs(database: Database, index: int | None = None, count: int = 1) -> tuple[str, ...]:
    """The spools no process uses any more whose segments a process takes over at start, so that
    a change of [server] workers strands no record: a single process (index None) takes every
    worker's and the pre-14 one; worker 0 the single process's; worker i those of workers i + k *
    count that no longer exist. A directory still locked by a live process is left alone."""
    base = default_spool_dir(database)
    if index is None:
        legacy = legacy_spool_dir(database)
        found = sorted(os.listdir(base)) if os.path.isdir(base) else []
        return (*([legacy] if legacy else []),
                *(os.path.join(base, n) for n in found if n.startswith("worker-") and n[7:].isdigit()))
    found = sorted(os.listdir(base)) if os.path.isdir(base) else []
    gone = [os.path.join(base, n) for n in found if n.startswith("worker-") and n[7:].isdigit()
            and int(n[7:]) >= count and int(n[7:]) % count == index]
    return ((base,) if index == 0 else ()) + tuple(gone)


def read_password(database: Database, environ: Mapping[str, str] | None = None) -> str | None:
    """The PostgreSQL password from password_env or password_file; None if neither is set.
    Raises StoreError naming what is missing (never the password)."""
    env = os.environ if environ is None else environ
    if database.password_env:
        value = env.get(database.password_env)
        if not value:
            raise StoreError(f"database.password_env: environment variable {database.password_env} is not set")
        return value
    if database.password_file:
        try:
            with open(database.password_file, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            raise StoreError(f"database.password_file: cannot read {database.password_file}: {exc.strerror}") from None
        if not value:
            raise StoreError(f"database.password_file: {database.password_file} is empty")
        return value
    return None


def redact_url(url: str, mask: str = "***") -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db; a password in the
    query string (libpq takes `?password=`) masked too: the store's errors quote the URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostpart = netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":" + mask
    path, question, query = path.partition("?")
    if question:
        params = [p.partition("=") for p in query.split("&")]
        query = "&".join(f"{k}={mask}" if eq and "pass" in k.lower() else f"{k}{eq}{v}" for k, eq, v in params)
    return f"{scheme}://{userinfo}{at}{hostpart}{slash}{path}{question}{query}"


def schema_problem(current: int, expected: int) -> str:
    if current < expected:
        return (f"the database schema is at version {current}, this hxgwd needs {expected}: "
                "run `hxgwd db migrate`")
    return (f"the database schema is at version {current}, newer than this hxgwd knows ({expected}): "
            "upgrade hxgwd on this host")


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
