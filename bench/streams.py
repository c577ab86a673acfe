#!/usr/bin/env python3
"""N concurrent streamed chats through one target; every SSE event timed.

    streams.py --url http://127.0.0.1:4010/v1 [--key K] [--model M] [-n 2000] [--ramp 4]
               [--timeout 60] [--pid PID] [--label NAME] [--json FILE]

A bounded trio client with raw HTTP/1.1 (no HTTP library, so the client's cost stays small next to
the target's): opens N connections (spread over --ramp seconds), sends one
`POST /v1/chat/completions` with `"stream": true` on each, reads the whole SSE answer (chunked or
close-delimited), and records per stream: the HTTP status, time to the first event, the gap
between every two consecutive events, and whether it ended in `data: [DONE]`. Every stream is
bounded by --timeout (from its connect to its last byte) and the whole run by
--ramp + --timeout + 5 s.

With --pid, the RSS of that process and its descendants (an nginx master and its workers) is
sampled every 100 ms from /proc/PID/status; the peak is reported (and VmHWM of PID itself), and the
CPU time the tree used during the run (utime + stime: a target near 1 s of CPU per second is
saturated, and its gaps say more about the box than about the code).

Prints one line per target, e.g.

    hxgwd: streams 300 ok 300 failed 0 | gap p50 500.4 p99 503.1 max 512.0 ms (n 6000) | first event
    p50 3.1 p99 12.0 ms | RSS peak 61.2 MiB (HWM 61.4) | errors: -

and with --json FILE appends one JSON object with the same numbers (and the error counts by kind:
"http 503", "timeout", "ConnectionResetError", "no [DONE]", ...).

The request asks for `stream_options.include_usage` (--no-usage: not), so every target gets the same
event sequence from the upstream: hxgwd asks the upstream for the usage chunk anyway (exact token
counts) and drops it when the client did not ask; the fake upstream paces that chunk like the
others, so without the option hxgwd's client would see one double gap per stream (its p99) where
nginx's client sees none.

The fd limit is raised to the hard limit first (each stream is one socket here; the target needs
two per stream, so raise `ulimit -n` in the shell that starts it too: bench/streams.sh does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import urllib.parse

import trio

RECEIVE = 65536


class Result:
    __slots__ = ("status", "error", "first", "gaps", "events", "done")

    def __init__(self) -> None:
        self.status = 0
        self.error = ""
        self.first: float | None = None   # seconds from the request sent to the first event
        self.gaps: list[float] = []
        self.events = 0
        self.done = False


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


async def one_stream(host: str, port: int, request: bytes, res: Result, timeout: float) -> None:
    with trio.move_on_after(timeout) as scope:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            res.error = f"connect {type(exc).__name__}"
            return
        try:
            await _exchange(stream, request, res)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            res.error = type(exc).__name__
        except ValueError as exc:       # a malformed answer
            res.error = f"bad answer: {exc}"[:80]
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
    if scope.cancelled_caught and not res.error:
        res.error = "timeout"


async def _exchange(stream: trio.SocketStream, request: bytes, res: Result) -> None:
    await stream.send_all(request)
    sent = time.monotonic()
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(RECEIVE)
        if not data:
            raise ValueError("closed before the response head")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    res.status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip().lower()
    if res.status != 200:
        res.error = f"http {res.status}"
        return
    chunked = b"chunked" in headers.get(b"transfer-encoding", b"")
    length = int(headers[b"content-length"]) if b"content-length" in headers else None
    raw, sse, last = rest, b"", None
    got = 0
    need_size = True
    size = 0
    eof = False
    while True:
        now = time.monotonic()
        # de-chunk what we have into `sse`
        if chunked:
            while True:
                if need_size:
                    i = raw.find(b"\r\n")
                    if i < 0:
                        break
                    size = int(raw[:i].split(b";")[0], 16)
                    raw = raw[i + 2:]
                    need_size = False
                    if size == 0:
                        eof = True
                        break
                if len(raw) < size + 2:
                    break
                sse += raw[:size]
                raw = raw[size + 2:]
                need_size = True
        else:
            sse += raw
            got += len(raw)
            raw = b""
            if length is not None and got >= length:
                eof = True
        # complete SSE events
        while True:
            i = sse.find(b"\n\n")
            if i < 0:
                break
            event, sse = sse[:i], sse[i + 2:]
            if not event.strip():
                continue
            res.events += 1
            if last is None:
                res.first = now - sent
            else:
                res.gaps.append(now - last)
            last = now
            if event.strip() == b"data: [DONE]":
                res.done = True
        if eof:
            break
        data = await stream.receive_some(RECEIVE)
        if not data:
            if chunked or length is not None:
                raise ValueError("closed in the middle of the body")
            break
        raw += data
    if not res.done:
        res.error = "no [DONE]"


def tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return out


def cpu_tree_s(pid: int) -> float:
    """utime + stime of pid and its descendants, in seconds."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def rss_tree_kb(pid: int) -> int:
    """VmRSS of pid and all its descendants, in KiB (0 if gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return total


def hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except FileNotFoundError:
        return 0


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="base URL ending in /v1")
    ap.add_argument("--key", default="sk-bench")
    ap.add_argument("--model", default="fake-model-delay")
    ap.add_argument("-n", "--streams", type=int, default=2000)
    ap.add_argument("--ramp", type=float, default=4.0, help="seconds over which the streams are opened")
    ap.add_argument("--timeout", type=float, default=60.0, help="per stream, connect to last byte")
    ap.add_argument("--pid", type=int, help="target process: sample its (tree's) RSS")
    ap.add_argument("--nominal-ms", type=float, default=500.0,
                    help="the upstream's gap between events, for the gap histogram")
    ap.add_argument("--no-usage", action="store_true",
                    help="do not ask for stream_options.include_usage (see the module doc)")
    ap.add_argument("--label", default="target")
    ap.add_argument("--json", help="append a JSON line with the results to this file")
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.streams + 64 > hard:
        print(f"streams.py: fd limit {hard} < {a.streams} streams", file=sys.stderr)
        return 2

    u = urllib.parse.urlsplit(a.url)
    host, port = u.hostname, u.port or 80
    req = {"model": a.model, "stream": True, "messages": [{"role": "user", "content": "Say hello, slowly."}]}
    if not a.no_usage:
        req["stream_options"] = {"include_usage": True}
    body = json.dumps(req).encode()
    request = (f"POST {u.path.rstrip('/')}/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\n"
               f"Authorization: Bearer {a.key}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body

    results = [Result() for _ in range(a.streams)]
    peak = [0]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_tree_kb(a.pid))
            await trio.sleep(0.1)

    cpu0 = cpu_tree_s(a.pid) if a.pid else 0.0
    t0, start = time.monotonic(), trio.current_time()
    with trio.move_on_after(a.ramp + a.timeout + 5):
        async with trio.open_nursery() as outer:
            if a.pid:
                outer.start_soon(sample)
            async with trio.open_nursery() as nursery:
                for i, res in enumerate(results):
                    nursery.start_soon(one_stream, host, port, request, res, a.timeout)
                    if a.ramp > 0:      # (trio's clock, not time.monotonic(): they differ)
                        await trio.sleep_until(start + a.ramp * (i + 1) / a.streams)
            outer.cancel_scope.cancel()
    elapsed = time.monotonic() - t0
    target_cpu = round(cpu_tree_s(a.pid) - cpu0, 1) if a.pid else None

    ok = [r for r in results if r.done and not r.error]
    errors: dict[str, int] = {}
    for r in results:
        if r.error or not r.done:
            kind = r.error or "unfinished"
            errors[kind] = errors.get(kind, 0) + 1
    gaps = [g * 1000 for r in ok for g in r.gaps]
    # where the gaps fall, relative to the upstream's pace (--nominal-ms): two events coalesced
    # show as one short and one double gap
    edges = [0.5, 0.9, 1.1, 1.5, 2.5]
    hist = {}
    for g in gaps:
        x = g / a.nominal_ms
        b = next((f"<{e}x" for e in edges if x < e), f">={edges[-1]}x")
        hist[b] = hist.get(b, 0) + 1
    hist = {k: hist[k] for k in [f"<{e}x" for e in edges] + [f">={edges[-1]}x"] if k in hist}
    firsts = [r.first * 1000 for r in ok if r.first is not None]
    out = {
        "label": a.label, "url": a.url, "streams": a.streams, "ok": len(ok), "failed": a.streams - len(ok),
        "errors": errors, "events": sum(r.events for r in ok), "gaps": len(gaps),
        "gap_p50_ms": quantile(gaps, 0.50), "gap_p99_ms": quantile(gaps, 0.99),
        "gap_max_ms": max(gaps) if gaps else None, "gap_hist": hist, "nominal_ms": a.nominal_ms,
        "first_p50_ms": quantile(firsts, 0.50), "first_p99_ms": quantile(firsts, 0.99),
        "first_max_ms": max(firsts) if firsts else None,
        "rss_peak_mib": round(peak[0] / 1024, 1) if a.pid else None,
        "hwm_mib": round(hwm_kb(a.pid) / 1024, 1) if a.pid else None,
        "elapsed_s": round(elapsed, 1), "ramp_s": a.ramp, "target_cpu_s": target_cpu,
        "client_cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
    }

    def f(v, spec="{:.1f}"):
        return "-" if v is None else spec.format(v)

    rss = (f" | RSS peak {f(out['rss_peak_mib'])} MiB (HWM {f(out['hwm_mib'])}), CPU {target_cpu} s"
           if a.pid else "")
    print(f"{a.label}: streams {a.streams} ok {len(ok)} failed {out['failed']} | gap p50 {f(out['gap_p50_ms'])} "
          f"p99 {f(out['gap_p99_ms'])} max {f(out['gap_max_ms'])} ms (n {len(gaps)}) | first event "
          f"p50 {f(out['first_p50_ms'])} p99 {f(out['first_p99_ms'])} max {f(out['first_max_ms'])} ms{rss} | "
          f"{elapsed:.1f} s, client CPU {out['client_cpu_s']} s | gaps/{a.nominal_ms:g} ms: "
          f"{' '.join(f'{k} {v}' for k, v in hist.items()) or '-'} | errors: "
          f"{', '.join(f'{k} x{v}' for k, v in sorted(errors.items(), key=lambda kv: -kv[1])) or '-'}",
          flush=True)
    if a.json:
        with open(a.json, "a") as fh:
            fh.write(json.dumps(out) + "\n")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
