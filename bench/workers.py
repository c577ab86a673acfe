#!/usr/bin/env python3
"""hxgwd with `[server] workers = 2` against `workers = 1`, side by side in one run (issue 18).

    bench/workers.py [--rounds 3] [--duration 6] [--out DIR] [--no-balance] [--balance-args ARGS]

Starts, on ports of its own: the static nginx fake upstream (../shared/bench/servers.sh, port
BENCH_UPSTREAM_PORT, 18611), hxgwd with workers = 2 (BENCH_GATEWAY_PORT, 18610) and hxgwd with
workers = 1 (BENCH_GATEWAY_PORT + 2), both on bench/gateway.toml (access log on, usage store on in
SQLite under the run's temporary directory) plus a second key, `sk-hx-limited`, with
`rpm = 100000000`: never refused, but with workers = 2 every one of its requests is admitted by
the supervisor over the control channel (workers/limits.py). Then, in --rounds alternating rounds
(the order rotates each round, so drift hits every target), wrk -t1 for --duration seconds per run:

  64 conns  direct (the upstream itself), w1, w1-limited, w2, w2-limited
  1 conn    direct, w1, w2, w2-limited

Per run: req/s, p50/p99, and the CPU seconds (utime + stime from /proc/PID/stat, before and after)
of the gateway's processes (the supervisor and every worker, each also on its own), of the
upstream (nginx master + worker) and of wrk (its rusage from wait4), and the box's busy time and
its interrupt + softirq part (/proc/stat; here that time is also inside the processes' stime), so
the CPU split says who had the 2 cores ("other" is the rest: other processes, e.g. another
session's tests, and the idle gateway). Per worker: the
client connections it held halfway through the run (ss) and the requests it served (its
access-log lines carry `"worker": N`). Finally bench/listen_balance.py (inherited socket against
SO_REUSEPORT, bare trio processes).

Output in --out (default ${TMPDIR:-/tmp}/hxgwd-bench/<stamp>-workers): runs.jsonl (a line per
run), summary.md (also printed), balance.txt and balance.jsonl, facts.txt, commands.txt.
Everything started here is stopped by pid at exit; every run and wait is bounded.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import ab   # bench/ab.py: SHARED, answers, cpu_seconds, wrk_command, parse_wrk, gateway_config

REPO = ab.REPO
PYTHON = os.environ.get("HXGWD_PYTHON", "/work/main/.venv/bin/python")
GW_PORT = int(os.environ.get("BENCH_GATEWAY_PORT", "18610"))      # workers = 2
UP_PORT = int(os.environ.get("BENCH_UPSTREAM_PORT", "18611"))
W1_PORT = GW_PORT + 2                                             # workers = 1
BALANCE_PORT = GW_PORT + 3
KEY = "sk-hx-bench"
LIMITED_KEY = "sk-hx-limited"
LIMITED_TOML = """
[[keys]]
name = "bench-limited"
sha256 = "{sha}"
rpm = 100000000
"""
CLK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30


# --- processes and their CPU --------------------------------------------------------------------

def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def children(pid: int) -> list[int]:
    """Direct children of `pid` (hxgwd's workers, nginx's worker)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return sorted(out)


def cpu_of(pids: list[int]) -> dict[int, float]:
    return {pid: ab.cpu_seconds(pid) for pid in pids}


def box_times() -> tuple[float, float]:
    """CPU seconds the whole box spent busy (all cores) and, of that, in interrupts and softirqs
    (loopback TCP's receive path), from /proc/stat."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]          # minus idle and iowait
    return busy / CLK, (fields[5] + fields[6]) / CLK


def ss_split(port: int) -> dict[int, int]:
    """Established client connections on `port`, by the pid holding them."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=5).stdout
    return dict(collections.Counter(int(p) for p in re.findall(r"pid=(\d+)", out)))


