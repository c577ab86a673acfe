"""Write throughput of UsageSink on both engines; opt-in: HXGWD_BENCH=1 pytest tests/test_usage_bench.py -s

20,000 records from 10 producer tasks into one sink as fast as they can, timed from the first
emit until aclose() returns (everything stored): with a queue that holds them all (the writer
alone), and with the default 10,000 (the rest overflows to the spool and is replayed); also the store alone (insert_usage of batch_size rows in a loop) and
the worst event-loop lag seen by a 1 ms ticker during the sink run.
"""

from __future__ import annotations

import os
import time

import pytest
import trio

from hxgwd.store import open_store
from hxgwd.store.usage import UsageSink
from tests.test_store_support import ListLog, database, make_record, new_pg_url, sqlite_url  # noqa: F401

pytestmark = pytest.mark.skipif(not os.environ.get("HXGWD_BENCH"), reason="benchmark: set HXGWD_BENCH=1")
N = 20_000


@pytest.mark.parametrize("queue_size", [N, 10_000], ids=["queue-holds-all", "queue-overflows-to-spool"])
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_sink_throughput(engine, queue_size, tmp_path, request):
    url = sqlite_url(tmp_path) if engine == "sqlite" else request.getfixturevalue("new_pg_url")()
    cfg = database(url, spool_dir=str(tmp_path / "spool"), queue_size=queue_size)
    store = open_store(cfg)
    await store.migrate()

    start = time.perf_counter()
    for k in range(0, N, cfg.batch_size):
        await store.insert_usage([make_record(i, prefix="direct") for i in range(k, k + cfg.batch_size)])
    direct = N / (time.perf_counter() - start)

    sink = UsageSink(store, cfg, ListLog())
    lag = 0.0

    async def ticker() -> None:
        nonlocal lag
        while True:
            t = trio.current_time()
            await trio.sleep(0.001)
            lag = max(lag, trio.current_time() - t - 0.001)

    records = [make_record(i, prefix="sink") for i in range(N)]
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        nursery.start_soon(ticker)
        start = time.perf_counter()

        async def producer(part: list) -> None:
            for j, r in enumerate(part):
                sink.emit(r)
                if j % 50 == 49:
                    await trio.sleep(0)

        async with trio.open_nursery() as producers:
            for p in range(10):
                producers.start_soon(producer, records[p::10])
        await sink.aclose(timeout=60)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    stats = sink.statistics()
    assert await store.count_usage() == 2 * N
    print(f"\n{engine} queue {queue_size}: store alone {direct:,.0f} rows/s; through UsageSink {N / elapsed:,.0f} rows/s "
          f"({elapsed:.2f} s, spooled {stats['spooled']}, loop lag max {lag * 1000:.1f} ms)")
    await store.aclose()
