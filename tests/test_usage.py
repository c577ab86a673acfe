"""UsageSink on real stores: nothing lost through a PostgreSQL outage, a spool replayed by the
next process, the spool's bound, shutdown flushes, and `hxgwd usage` as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from hxgwd.store import RecordRejected, open_store
from hxgwd.store.schema import record_line
from hxgwd.store.spool import SpoolError
from hxgwd.store.usage import LINGER, UsageSink
from tests.conftest import ROOT
from tests.test_store_support import (DownStore, ListLog, database, make_record, new_pg_url,  # noqa: F401
                                      sqlite_url, wait_until)


async def count(url: str) -> int:
    s = open_store(database(url))
    try:
        return await s.count_usage()
    finally:
        await s.aclose()


async def test_records_reach_sqlite_and_close_flushes_memory(tmp_path):
    url = sqlite_url(tmp_path)
    store = open_store(database(url))
    await store.migrate()
    sink = UsageSink(store, database(url, batch_size=100), ListLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)

        async def producer(n: int) -> None:
            for i in range(200):
                sink.emit(make_record(i, prefix=f"p{n}"))
                if i % 20 == 0:
                    await trio.sleep(0)

        async with trio.open_nursery() as producers:
            for n in range(5):
                producers.start_soon(producer, n)
        for i in range(500):                   # queued right before close: close must write them
            sink.emit(make_record(i, prefix="last"))
        await sink.aclose()
    stats = sink.statistics()
    assert (stats["written"], stats["spooled"], stats["dropped"], stats["queued"]) == (1500, 0, 0, 0)
    assert await store.count_usage() == 1500
    await store.aclose()
    assert not [f for f in os.listdir(tmp_path / "state" / "hxgwd.db-spool") if f.endswith(".jsonl") and
                os.path.getsize(tmp_path / "state" / "hxgwd.db-spool" / f)]


async def test_postgres_outage_mid_run_loses_nothing(new_pg_url, pg_server, tmp_path):
    # The throwaway server runs with synchronous_commit=off and stop() is `pg_ctl -m immediate`, a
    # crash: it forgets commits it already acknowledged (measured: 8-16 of 2,000 rows). Production
    # servers default to on; ask for it per session so the count measures the sink, not the server.
    url = new_pg_url() + "?options=-c%20synchronous_commit%3Don"
    store = open_store(database(url))
    await store.migrate()
    log = ListLog()
    cfg = database(url, spool_dir=str(tmp_path / "spool"), queue_size=500, batch_size=100)
    sink = UsageSink(store, cfg, log, retry_max=0.5)
    sent = 0
    outage = {}
    restarted = trio.Event()

    async def producer(n: int) -> None:
        nonlocal sent
        for i in range(250):
            if i == 200:                       # the last 50 after the restart, however slow it is
                with trio.move_on_after(30):
                    await restarted.wait()
            sink.emit(make_record(i, prefix=f"p{n}"))
            sent += 1
            await trio.sleep(0.008)

    async def stop_and_restart() -> None:
        await trio.sleep(0.5)
        outage["sent_at_stop"] = sent
        await trio.to_thread.run_sync(pg_server.stop)
        await trio.sleep(0.5)
        await trio.to_thread.run_sync(pg_server.restart)
        outage["sent_at_restart"] = sent
        restarted.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        async with trio.open_nursery() as producers:
            producers.start_soon(stop_and_restart)
            for n in range(8):
                producers.start_soon(producer, n)
        assert await wait_until(lambda: sink.statistics()["spool_bytes"] == 0
                                and sink.statistics()["queued"] == 0, timeout=15)
        await sink.aclose()

    stats = sink.statistics()
    assert sent == 2000
    assert 0 < outage["sent_at_stop"] < outage["sent_at_restart"] < sent     # the outage was mid-run
    assert stats["dropped"] == 0 and stats["rejected"] == 0
    assert stats["spooled"] > 0 and stats["replayed"] == stats["spooled"]    # the spool was used and emptied
    assert await store.count_usage() == sent
    assert "usage store unavailable; spooling usage records to disk" in log.at("warning")
    assert "usage store available again" in log.at("info")
    await store.aclose()


async def test_a_slow_postgres_is_cut_off_and_its_batch_spooled(new_pg_url, tmp_path):
    import psycopg

    url = new_pg_url()
    cfg = database(url, spool_dir=str(tmp_path / "spool"), connect_timeout=0.5, statement_timeout=1.0)
    store = open_store(cfg)
    await store.migrate()
    log = ListLog()
    sink = UsageSink(store, cfg, log)
    with psycopg.connect(url, autocommit=True) as locker:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE usage IN EXCLUSIVE MODE")    # every insert now waits
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            for i in range(10):
                sink.emit(make_record(i))
            start = trio.current_time()
            assert await wait_until(lambda: sink.statistics()["spooled"] == 10, timeout=5)
            assert trio.current_time() - start < 1.5 + 1.0     # attempt bound: connect + statement timeout
            waiting = locker.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                     "AND query LIKE 'INSERT INTO usage%'").fetchone()[0]
            assert waiting == 0                                 # the server-side statement is gone too
            locker.execute("COMMIT")
            assert await wait_until(lambda: sink.statistics()["spool_bytes"] == 0, timeout=10)
            await sink.aclose()
    assert await store.count_usage() == 10 and sink.statistics()["dropped"] == 0
    assert "usage store unavailable; spooling usage records to disk" in log.at("warning")
    await store.aclose()


async def test_a_new_sink_replays_the_spool_left_by_an_earlier_one(tmp_path):
    cfg = database(sqlite_url(tmp_path), spool_dir=str(tmp_path / "spool"), batch_size=64)
    first = UsageSink(DownStore(), cfg, ListLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        for i in range(300):
            first.emit(make_record(i))
        await trio.sleep(0.05)
        await first.aclose(timeout=2)
    assert (first.statistics()["spooled"], first.statistics()["written"]) == (300, 0)
    assert list((tmp_path / "spool").glob("usage-*.jsonl"))

    store = open_store(cfg)
    await store.migrate()
    await store.insert_usage([make_record(i) for i in range(100)])   # some were stored before the outage
    log = ListLog()
    second = UsageSink(store, cfg, log)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)                  # no new records: replay starts on its own
        assert await wait_until(lambda: second.statistics()["spool_bytes"] == 0, timeout=5)
        await second.aclose()
    assert second.statistics()["replayed"] == 200         # rows inserted: the 100 were there
    assert await store.count_usage() == 300              # idempotent: the 100 are not doubled
    assert not list((tmp_path / "spool").glob("usage-*.jsonl"))
    assert "usage spool replayed into the store" in log.at("info")
    await store.aclose()


async def test_spool_is_bounded_and_counts_what_it_drops(tmp_path):
    cfg = database(sqlite_url(tmp_path), spool_dir=str(tmp_path / "spool"), spool_max_bytes=20_000)
    log = ListLog()
    sink = UsageSink(DownStore(), cfg, log)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(500):
            sink.emit(make_record(i))
            if i % 50 == 0:
                await trio.sleep(0.01)
        await sink.aclose(timeout=2)
    stats = sink.statistics()
    assert stats["dropped"] > 0 and stats["spooled"] + stats["dropped"] == 500
    assert 20_000 * 0.9 < stats["spool_bytes"] <= 20_000
    assert sum(os.path.getsize(p) for p in (tmp_path / "spool").glob("usage-*.jsonl")) == stats["spool_bytes"]
    assert any("over 80%" in m for m in log.at("warning"))
    assert log.at("error") == ["usage spool is full: usage records are being dropped"]   # loud, not per record


class GatedStore:
    """A real store behind a gate: inserts wait until the gate opens (a slow database)."""

    def __init__(self, store) -> None:
        self.store, self.gate = store, trio.Event()

    async def insert_usage(self, records: list) -> int:
        await self.gate.wait()
        return await self.store.insert_usage(records)


async def test_a_full_queue_goes_to_the_spool_not_away(tmp_path):
    cfg = database(sqlite_url(tmp_path), queue_size=10, batch_size=5, spool_fsync="always")
    store = open_store(cfg)
    await store.migrate()
    gated = GatedStore(store)
    sink = UsageSink(gated, cfg, ListLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(100):               # no checkpoint: the writer cannot take any but the first
            sink.emit(make_record(i))      # (handed straight to it: it was waiting in receive())
        assert (sink.statistics()["queued"], sink.statistics()["spooled"]) == (10, 89)
        gated.gate.set()
        assert await wait_until(lambda: sink.statistics()["spool_bytes"] == 0, timeout=5)
        await sink.aclose()
    assert await store.count_usage() == 100 and sink.statistics()["dropped"] == 0
    await store.aclose()


class CountingStore:
    """Stores in memory, each insert taking `latency` (virtual) seconds, and counts the inserts."""

    def __init__(self, latency: float) -> None:
        self.latency, self.batches, self.rows = latency, [], set()

    async def insert_usage(self, records: list) -> int:
        await trio.sleep(self.latency)
        self.batches.append(len(records))
        new = {r.request_id for r in records} - self.rows
        self.rows |= new
        return len(new)


async def test_a_steady_trickle_is_written_in_linger_sized_batches(tmp_path, autojump_clock):
    # one record a millisecond, inserts of 2 ms: the writer must not go straight back for the one
    # or two records that came in during each insert (a thread hop and a transaction each)
    store = CountingStore(latency=0.002)
    # no fsync: a worker thread's real time would let the virtual clock run past the close deadline
    cfg = database(sqlite_url(tmp_path), spool_dir=str(tmp_path / "spool"), spool_fsync="never")
    sink = UsageSink(store, cfg, ListLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(1000):
            sink.emit(make_record(i))
            await trio.sleep(0.001)
        await sink.aclose()
    assert len(store.rows) == 1000 and sink.statistics()["written"] == 1000
    assert len(store.batches) <= 1000 * 0.001 / LINGER + 2, store.batches


class HangingStore:
    async def insert_usage(self, records: list) -> int:
        await trio.sleep_forever()


async def test_close_is_bounded_when_the_store_hangs(tmp_path):
    cfg = database(sqlite_url(tmp_path), spool_dir=str(tmp_path / "spool"), batch_size=10)
    sink = UsageSink(HangingStore(), cfg, ListLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(50):
            sink.emit(make_record(i))
        await trio.sleep(0.05)                 # the writer is stuck in its first batch
        start = trio.current_time()
        await sink.aclose(timeout=0.5)
        assert trio.current_time() - start < 2
    assert (sink.statistics()["spooled"], sink.statistics()["written"]) == (50, 0)
    sink.emit(make_record(99))                 # a late record (a request finishing after close)
    assert sink.statistics()["spooled"] == 51


async def test_a_cancelled_writer_spools_what_it_holds(tmp_path):
    cfg = database(sqlite_url(tmp_path), spool_dir=str(tmp_path / "spool"), batch_size=10)
    sink = UsageSink(HangingStore(), cfg, ListLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(100):
            sink.emit(make_record(i))
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert sink.statistics()["spooled"] == 100


async def test_torn_spool_lines_are_skipped_and_counted(tmp_path):
    cfg = database(sqlite_url(tmp_path), spool_dir=str(tmp_path / "spool"))
    os.makedirs(tmp_path / "spool")
    with open(tmp_path / "spool" / "usage-0000000007.jsonl", "wb") as f:
        f.write(record_line(make_record(1)) + record_line(make_record(2))[:40])   # a power cut mid-write
    store = open_store(cfg)
    await store.migrate()
    sink = UsageSink(store, cfg, ListLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        assert await wait_until(lambda: sink.statistics()["spool_bytes"] == 0, timeout=5)
        sink.emit(make_record(3))
        await sink.aclose()
    assert (sink.statistics()["corrupt"], await store.count_usage()) == (1, 2)
    # the next segment number continues after the old ones: nothing is overwritten
    await store.aclose()


class PickyStore:
    def __init__(self, store, bad: str) -> None:
        self.store, self.bad, self.calls = store, bad, 0

    async def insert_usage(self, records: list) -> int:
        self.calls += 1
        if any(r.request_id == self.bad for r in records):
            raise RecordRejected("test: bad row")
        return await self.store.insert_usage(records)


async def test_a_rejected_record_does_not_block_its_batch(tmp_path):
    cfg = database(sqlite_url(tmp_path), batch_size=64)
    store = open_store(cfg)
    await store.migrate()
    log = ListLog()
    sink = UsageSink(PickyStore(store, "r-13"), cfg, log)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(64):
            sink.emit(make_record(i))
        await sink.aclose()
    stats = sink.statistics()
    assert (stats["rejected"], stats["written"], stats["spooled"], stats["dropped"]) == (1, 63, 0, 0)
    assert await store.count_usage() == 63
    [(level, msg, fields)] = [line for line in log.lines if "rejected" in line[1]]
    assert level == "error" and fields["request_id"] == "r-13" and fields["kept"]
    kept = (tmp_path / "state" / "hxgwd.db-spool" / "rejected.jsonl").read_bytes().splitlines()
    assert [json.loads(line)["request_id"] for line in kept] == ["r-13"]
    await store.aclose()


async def test_one_process_per_spool_directory(tmp_path):
    cfg = database(sqlite_url(tmp_path), spool_dir=str(tmp_path / "spool"))
    log = ListLog()
    a, b = UsageSink(DownStore(), cfg, ListLog()), UsageSink(DownStore(), cfg, log)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        with pytest.raises(SpoolError, match="in use"):
            await b.run()
        b.emit(make_record(1))               # the request path never sees the error
        await b.aclose(timeout=1)            # nor does shutdown: the loss is counted and logged
        assert b.statistics()["dropped"] == 1 and log.at("error")
        await a.aclose(timeout=1)


def test_usage_command_json_and_table(tmp_path):
    url = sqlite_url(tmp_path)

    async def fill() -> None:
        s = open_store(database(url))
        await s.migrate()
        await s.insert_usage([make_record(i, key="team-a", model="m1") for i in range(3)]
                             + [make_record(i, prefix="b", key="team-b", model="m2", status=429) for i in range(2)]
                             + [make_record(0, prefix="old", key="team-a", ts=time.time() - 40 * 86400)])
        await s.aclose()

    trio.run(fill)
    cfg = tmp_path / "hxgwd.toml"
    cfg.write_text(textwrap.dedent(f"""
        [database]
        url = "{url}"
    """))

    def hxgwd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hxgwd", *args, "-c", str(cfg)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    out = hxgwd("usage", "--by", "key", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["by"] == "key"
    assert [(r["key"], r["requests"], r["errors"], r["total_tokens"]) for r in doc["rows"]] == [
        ("team-a", 3, 0, 90), ("team-b", 2, 2, 60)]                         # the 40-day-old one is out
    assert doc["total"]["requests"] == 5 and doc["total"]["cost_usd"] == pytest.approx(0.005)
    everything = json.loads(hxgwd("usage", "--json", "--since", "2000-01-01", "--by", "model").stdout)
    assert {r["model"]: r["requests"] for r in everything["rows"]} == {"m1": 4, "m2": 2}
    table = hxgwd("usage", "--by", "day", "--key", "team-b").stdout
    assert "REQUESTS" in table and "TOTAL" in table and time.strftime("%Y-%m-%d", time.gmtime()) in table
    bad = hxgwd("usage", "--since", "last tuesday")
    assert bad.returncode == 2 and "--since 'last tuesday': not a time" in bad.stderr


async def test_last_error_clears_when_the_store_recovers(tmp_path):
    cfg = database(sqlite_url(tmp_path), spool_dir=str(tmp_path / "spool"))
    store = open_store(cfg)
    await store.migrate()

    class Recovering:
        down = True

        async def insert_usage(self, records: list) -> int:
            if self.down:
                await DownStore().insert_usage(records)
            return await store.insert_usage(records)

    flaky = Recovering()
    sink = UsageSink(flaky, cfg, ListLog(), retry_min=0.05, retry_max=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        sink.emit(make_record(1))
        assert await wait_until(lambda: sink.statistics()["last_error"] is not None, timeout=5)
        flaky.down = False
        sink.emit(make_record(2))
        assert await wait_until(lambda: sink.statistics()["store_ok"] and sink.statistics()["spool_bytes"] == 0,
                                timeout=5)
        assert sink.statistics()["last_error"] is None
        await sink.aclose(timeout=5)
    assert await store.count_usage() == 2
    await store.aclose()


async def test_the_journal_stays_small_while_the_store_is_healthy(tmp_path):
    # every record is journaled when emitted; a sealed segment whose records are all stored goes
    spool = tmp_path / "spool"
    cfg = database(sqlite_url(tmp_path), spool_dir=str(spool))
    store = open_store(cfg)
    await store.migrate()
    sink = UsageSink(store, cfg, ListLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(300):
            sink.emit(make_record(i))
            if i == 0:
                assert list(spool.glob("usage-*.jsonl"))        # on disk before it is stored
            await trio.sleep(0.01)
        assert len(list(spool.glob("usage-*.jsonl"))) <= 2      # the active one, one being stored
        await sink.aclose(timeout=5)
    assert not list(spool.glob("usage-*.jsonl"))
    stats = sink.statistics()
    assert (stats["written"], stats["spooled"], stats["replayed"], stats["spool_bytes"]) == (300, 0, 0, 0)
    assert await store.count_usage() == 300
    await store.aclose()


async def test_records_journaled_by_a_process_that_died_are_replayed(tmp_path):
    spool = tmp_path / "spool"
    cfg = database(sqlite_url(tmp_path), spool_dir=str(spool))
    store = open_store(cfg)
    await store.migrate()
    dead = UsageSink(store, cfg, ListLog())
    with trio.CancelScope() as scope:    # the writer never runs: as if killed right after emit()
        dead._spool.open()
        for i in range(50):
            dead.emit(make_record(i))
        scope.cancel()
    os.close(dead._spool._lock_fd)       # the kernel does this for a killed process
    sink = UsageSink(store, cfg, ListLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        assert await wait_until(lambda: sink.statistics()["replayed"] == 50, timeout=10)
        await sink.aclose(timeout=5)
    assert await store.count_usage() == 50 and not list(spool.glob("usage-*.jsonl"))
    await store.aclose()


async def test_the_old_default_spool_directory_is_taken_over(tmp_path):
    # before 14 the default spool was <directory of the SQLite file>/spool: an upgrade must not
    # strand the records in it
    cfg = database(sqlite_url(tmp_path))
    old = tmp_path / "state" / "spool"
    old.mkdir(parents=True)
    (old / ".lock").touch()
    (old / "usage-0000000007.jsonl").write_bytes(b"".join(record_line(make_record(i)) for i in range(20)))
    store = open_store(cfg)
    await store.migrate()
    log = ListLog()
    sink = UsageSink(store, cfg, log)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        assert await wait_until(lambda: sink.statistics()["replayed"] == 20, timeout=10)
        await sink.aclose(timeout=5)
    assert await store.count_usage() == 20
    assert not list(old.glob("usage-*.jsonl"))
    assert "usage spool of the old default directory taken over, to be replayed" in log.at("info")
    await store.aclose()