class Gateway:
    """One hxgwd (its supervisor, or the single process), its log read and emptied after each run."""

    def __init__(self, name: str, workers: int, port: int, work: str) -> None:
        self.name, self.workers, self.port = name, workers, port
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        config = ab.gateway_config(port, UP_PORT, f"sqlite:///{self.dir}/usage.db")
        config = config.replace("[server]\n", f"[server]\nworkers = {workers}\n", 1)
        config += LIMITED_TOML.format(sha=sha256(LIMITED_KEY))
        self.config = os.path.join(self.dir, "hxgwd.toml")
        with open(self.config, "w") as f:
            f.write(config)
        os.chmod(self.config, 0o600)
        self.log_path = os.path.join(self.dir, "hxgwd.log")
        self.kept = collections.Counter()      # error / warning lines over the whole run
        self.proc: subprocess.Popen | None = None
        self.worker_pids: list[int] = []

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=REPO, HXBENCH_UPSTREAM_KEY="dummy")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([PYTHON, "-m", "hxgwd", "-c", self.config], env=env, stderr=log,
                                         stdout=subprocess.DEVNULL, cwd=self.dir)
        deadline = time.monotonic() + START_TIMEOUT
        while not (ab.answers(f"http://127.0.0.1:{self.port}/healthz")
                   and (self.workers == 1 or '"msg":"all workers serving"' in open(self.log_path).read())):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"{self.name}: hxgwd did not start (see {self.log_path})")
            time.sleep(0.1)
        self.worker_pids = self.pids_by_index() if self.workers > 1 else []

    def pids_by_index(self) -> list[int]:
        """The workers' pids in the order of their index (the access log's "worker": N), from the
        supervisor's "worker serving" lines."""
        found: dict[int, int] = {}
        for line in open(self.log_path, errors="replace"):
            m = re.search(r'"msg":"worker serving","worker":(\d+),"pid":(\d+)', line)
            if m:
                found[int(m.group(1))] = int(m.group(2))
        pids = [found.get(i) for i in range(self.workers)]
        if sorted(p for p in pids if p) != children(self.proc.pid):
            raise SystemExit(f"{self.name}: workers {found} in the log, {children(self.proc.pid)} running")
        return pids

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid] + self.worker_pids

    def check_workers(self) -> None:
        """A worker that died and was restarted would make the per-process numbers wrong."""
        if self.workers > 1 and children(self.proc.pid) != sorted(self.worker_pids):
            raise SystemExit(f"{self.name}: workers changed from {self.worker_pids} to {children(self.proc.pid)}")

    def take_log(self) -> dict[str, int]:
        """Requests served per worker since the last call (access-log lines); the file is emptied so
        that it stays small (the daemon appends, O_APPEND, so its next line lands at the new end)."""
        with open(self.log_path, "r+", errors="replace") as f:
            lines = f.read().splitlines()
            f.truncate(0)
        served: collections.Counter[str] = collections.Counter()
        for line in lines:
            if '"msg":"request"' in line:
                m = re.search(r'"worker":(\d+)', line)
                served[m.group(1) if m else "-"] += 1
            elif '"level":"error"' in line or '"level":"warning"' in line:
                self.kept[line[:300]] += 1
        return dict(served)

    def stop(self) -> None:
        """SIGTERM: the supervisor drains its workers; bounded, then SIGKILL (to the whole tree)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pids = self.pids()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=10)


def sha256(text: str) -> str:
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()


# --- one measured run ---------------------------------------------------------------------------

def run_wrk(cmd: list[str], seconds: float, port: int | None) -> tuple[dict, float, dict[int, int]]:
    """wrk, its CPU seconds (rusage from wait4: exact, and wrk is gone before /proc could be read
    after it), and the connection split on `port` sampled halfway through."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    watchdog = threading.Timer(seconds + 30, proc.kill)    # wrk ends itself after -d; never wait forever
    watchdog.start()
    split: dict[int, int] = {}
    try:
        if port is not None:
            time.sleep(seconds / 2)
            split = ss_split(port)
        out = proc.stdout.read()            # until wrk exits
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        watchdog.cancel()
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed ({proc.returncode}): {' '.join(cmd)}")
    return ab.parse_wrk(out), usage.ru_utime + usage.ru_stime, split


