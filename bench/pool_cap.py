#!/usr/bin/env python3
"""Many slow streams through one backend: what a backend's connection cap costs, and what none costs.

    bench/pool_cap.py [--streams 3000] [--concurrency 1000] [--max-connections 0] [--parser auto]

Starts ../shared/bench's pyup as the one backend (its own port and run dir; BENCH_CHUNK_DELAY_MS
500 between its 20 SSE events, so a stream lasts ~10 s) and hxgwd in front of it with
`max_connections` as given, then keeps --concurrency streamed chat requests in flight (each on
a new client connection) until --streams have been started, and prints one JSON line: streams
finished, statuses, p50/p99 gap between events as the client saw them, the gateway's peak RSS
and open fds (sampled every 0.5 s), and its CPU seconds. Loopback only; bounded by --streams and
by a 300 s deadline. Stops what it started, by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import trio

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.environ.get("SHARED_BENCH", os.path.join(REPO, "..", "shared", "bench"))   # e.g. /work/shared/bench
KEY = "sk-hx-bench"
KEY_SHA = "3f6fd84c7b1401637625a7936edfe7a8cee3d4c2d25bf1d1f9777b5165b2c738"
BODY = json.dumps({"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()


def wait_http(url: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def rss_and_fds(pid: int) -> tuple[int, int]:
    rss = 0
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_stream(port: int, gaps: list[float], statuses: dict) -> None:
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + KEY.encode() +
               b"\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
    try:
        with trio.fail_after(120):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request)
                head, last, events = b"", None, 0
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    now = trio.current_time()
                    if not head:
                        head = data[:12]
                    if b"data:" in data:
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                        events += data.count(b"data:")
        status = head[9:12].decode() if head else "none"
        if status == "200" and events < 20:
            status = "200-short"
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        status = type(exc).__name__
    statuses[status] = statuses.get(status, 0) + 1


async def drive(port: int, total: int, concurrency: int, pid: int) -> dict:
    gaps: list[float] = []
    statuses: dict = {}
    peak = {"rss": 0, "fds": 0}
    slots = trio.Semaphore(concurrency)

    async def sample() -> None:
        while True:
            rss, fds = rss_and_fds(pid)
            peak["rss"], peak["fds"] = max(peak["rss"], rss), max(peak["fds"], fds)
            await trio.sleep(0.5)

    async def run_one() -> None:
        try:
            await one_stream(port, gaps, statuses)
        finally:
            slots.release()

    with trio.move_on_after(300):
        async with trio.open_nursery() as outer:
            outer.start_soon(sample)
            async with trio.open_nursery() as clients:
                for _ in range(total):
                    await slots.acquire()
                    clients.start_soon(run_one)
            outer.cancel_scope.cancel()
    gaps.sort()
    pick = (lambda q: round(gaps[min(len(gaps) - 1, int(q * len(gaps)))] * 1000, 1)) if gaps else (lambda q: None)
    return {"statuses": statuses, "gap_p50_ms": pick(0.5), "gap_p99_ms": pick(0.99),
            "peak_rss_mib": round(peak["rss"] / 2**20, 1), "peak_fds": peak["fds"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--max-connections", type=int, default=0)
    ap.add_argument("--parser", default="auto")
    ap.add_argument("--chunk-delay-ms", type=int, default=500)
    ap.add_argument("--gw-port", type=int, default=4910)
    ap.add_argument("--up-port", type=int, default=18982)
    a = ap.parse_args()
    run = tempfile.mkdtemp(prefix="hxgwd-streams-")
    up = subprocess.Popen([sys.executable, os.path.join(SHARED, "fakeup", "pyup.py"), "--port", str(a.up_port),
                           "--delay-ms", "0", "--chunk-delay-ms", str(a.chunk_delay_ms)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    config = os.path.join(run, "hxgwd.toml")
    with open(config, "w") as f:
        f.write(f"""[server]
listen = ["127.0.0.1:{a.gw_port}"]
max_connections = {a.concurrency + 64}
http_parser = "{a.parser}"
[log]
access_log = false
[database]
url = ""
[[keys]]
name = "bench"
sha256 = "{KEY_SHA}"
[[backends]]
name = "pyup-slow"
url = "http://127.0.0.1:{a.up_port}/v1"
max_connections = {a.max_connections}
[[models]]
name = "slow"
backend = "pyup-slow"
""")
    env = {**os.environ, "PYTHONPATH": REPO}
    gw = subprocess.Popen([sys.executable, "-m", "hxgwd", "-c", config], env=env, cwd=run,
                          stdout=subprocess.DEVNULL, stderr=open(os.path.join(run, "hxgwd.log"), "wb"),
                          start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{a.up_port}/health", 10)
        wait_http(f"http://127.0.0.1:{a.gw_port}/healthz", 20)
        cpu0, t0 = cpu_seconds(gw.pid), time.monotonic()
        result = trio.run(drive, a.gw_port, a.streams, a.concurrency, gw.pid)
        result.update(max_connections=a.max_connections, parser=a.parser, streams=a.streams,
                      concurrency=a.concurrency, seconds=round(time.monotonic() - t0, 1),
                      gateway_cpu_s=round(cpu_seconds(gw.pid) - cpu0, 1))
        print(json.dumps(result), flush=True)
    finally:
        for proc in (gw, up):
            proc.send_signal(signal.SIGTERM)
        for proc in (gw, up):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
