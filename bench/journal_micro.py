#!/usr/bin/env python3
"""Microbenchmark of the synchronous usage journal on the request path (issue 14 point 7).

    PYTHONPATH=. python bench/journal_micro.py [--n 200000] [--repeat 5]

Times, per request, what Gateway's `finally` does for the usage record before it awaits: from a
finished Exchange to the line in the journal (before 14's mapped journal: Gateway._record, i.e.
the RequestRecord, record_line and os.write, and the channel's send_nowait; after: Gateway._values
and UsageSink.journal), then, separately, the part deferred to the loop's idle time
(Gateway._finish: the RequestRecord and the channel; the access line is left out, a no-op
logger: it was deferred before too). The
spool is a real one in a temp directory; the channel is drained between rounds, outside the
clock. Best of --repeat rounds, µs per request.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import types

import trio

from hxgwd.pipeline import exchange as exchanges, handle
from hxgwd.store.usage import UsageSink
from tests.test_store_support import ListLog, database, sqlite_url


def exchange(i: int) -> exchanges.Exchange:
    ex = exchanges.Exchange(request_id=f"0193a4b5c6d{i:06x}a1b2c3d4", started=1000.0, ts=1733450000.123456,
                        endpoint="/v1/chat/completions", client_request_id=None)
    ex.key, ex.model, ex.group, ex.deployment, ex.backend = "bench", "m", None, "m-0", "http://127.0.0.1:18280"
    ex.status, ex.usage, ex.bytes_in, ex.bytes_out = 200, {"prompt_tokens": 12, "completion_tokens": 34,
                                                          "total_tokens": 46}, 187, 412
    ex.upstream_time, ex.ttfb, ex.attempts, ex.route = 0.000213457, 0.000198111, 1, "m"
    return ex


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = database(sqlite_url(tmp), spool_dir=tmp + "/spool", queue_size=args.n + 10,
                       spool_max_bytes=1 << 34)
        sink = UsageSink(None, cfg, ListLog())      # the writer never runs: nothing is stored
        sink._spool.open()
        gw = types.SimpleNamespace(services=types.SimpleNamespace(usage=sink),
                                   log=types.SimpleNamespace(access=lambda rec: None))
        rt = types.SimpleNamespace(generation=3)
        exs = [exchange(i) for i in range(1000)]
        sync = lambda rt, ex, cost, ended: (v := ex.record_values(rt.generation, cost, ended), sink.journal(v))
        best = best_after = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            done = [sync(rt, exs[i % 1000], 0.0, 1000.000321) for i in range(args.n)]
            best = min(best, (time.perf_counter() - t) / args.n * 1e6)
            t = time.perf_counter()
            for item in done:
                handle.Gateway._finish(types.SimpleNamespace(ctx=gw), *item)
            best_after = min(best_after, (time.perf_counter() - t) / args.n * 1e6)
            while True:     # drain the channel, and start a new segment as the writer would
                try:
                    sink._recv.receive_nowait()
                except trio.WouldBlock:
                    break
            trio.run(sink._spool.seal, False)
        print(f"synchronous path: {best:.2f} µs/request; deferred part: {best_after:.2f} µs/request")


if __name__ == "__main__":
    main()
