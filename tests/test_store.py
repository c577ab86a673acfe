"""The store on real databases: SQLite files in tmp dirs and fresh PostgreSQL databases.

Migrations (idempotent, concurrent, never by surprise on PostgreSQL), idempotent usage inserts,
keys, summaries, and that a cancelled call really stops its statement.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time

import pytest
import trio

from hxgwd.store import (KeyExists, KeyNotFound, RecordRejected, SchemaError, StoreTimeout, StoreUnavailable,
                         default_spool_dir, legacy_spool_dir, open_store, redact_url, sqlite_path)
from hxgwd.store.schema import expected_version
from hxgwd.store.sql import new_key
from tests.servers import free_port
from tests.test_store_support import (database, make_record, new_pg_url, sqlite_url, store,  # noqa: F401
                                      store_url)


def test_sqlite_urls_and_spool_dir():
    assert sqlite_path("sqlite:////var/lib/hxgwd/hxgwd.db") == "/var/lib/hxgwd/hxgwd.db"
    assert sqlite_path("sqlite:///data/hxgwd.db") == "data/hxgwd.db"
    assert default_spool_dir(database("sqlite:////srv/gw/hx.db")) == "/srv/gw/hx.db-spool"   # one per database
    assert legacy_spool_dir(database("sqlite:////srv/gw/hx.db")) == "/srv/gw/spool"        # taken over at start
    assert legacy_spool_dir(database("sqlite:////srv/gw/hx.db", spool_dir="/x")) is None
    assert default_spool_dir(database("postgresql://gw@db/hx")) == "/var/lib/hxgwd/spool"
    assert default_spool_dir(database("postgresql://gw@db/hx", spool_dir="/x")) == "/x"
    assert redact_url("postgresql://gw:s3cret@db:5432/hx") == "postgresql://gw:***@db:5432/hx"


async def test_sqlite_file_created_on_first_use(tmp_path):
    s = open_store(database(sqlite_url(tmp_path)))
    path = tmp_path / "state" / "hxgwd.db"
    assert not path.parent.exists()        # open_store does no I/O
    await s.ensure_schema()                # SQLite: the daemon may migrate at start
    await s.aclose()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_migrations_idempotent_with_status(store_url):
    s = open_store(database(store_url))
    try:
        n = expected_version(s.engine)
        assert await s.schema_status() == (0, n)
        assert await s.migrate() == (0, n)
        assert await s.migrate() == (n, n)
        assert await s.schema_status() == (n, n)
        await s.ensure_schema()
    finally:
        await s.aclose()


async def test_postgres_daemon_checks_but_never_migrates(new_pg_url):
    url = new_pg_url()
    s = open_store(database(url))
    try:
        with pytest.raises(SchemaError, match="hxgwd db migrate"):
            await s.ensure_schema()
        n = expected_version(s.engine)
        assert await s.schema_status() == (0, n)
        # a database that was down at start and came back without the schema: say what to do
        with pytest.raises(StoreUnavailable, match="run `hxgwd db migrate`"):
            await s.insert_usage([make_record(1)])
        # two hosts migrating at once: each version is applied once
        results = []
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                other = open_store(database(url))

                async def migrate(other=other):
                    results.append(await other.migrate())
                    await other.aclose()

                nursery.start_soon(migrate)
        assert sorted(results) == [(0, n), (n, n), (n, n)]
        await s.ensure_schema()
    finally:
        await s.aclose()


async def test_insert_usage_is_idempotent_on_request_id(store):
    assert await store.insert_usage([make_record(i) for i in range(100)]) == 100
    assert await store.insert_usage([make_record(i) for i in range(50, 150)]) == 50
    assert await store.insert_usage([make_record(7), make_record(7), make_record(200), make_record(200)]) == 1
    assert await store.insert_usage([]) == 0
    assert await store.count_usage() == 151


async def test_hostile_strings_and_numbers_are_stored(store):
    rec = make_record(1, model="nul\x00 surrogate\ud800 " + "x" * 5000, prompt_tokens=2 ** 70, status=2 ** 40)
    assert await store.insert_usage([rec]) == 1
    [row] = await store.usage_summary(by="model")
    assert row["model"].startswith("nul\ufffd surrogate? ") and len(row["model"]) == 512
    assert row["prompt_tokens"] == 2 ** 63 - 1


async def test_a_big_batch_with_duplicates_is_stored_once(store):
    assert await store.insert_usage([make_record(i) for i in range(300)]) == 300
    batch = [make_record(i) for i in range(200, 977)] + [make_record(5), make_record(1000), make_record(1000)]
    assert await store.insert_usage(batch) == 977 - 300 + 1
    assert await store.count_usage() == 978


async def test_prune_deletes_the_oldest_rows_up_to_a_limit(store):
    await store.insert_usage([make_record(i, ts=1000.0 + i) for i in range(10)])
    assert await store.prune_usage(1005.0, 3) == 3          # 1000-1002
    assert await store.prune_usage(1005.0, 3) == 2          # 1003-1004: the rest are newer
    assert await store.prune_usage(1005.0, 3) == 0
    assert [r["requests"] for r in await store.usage_summary(by="model")] == [5]


async def test_pruner_deletes_past_the_retention_chunk_by_chunk(store):
    from hxgwd.store.retention import DAY, Pruner
    from tests.test_store_support import ListLog

    now = 1_790_000_000.0
    await store.insert_usage([make_record(i, prefix="old", ts=now - 40 * DAY + i) for i in range(12)]
                             + [make_record(i, prefix="new", ts=now - 20 * DAY) for i in range(3)])
    log = ListLog()
    pruner = Pruner(store, log, days=0, chunk=5, pause=0)
    assert await pruner.prune_once(now) == 0                    # 0 days: keep everything
    pruner.configure(30)                                        # a reload
    assert await pruner.prune_once(now) == 12 and pruner.pruned == 12
    assert await store.count_usage() == 3
    assert [line[1] for line in log.lines] == ["usage rows older than the retention deleted"]


async def test_a_failed_prune_is_logged_and_kept_for_the_next_hour():
    from hxgwd.store.retention import Pruner
    from tests.test_store_support import ListLog

    class Down:
        async def prune_usage(self, before: float, limit: int) -> int:
            raise StoreUnavailable("test: the database is down")

    log = ListLog()
    pruner = Pruner(Down(), log, days=7)
    assert await pruner.prune_once(1_790_000_000.0) == 0
    assert pruner.last_error == "test: the database is down" and log.lines[0][0] == "warning"


async def test_a_prune_that_hangs_is_given_up_at_its_timeout(autojump_clock):
    from hxgwd.store.retention import Pruner
    from tests.test_store_support import ListLog

    class Hanging:
        async def prune_usage(self, before: float, limit: int) -> int:
            await trio.sleep_forever()

    pruner = Pruner(Hanging(), ListLog(), days=7, timeout=15)
    start = trio.current_time()
    assert await pruner.prune_once(1_790_000_000.0) == 0
    assert trio.current_time() - start == pytest.approx(15)
    assert "did not answer within 15 s" in pruner.last_error


async def test_non_finite_numbers_are_stored_as_null(store):
    assert await store.insert_usage([make_record(1, cost_usd=float("nan"), ttfb_ms=float("inf")),
                                     make_record(2, cost_usd=0.5)]) == 2
    [row] = await store.usage_summary(by="model")
    assert row["requests"] == 2 and row["cost_usd"] == 0.5


async def test_a_row_breaking_a_constraint_is_rejected_not_dropped(store):
    with pytest.raises(RecordRejected):
        await store.insert_usage([make_record(1), make_record(2, total_ms=float("nan"))])   # NOT NULL
    assert await store.count_usage() == 0                                                # all or nothing


async def test_keys_lifecycle(store):
    key, info = await store.create_key("team-a", models=("m1", "g1"), rpm=60, tpm=1000, budget_usd=5.0,
                                       budget_period="day")
    assert key.startswith("sk-hx-") and len(key) > 40
    assert info.prefix == key[:10] and info.name == "team-a" and info.revoked_at is None
    with pytest.raises(KeyExists):
        await store.create_key("team-a")
    [p] = await store.active_keys()
    import hashlib

    assert p.digest == hashlib.sha256(key.encode()).digest()
    assert (p.key_name, p.allowed, p.rpm, p.tpm, p.budget_usd, p.budget_period, p.source, p.admin) == \
        ("team-a", frozenset({"m1", "g1"}), 60, 1000, 5.0, "day", "store", False)
    assert (await store.get_key("team-a")).models == ("m1", "g1")

    revoked = await store.revoke_key("team-a")
    assert revoked.revoked_at is not None
    assert await store.active_keys() == []
    with pytest.raises(KeyNotFound):
        await store.revoke_key("team-a")
    with pytest.raises(KeyNotFound):
        await store.get_key("nobody")
    assert (await store.get_key("team-a")).status(time.time()) == "revoked"

    # the name is free again; the revoked row stays for the record
    key2, _ = await store.create_key("team-a", admin=True)
    assert key2 != key
    assert [k.name for k in await store.list_keys()] == ["team-a"]
    assert len(await store.list_keys(include_revoked=True)) == 2
    [p2] = await store.active_keys()
    assert p2.admin and p2.allowed is None

    # expiry is compared when keys are read
    await store.create_key("gone", expires_at=time.time() - 1)
    await store.create_key("soon", expires_at=time.time() + 0.5)
    assert {p.key_name for p in await store.active_keys()} == {"team-a", "soon"}
    await trio.sleep(0.6)
    assert {p.key_name for p in await store.active_keys()} == {"team-a"}


async def test_usage_summary(store):
    day = 86400
    t0 = 1_790_000_000 - 1_790_000_000 % day      # a UTC midnight
    records = [make_record(i, key="a", model="m1", deployment="m1@x", ts=t0 + 10) for i in range(3)]
    records += [make_record(i, prefix="b", key="b", model="m2", deployment="m2@y", ts=t0 + day + 10,
                            status=500) for i in range(2)]
    records += [make_record(0, prefix="anon", key=None, ts=t0 + 2 * day, status=401)]
    await store.insert_usage(records)

    by_key = await store.usage_summary(by="key")
    assert [(r["key"], r["requests"], r["errors"]) for r in by_key] == [("a", 3, 0), ("b", 2, 2), (None, 1, 1)]
    assert by_key[0]["total_tokens"] == 90 and by_key[0]["cost_usd"] == pytest.approx(0.003)
    assert by_key[0]["avg_ms"] == 12.5
    by_day = await store.usage_summary(by="day")
    assert [(r["day"], r["requests"]) for r in by_day] == [
        (time.strftime("%Y-%m-%d", time.gmtime(t0 + d * day)), n) for d, n in ((0, 3), (1, 2), (2, 1))]
    assert {r["deployment"] for r in await store.usage_summary(by="deployment")} == {"m1@x", "m2@y", "m1@b"}
    window = await store.usage_summary(since=t0 + day, until=t0 + 2 * day, by="model")
    assert [(r["model"], r["requests"]) for r in window] == [("m2", 2)]
    assert [r["requests"] for r in await store.usage_summary(by="model", key="a")] == [3]
    with pytest.raises(ValueError):
        await store.usage_summary(by="colour")


async def test_usage_by_day_is_in_the_given_time_zone(store):
    t0 = 1_790_000_000 - 1_790_000_000 % 86400    # a UTC midnight
    await store.insert_usage([
        make_record(1, ts=t0 + 10, total_ms=10.0),               # New York: the evening before
        make_record(2, ts=t0 + 4 * 3600 - 10, total_ms=30.0),   # New York (EDT): 23:59:50 the same evening
        make_record(3, ts=t0 + 4 * 3600 + 10, total_ms=50.0),   # New York: just past midnight
        make_record(4, ts=t0 + 18 * 3600 + 20 * 60),            # Kathmandu (+5:45): 00:05 the next day
    ])
    day = lambda offset: time.strftime("%Y-%m-%d", time.gmtime(t0 + offset * 86400))   # noqa: E731
    ny = await store.usage_summary(by="day", tz="America/New_York")
    assert [(r["day"], r["requests"], r["avg_ms"]) for r in ny] == [(day(-1), 2, 20.0), (day(0), 2, 31.25)]
    assert [(r["day"], r["requests"]) for r in await store.usage_summary(by="day", tz="Asia/Kathmandu")] == [
        (day(0), 3), (day(1), 1)]
    assert [(r["day"], r["requests"]) for r in await store.usage_summary(by="day")] == [(day(0), 4)]


def test_dates_without_an_offset_are_in_the_given_time_zone():
    from hxgwd.commandline import parse_when

    assert parse_when("2026-07-01", 0) == 1_782_864_000                          # UTC midnight
    assert parse_when("2026-07-01", 0, tz="Europe/Berlin") == 1_782_864_000 - 2 * 3600
    assert parse_when("2026-07-01T00:00:00+00:00", 0, tz="Europe/Berlin") == 1_782_864_000


async def test_cancel_really_stops_a_postgres_statement(new_pg_url):
    s = open_store(database(new_pg_url()))
    try:
        start = time.monotonic()
        with trio.move_on_after(0.3):
            await s._call(lambda conn: conn.execute("SELECT pg_sleep(30)"))
        assert time.monotonic() - start < 2
        probe = open_store(database(new_pg_url()))

        def sleeping(conn):
            return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
                                ).fetchone()[0]

        for _ in range(50):   # the cancel request is asynchronous: give the server a moment
            if await probe._call(sleeping) == 0:
                break
            await trio.sleep(0.05)
        assert await probe._call(sleeping) == 0
        await probe.aclose()
        assert await s.schema_status() == (0, expected_version(s.engine))   # the connection came back usable
    finally:
        await s.aclose()


async def test_cancel_really_stops_a_sqlite_statement(tmp_path):
    s = open_store(database(sqlite_url(tmp_path)))
    slow = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
            "SELECT count(*) FROM c")
    try:
        start = time.monotonic()
        with trio.move_on_after(0.3):
            await s._call(lambda conn: conn.execute(slow).fetchone())
        assert time.monotonic() - start < 2
        await s.migrate()                           # the pool still works
        assert await s.count_usage() == 0
    finally:
        await s.aclose()


async def test_a_sqlite_lock_held_past_statement_timeout_is_a_timeout(tmp_path):
    s = open_store(database(sqlite_url(tmp_path), statement_timeout=0.3))
    await s.migrate()
    await s.aclose()                                 # no pooled connection shares the file now
    holder = sqlite3.connect(sqlite_path(sqlite_url(tmp_path)), isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")   # a writer that lets nobody else in
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("DELETE FROM usage")
        start = time.monotonic()
        with pytest.raises(StoreTimeout, match="timed out"):
            await s.usage_summary()
        assert 0.25 < time.monotonic() - start < 3
    finally:
        holder.close()
    assert await s.usage_summary() == []
    await s.aclose()


async def test_unreachable_postgres_is_unavailable_quickly():
    s = open_store(database(f"postgresql://nobody@127.0.0.1:{free_port()}/none"))
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await s.insert_usage([make_record(1)])
    with pytest.raises(StoreUnavailable):
        await s.active_keys()
    assert time.monotonic() - start < 3
    await s.aclose()


async def test_postgres_staging_table_comes_back_after_discard(new_pg_url):
    s = open_store(database(new_pg_url()))
    try:
        await s.migrate()
        assert await s.insert_usage([make_record(1)]) == 1
        await s._call(lambda conn: conn.execute("DISCARD TEMP"))    # the pool is LIFO: same connection
        with pytest.raises(StoreUnavailable, match="usage_in"):
            await s.insert_usage([make_record(2)])
        assert await s.insert_usage([make_record(2)]) == 1         # recreated, not stuck
    finally:
        await s.aclose()


def test_new_key_format():
    key, digest, prefix = new_key()
    assert key.startswith("sk-hx-") and len(key) == 6 + 43 and prefix == key[:10] and len(digest) == 32