def measure(target: str, conns: int, seconds: float, gw: Gateway | None, key: str, upstream_pids: list[int],
            body: str) -> dict:
    port = gw.port if gw else UP_PORT
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    gw_pids = gw.pids() if gw else []
    before = cpu_of(gw_pids + upstream_pids)
    (busy0, irq0), t0 = box_times(), time.monotonic()
    w, wrk_cpu, split = run_wrk(ab.wrk_command(conns, seconds, body, url, key), seconds, port if gw else None)
    elapsed = time.monotonic() - t0
    after = cpu_of(gw_pids + upstream_pids)
    busy1, irq1 = box_times()
    busy, irq = busy1 - busy0, irq1 - irq0
    used = {pid: after[pid] - before[pid] for pid in after}
    n = w["requests"]
    row = {"target": target, "conns": conns, "requests": n, "rps": n / (w["duration_us"] / 1e6),
           "p50_ms": w["lat_us"]["p50"] / 1000, "p99_ms": w["lat_us"]["p99"] / 1000,
           "errors": sum(w[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout")),
           "elapsed_s": elapsed, "box_busy_s": busy, "irq_cpu_s": irq, "wrk_cpu_s": wrk_cpu,
           "upstream_cpu_s": sum(used[p] for p in upstream_pids)}
    if gw:
        time.sleep(0.2)                  # the last access-log lines
        gw.check_workers()
        sup = gw.proc.pid
        row["gw_cpu_s"] = sum(used[p] for p in gw_pids)
        row["sup_cpu_s"] = used[sup] if gw.workers > 1 else None
        row["worker_cpu_s"] = [used[p] for p in gw.worker_pids] or [used[sup]]
        row["worker_conns"] = [split.get(p, 0) for p in gw.worker_pids] or [split.get(sup, 0)]
        served = gw.take_log()
        row["worker_requests"] = [served.get(str(i), 0) for i in range(gw.workers)] if gw.workers > 1 \
            else [sum(served.values())]
    # the rest: other processes (another session's tests, the idle gateway). Not minus irq: on this
    # kernel the softirq time of loopback TCP is also in the stime of the process it ran in
    # (subtracting it made "other" negative on a quiet box)
    row["other_cpu_s"] = busy - wrk_cpu - row["upstream_cpu_s"] - row.get("gw_cpu_s", 0.0)
    return row


# --- the report ---------------------------------------------------------------------------------

def mean(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def per_req_us(row: dict, field: str) -> float | None:
    return None if row.get(field) is None else row[field] / row["requests"] * 1e6


def workers_us(row: dict) -> float:
    """The workers' CPU per request (the supervisor left out)."""
    return sum(row["worker_cpu_s"]) / row["requests"] * 1e6


def cores(row: dict, field: str) -> float:
    return row[field] / row["elapsed_s"]


def split(row: dict, field: str = "worker_conns") -> str:
    return "/".join(map(str, row[field]))


TARGETS64 = ("direct", "w1", "w1-limited", "w2", "w2-limited")


def summary_cells(rs: list[dict]) -> list[str]:
    """The cells of one target's line in the 64-connection table (– where it has no gateway)."""
    gw = "gw_cpu_s" in rs[0]
    dash = "–"
    sup = mean(per_req_us(r, "sup_cpu_s") for r in rs) if gw else float("nan")
    return [f"{mean(r['rps'] for r in rs):,.0f}", f"{mean(r['p50_ms'] for r in rs):.2f}",
            f"{mean(r['p99_ms'] for r in rs):.2f}",
            f"{mean(per_req_us(r, 'gw_cpu_s') for r in rs):.0f}" if gw else dash,
            f"{sup:.1f}" if sup == sup else dash,
            f"{mean(cores(r, 'gw_cpu_s') for r in rs):.2f}" if gw else dash,
            f"{mean(cores(r, 'wrk_cpu_s') for r in rs):.2f}", f"{mean(cores(r, 'upstream_cpu_s') for r in rs):.2f}",
            f"{mean(cores(r, 'irq_cpu_s') for r in rs):.2f}", f"{mean(cores(r, 'other_cpu_s') for r in rs):.2f}",
            f"{mean(r['box_busy_s'] / r['elapsed_s'] for r in rs) / 2:.0%}",
            ", ".join(split(r) for r in rs) if gw else ""]


def report(rows: list[dict], rounds: int) -> str:
    by: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    for r in rows:
        by[(r["target"], r["conns"])].append(r)
    rps = {t: [r["rps"] for r in by[(t, 64)]] for t in TARGETS64}
    ratio = [b / a for a, b in zip(rps["w1"], rps["w2"])]
    cpu_ratio = [per_req_us(b, "gw_cpu_s") / per_req_us(a, "gw_cpu_s") for a, b in zip(by[("w1", 64)], by[("w2", 64)])]
    lim_ratio = [b / a for a, b in zip(rps["w2"], rps["w2-limited"])]
    added = {t: [r["p50_ms"] - d["p50_ms"] for r, d in zip(by[(t, 1)], by[("direct", 1)])]
             for t in ("w1", "w2", "w2-limited")}
    even = [q for q, r in zip(ratio, by[("w2", 64)]) if max(r["worker_conns"]) <= 40]   # within 40/24
    out: list[str] = []
    w = out.append

    w("### The targets\n")
    w(f"- **req/s, w2/w1, 64 conns: ×{mean(ratio):.2f}** (rounds: {', '.join(f'×{q:.2f}' for q in ratio)}; "
      f"workers' connections {', '.join(split(r) for r in by[('w2', 64)])}; rounds with both workers at 24-40 "
      f"connections: {', '.join(f'×{q:.2f}' for q in even) or 'none'}). Target ≥ ×1.4: "
      f"{'met' if mean(ratio) >= 1.4 else 'not met'}")
    w(f"- **gateway CPU per request, w2/w1: ×{mean(cpu_ratio):.2f}** ({mean(per_req_us(r, 'gw_cpu_s') for r in by[('w2', 64)]):.0f} "
      f"against {mean(per_req_us(r, 'gw_cpu_s') for r in by[('w1', 64)]):.0f} µs, supervisor included). "
      f"Target within 10 %: {'met' if mean(cpu_ratio) <= 1.10 else 'not met'}")
    w(f"- **added p50 at 1 conn: w2 +{mean(added['w2']):.3f} ms, w1 +{mean(added['w1']):.3f} ms** "
      f"(direct {mean(r['p50_ms'] for r in by[('direct', 1)]):.3f} ms); "
      f"the limited key on w2 +{mean(added['w2-limited']):.3f} ms")
    w(f"- **host limiter, w2, 64 conns: ×{mean(lim_ratio):.2f} req/s** with the `rpm` key (see below)\n")

    w("### 64 connections (means of the rounds; CPU in cores of the 2, over the run; irq+softirq is "
      "also inside the processes' numbers)\n")
    w("| target | req/s | p50 ms | p99 ms | gateway µs/req | supervisor µs/req | gateway cores | wrk | upstream "
      "| (irq+softirq) | other | box busy | workers' connections (mid-run, per round) |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for target in TARGETS64:
        if by[(target, 64)]:
            w("| " + " | ".join([target] + summary_cells(by[(target, 64)])) + " |")
    w("")

    w("### per round, 64 connections: req/s (gateway µs/req) [workers' connections]\n")
    w("| round | " + " | ".join(TARGETS64) + " | w2/w1 req/s | w2/w1 CPU/req | w2-limited/w2 req/s |")
    w("|---|" + "---:|" * 8)
    for i in range(rounds):
        cells = []
        for t in TARGETS64:
            r = by[(t, 64)][i]
            cell = f"{r['rps']:,.0f}"
            if "gw_cpu_s" in r:
                cell += f" ({per_req_us(r, 'gw_cpu_s'):.0f})"
            if t.startswith("w2"):
                cell += f" [{split(r)}]"
            cells.append(cell)
        w(f"| {i + 1} | " + " | ".join(cells) + f" | ×{ratio[i]:.2f} | ×{cpu_ratio[i]:.2f} | ×{lim_ratio[i]:.2f} |")
    w(f"| mean | | | | | | ×{mean(ratio):.2f} | ×{mean(cpu_ratio):.2f} | ×{mean(lim_ratio):.2f} |")
    w("")

    w("### 1 connection: p50 ms (added over direct in the same round), gateway µs/req\n")
    w("| round | direct | w1 | w2 | w2-limited |")
    w("|---|---:|---:|---:|---:|")
    for i in range(rounds):
        cells = [f"{by[(t, 1)][i]['p50_ms']:.3f} (+{added[t][i]:.3f}), {per_req_us(by[(t, 1)][i], 'gw_cpu_s'):.0f} µs"
                 for t in ("w1", "w2", "w2-limited")]
        w(f"| {i + 1} | {by[('direct', 1)][i]['p50_ms']:.3f} | " + " | ".join(cells) + " |")
    w(f"| mean | | +{mean(added['w1']):.3f} | +{mean(added['w2']):.3f} | +{mean(added['w2-limited']):.3f} |")
    w("")

    w("### the host limiter (workers = 2; key with rpm = 100000000 against the key without limits)\n")
    w("| conns | req/s | gateway µs/req | supervisor µs/req | workers µs/req | admits per supervisor core "
      "| req/s per worker core | supervisor saturates at |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for conns in (64, 1):
        lim, free = by[("w2-limited", conns)], by[("w2", conns)]
        sup = mean(per_req_us(r, "sup_cpu_s") for r in lim)
        wk = mean(workers_us(r) for r in lim)
        w(f"| {conns} | {mean(r['rps'] for r in lim):,.0f} against {mean(r['rps'] for r in free):,.0f} "
          f"| {mean(per_req_us(r, 'gw_cpu_s') for r in lim):.0f} against {mean(per_req_us(r, 'gw_cpu_s') for r in free):.0f} "
          f"| {sup:.1f} against {mean(per_req_us(r, 'sup_cpu_s') for r in free):.1f} "
          f"| {wk:.0f} against {mean(workers_us(r) for r in free):.0f} "
          f"| {1e6 / sup:,.0f} | {1e6 / wk:,.0f} | ~{wk / sup:.1f} cores |")
    w(f"\nworkers = 1, 64 conns, the same two keys (the limiter in process, no channel): "
      f"{mean(per_req_us(r, 'gw_cpu_s') for r in by[('w1-limited', 64)]):.0f} against "
      f"{mean(per_req_us(r, 'gw_cpu_s') for r in by[('w1', 64)]):.0f} µs/req, "
      f"{mean(rps['w1-limited']):,.0f} against {mean(rps['w1']):,.0f} req/s. "
      "Saturation: cores ≈ (1 / supervisor CPU s per request) / (req/s of one worker core).")
    return "\n".join(out) + "\n"


# --- the run ------------------------------------------------------------------------------------

def rotate(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=6, help="seconds per wrk run")
    ap.add_argument("--out", help="results directory")
    ap.add_argument("--no-balance", action="store_true", help="skip bench/listen_balance.py")
    ap.add_argument("--balance-args", default="", help="extra arguments for listen_balance.py")
    a = ap.parse_args()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = a.out or os.path.join(os.environ.get("TMPDIR", "/tmp"), "hxgwd-bench", f"{stamp}-workers")
    os.makedirs(out, exist_ok=True)
    for port in (GW_PORT, UP_PORT, W1_PORT, BALANCE_PORT):
        if port_in_use(port):
            raise SystemExit(f"port {port} is in use (BENCH_GATEWAY_PORT / BENCH_UPSTREAM_PORT)")
    template = open(os.path.join(ab.SHARED, "bodies", "chat.json")).read()
    work = tempfile.mkdtemp(prefix="hxgwd-workers-")
    servers_env = dict(os.environ, BENCH_RUN_DIR=os.path.join(work, "servers"), BENCH_UPSTREAM_PORT=str(UP_PORT))
    gateways: dict[str, Gateway] = {}
    body = os.path.join(work, "chat.json")
    with open(body, "w") as f:
        f.write(template.replace("@CHAT_MODEL@", "fake-model"))
    facts = [f"date: {stamp}", f"rev: {subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}"
             f"{' (+ uncommitted changes)' if subprocess.run(['git', '-C', REPO, 'status', '--porcelain', 'hxgwd'], capture_output=True, text=True).stdout else ''}",
             f"cpus: {os.cpu_count()}, kernel {os.uname().release}", f"python: {PYTHON}",
             f"loadavg at start: {open('/proc/loadavg').read().split()[:3]}",
             f"ports: w2 {GW_PORT}, w1 {W1_PORT}, upstream {UP_PORT}, balance {BALANCE_PORT}"]
    rows: list[dict] = []
    try:
        gateways = {"w1": Gateway("w1", 1, W1_PORT, work), "w2": Gateway("w2", 2, GW_PORT, work)}
        subprocess.run(["bash", os.path.join(ab.SHARED, "servers.sh"), "start", "upstream"], env=servers_env,
                       check=True, stdout=subprocess.DEVNULL, timeout=60)
        nginx = int(open(os.path.join(work, "servers", "upstream.pid")).read())
        upstream_pids = [nginx] + children(nginx)
        for gw in gateways.values():
            gw.start()
        facts.append(f"pids: upstream {upstream_pids}, w1 {gateways['w1'].pids()}, "
                     f"w2 supervisor {gateways['w2'].proc.pid} workers {gateways['w2'].worker_pids}")
        plan64 = [("direct", None, KEY), ("w1", "w1", KEY), ("w1-limited", "w1", LIMITED_KEY),
                  ("w2", "w2", KEY), ("w2-limited", "w2", LIMITED_KEY)]
        plan1 = [("direct", None, KEY), ("w1", "w1", KEY), ("w2", "w2", KEY), ("w2-limited", "w2", LIMITED_KEY)]
        # warm-up: pools, the limiter's buckets, the key caches; not recorded
        for target, gw, key in plan64:
            measure(target, 64, 2, gateways.get(gw), key, upstream_pids, body)
        with open(os.path.join(out, "runs.jsonl"), "w") as jsonl:
            for r in range(a.rounds):
                for conns, plan in ((64, plan64), (1, plan1)):
                    for target, gw, key in rotate(plan, r):
                        row = measure(target, conns, a.duration, gateways.get(gw), key, upstream_pids, body)
                        row["round"] = r + 1
                        rows.append(row)
                        jsonl.write(json.dumps(row) + "\n")
                        jsonl.flush()
                        print(f"round {r + 1} {target:10s} -c{conns:<2d} {row['rps']:8,.0f} req/s p50 {row['p50_ms']:6.3f} "
                              f"p99 {row['p99_ms']:7.2f} ms"
                              + (f" gw {per_req_us(row, 'gw_cpu_s'):4.0f} µs/req" if "gw_cpu_s" in row else "")
                              + (f" sup {per_req_us(row, 'sup_cpu_s'):5.1f}" if row.get("sup_cpu_s") is not None else "")
                              + (f" conns {row['worker_conns']} reqs {row['worker_requests']}" if "worker_conns" in row else "")
                              + (f" ERRORS {row['errors']}" if row["errors"] else ""), flush=True)
        facts.append(f"loadavg at end: {open('/proc/loadavg').read().split()[:3]}")
        for gw in gateways.values():
            facts.append(f"{gw.name}: warning/error lines: {sum(gw.kept.values())}"
                         + "".join(f"\n  {n}x {line}" for line, n in gw.kept.most_common(5)))
    finally:
        for gw in gateways.values():
            gw.stop()
        subprocess.run(["bash", os.path.join(ab.SHARED, "servers.sh"), "stop", "upstream"], env=servers_env,
                       stdout=subprocess.DEVNULL, timeout=60)
        with open(os.path.join(out, "facts.txt"), "w") as f:
            f.write("\n".join(facts) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    summary = report(rows, a.rounds)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    print(summary, flush=True)
    commands = [" ".join([sys.argv[0]] + sys.argv[1:])]
    if not a.no_balance:
        cmd = [PYTHON, os.path.join(ab.HERE, "listen_balance.py"), "--port", str(BALANCE_PORT),
               "--json", os.path.join(out, "balance.jsonl")] + a.balance_args.split()
        commands.append(" ".join(cmd))
        balance = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        with open(os.path.join(out, "balance.txt"), "w") as f:
            f.write(balance.stdout + balance.stderr)
        print(balance.stdout + balance.stderr, flush=True)
    with open(os.path.join(out, "commands.txt"), "w") as f:
        f.write("\n".join(commands) + "\n")
    print("\n".join(open(os.path.join(out, "facts.txt")).read().splitlines()), flush=True)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
