#!/usr/bin/env python3
"""Usage-recording cost: hxgwd requests/s with the usage store off, on SQLite, on PostgreSQL.

Started by bench/usage/run.sh (which picks the venv python); see bench/usage/README.md.

Three hxgwd processes run side by side, each on a config derived from bench/gateway.toml
(port HXGWD_USAGE_PORT, 4020, +1, +2), the same but for [database]:
    off         url = ""
    sqlite      a file in the run dir (the product default engine; WAL, synchronous=NORMAL)
    postgresql  a throwaway cluster started here (tests/servers.py PostgresServer, durable
                settings unless --pg-fast), migrated with `hxgwd db migrate`
plus an admin key for GET /admin/stats. All three point at the static nginx fake upstream of
../shared/bench (servers.sh start upstream; reused when something already answers on its port).

wrk (the shared wrk/openai.lua, bodies/*.json; 1 thread, --conns connections, like run.py)
drives each case (chat, embeddings: non-streamed) at each variant in turn, the order rotated
per round. During a run /admin/stats is polled every 0.25 s on the variant under load (on "off"
too, so every variant carries the same poll) for the peak of the channel (`queued`). After a
run the variant is left to settle (channel empty, rows == access-log lines), then its sink
statistics, the row count of its usage table and its access-log line count are recorded.

Machine load: before the start, waits (poll every 10 s, --wait-idle seconds at most) until no
other benchmark (bench/run.sh, wrk, shared run.py/baseline.sh) or package build (PyInstaller)
runs; during each run, the CPU used by processes that are not ours (/proc/stat total minus our
process trees) is recorded.

Only loopback; every wrk run is bounded (--duration, and a subprocess timeout); everything
started here (hxgwd x3, the upstream if started here, the PostgreSQL cluster) is stopped at the
end, by pid (the cluster with pg_ctl).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import io
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CLK = os.sysconf("SC_CLK_TCK")
ADMIN_KEY = "sk-hx-usage-admin"
BENCH_KEY = os.environ.get("HXGWD_BENCH_KEY", "sk-hx-bench")
CASES = {"chat": ("/v1/chat/completions", "chat.json"), "embeddings": ("/v1/embeddings", "embeddings.json")}
VARIANTS = ("off", "sqlite", "postgresql")
BUSY_PATTERNS = [("-f", "bench/run.sh"), ("-x", "wrk"), ("-f", "PyInstaller"),
                 ("-f", "shared/bench/run.py"), ("-f", "shared/bench/baseline.sh")]


def log(*a: object) -> None:
    print(f"[usage {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


# --- /proc -------------------------------------------------------------------------------------

def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def tree(root: int | None, kids: dict[int, list[int]]) -> list[int]:
    if not root:
        return []
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK
        except (OSError, IndexError, ValueError):
            pass
    return total


def main_thread_cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread (tid == pid): the event loop, without the worker threads."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_s() -> float:
    """CPU seconds spent busy by the whole machine since boot (all cores)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / CLK


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# --- waiting for a quiet machine -----------------------------------------------------------------

def ancestors() -> set[int]:
    out, p = set(), os.getpid()
    while p > 1:
        out.add(p)
        try:
            with open(f"/proc/{p}/stat") as f:
                p = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def foreign_busy() -> list[str]:
    mine = ancestors()
    found = []
    for flag, pat in BUSY_PATTERNS:
        r = subprocess.run(["pgrep", "-a", flag, pat], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            pid = int(line.split()[0])
            if pid not in mine and "bench/usage/" not in line:
                found.append(line[:160])
    return found


def wait_idle(limit: float, poll: float = 10.0) -> dict:
    start = time.monotonic()
    quiet = 0
    seen: list[str] = []
    while True:
        busy = foreign_busy()
        if not busy:
            quiet += 1
            if quiet >= 2:
                waited = time.monotonic() - start
                return {"waited_s": round(waited, 1), "seen_busy": seen[:5]}
        else:
            quiet = 0
            if not seen or busy[0] != seen[-1]:
                seen.append(busy[0])
            log(f"waiting for a quiet machine ({int(time.monotonic() - start)} s): {busy[0]}"
                + (f" (+{len(busy) - 1} more)" if len(busy) > 1 else ""))
        if time.monotonic() - start > limit:
            raise SystemExit(f"the machine did not become quiet within {limit:.0f} s; still running: {busy}")
        time.sleep(poll)


# --- HTTP ----------------------------------------------------------------------------------------

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, key: str, body: bytes | None = None, timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with OPENER.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e).encode()


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- the variants ----------------------------------------------------------------------------------

class Variant:
    def __init__(self, name: str, port: int, out: str) -> None:
        self.name, self.port = name, port
        self.dir = os.path.join(out, name)
        os.makedirs(self.dir, exist_ok=True)
        self.conf = os.path.join(self.dir, "gateway.toml")
        self.logfile = os.path.join(self.dir, "hxgwd.log")
        self.db_url = ""
        self.sqlite_path: str | None = None
        self.pg_dsn: str | None = None
        self.proc: subprocess.Popen | None = None
        self._log_offset = 0
        self.log_requests = 0          # "msg":"request" lines so far
        self.log_other: dict[str, int] = {}

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, template: str, upstream_port: int) -> None:
        text = template.replace("127.0.0.1:4010", f"127.0.0.1:{self.port}")
        text = text.replace("127.0.0.1:18080", f"127.0.0.1:{upstream_port}")
        # drop the [database] table of the template; ours goes at the end
        text = re.sub(r"(?ms)^\[database\]\n.*?(?=^\[)", "", text)
        spool = os.path.join(self.dir, "spool")
        admin_sha = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
        text += (f'\n# --- bench/usage: variant "{self.name}" ---\n[database]\nurl = "{self.db_url}"\n'
                 f'spool_dir = "{spool}"\n\n'
                 f'[[keys]]\nname = "usage-admin"\nsha256 = "{admin_sha}"\nadmin = true\n')
        with open(self.conf, "w") as f:
            f.write(text)
        os.chmod(self.conf, 0o600)

    def start(self, py: str, src: str, env: dict[str, str]) -> None:
        if port_busy(self.port):
            raise SystemExit(f"port {self.port} is in use (set HXGWD_USAGE_PORT)")
        errf = open(self.logfile, "wb")
        self.proc = subprocess.Popen([py, "-m", "hxgwd", "-c", self.conf], cwd=src, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf)
        errf.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with open(self.logfile, "rb") as f:
                if b'"msg":"listening"' in f.read():
                    log(f"{self.name}: hxgwd pid {self.proc.pid} on {self.base} (database {self.db_url or 'off'})")
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        with open(self.logfile) as f:
            sys.stderr.write(f.read()[-3000:])
        raise SystemExit(f"{self.name}: hxgwd did not start")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        log(f"{self.name}: hxgwd stopped (pid {self.proc.pid}, exit {self.proc.returncode})")

    def stats(self) -> dict | None:
        status, body = http("GET", self.base + "/admin/stats", ADMIN_KEY, timeout=5)
        if status != 200:
            return None
        return json.loads(body)

    def rows(self) -> int | None:
        if self.sqlite_path:
            con = sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True, timeout=10)
            try:
                return con.execute("SELECT count(*) FROM usage").fetchone()[0]
            finally:
                con.close()
        if self.pg_dsn:
            import psycopg
            with psycopg.connect(self.pg_dsn, connect_timeout=5) as con:
                return con.execute("SELECT count(*) FROM usage").fetchone()[0]
        return None

    def scan_log(self) -> None:
        """Count access-log lines (and other levels) written since the last scan, whole lines only."""
        with open(self.logfile, "rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            if b'"msg":"request"' in line:
                self.log_requests += 1
            else:
                m = re.search(rb'"level":"(\w+)"', line)
                lvl = m.group(1).decode() if m else "unparsed"
                if lvl != "info":
                    self.log_other[lvl] = self.log_other.get(lvl, 0) + 1
        self._log_offset += end


# --- PostgreSQL -------------------------------------------------------------------------------------

def start_postgres(fast: bool):
    sys.path.insert(0, REPO)
    from tests.servers import PostgresServer

    class BenchPostgres(PostgresServer):
        """PostgresServer with the server's default durability (fsync, synchronous_commit on):
        what a production database does; --pg-fast keeps the test suite's fsync=off settings."""

        def _ctl(self, action: str) -> None:
            if fast or action != "start":
                return super()._ctl(action)
            opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base}"
            args = [f"{self.bindir}/pg_ctl", "-D", f"{self.base}/data", "-l", f"{self.base}/server.log",
                    "-w", "-t", "30", "-o", opts, "start"]
            subprocess.run(self._as_user + args, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    return BenchPostgres.start()


def pg_settings(dsn: str) -> str:
    import psycopg
    with psycopg.connect(dsn, connect_timeout=5) as con:
        ver = con.execute("SHOW server_version").fetchone()[0]
        vals = {k: con.execute(f"SHOW {k}").fetchone()[0]
                for k in ("fsync", "synchronous_commit", "shared_buffers", "wal_level")}
    return f"PostgreSQL {ver}; " + ", ".join(f"{k}={v}" for k, v in vals.items())


# --- wrk --------------------------------------------------------------------------------------------

class Sampler(threading.Thread):
    """Polls /admin/stats of one variant every `every` s; keeps the peak of usage.queued."""

    def __init__(self, variant: Variant, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.v, self.every = variant, every
        self.stop_evt = threading.Event()
        self.max_queued = 0
        self.samples = 0
        self.failures = 0
        self.max_spooled = 0

    def run(self) -> None:
        while not self.stop_evt.wait(self.every):
            try:
                s = self.v.stats()
            except Exception:   # noqa: BLE001
                s = None
            if s is None:
                self.failures += 1
                continue
            self.samples += 1
            u = s.get("usage")
            if u:
                self.max_queued = max(self.max_queued, u.get("queued", 0))
                self.max_spooled = max(self.max_spooled, u.get("spooled", 0))


def run_wrk(args, v: Variant, case: str, duration: float, body: str) -> dict:
    path, _ = CASES[case]
    cmd = ["wrk", "-t", "1", "-c", str(args.conns), "-d", f"{duration:g}s", "--timeout", "10s",
           "-s", os.path.join(args.shared, "wrk", "openai.lua"), v.base + path, "--", "POST", body, BENCH_KEY]
    env = {k: val for k, val in os.environ.items() if "proxy" not in k.lower()}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 60)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"wrk rc={p.returncode}: {(p.stderr or p.stdout)[-500:]}")
    return json.loads(line[len("WRKJSON "):])


# --- main ----------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load per variant and case before round 1")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--cases", default="chat,embeddings")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rev", help="measure hxgwd as committed at REV (git archive), not the working tree")
    ap.add_argument("--out", help="run dir (default ${TMPDIR:-/tmp}/hxgwd-bench-usage/<stamp>)")
    ap.add_argument("--results", help="also copy the summary, runs.jsonl, facts and configs here")
    ap.add_argument("--wait-idle", type=float, default=1800, help="max seconds to wait for a quiet machine (0: do not wait)")
    ap.add_argument("--pg-fast", action="store_true", help="PostgreSQL with fsync=off, synchronous_commit=off (the test suite's cluster)")
    ap.add_argument("--settle", type=float, default=30.0, help="max seconds for a variant to settle after a run")
    ap.add_argument("--profile", type=float, default=0, metavar="SECS",
                    help="after the rounds, py-spy each variant under chat load: SECS s all threads, then SECS s GIL holders only")
    ap.add_argument("--python", default=os.environ.get("HXGWD_PYTHON", os.path.join(REPO, ".venv", "bin", "python")))
    ap.add_argument("--shared", default=os.environ.get("SHARED_BENCH", os.path.join(REPO, "..", "shared", "bench")))
    ap.add_argument("--config", default=os.environ.get("HXGWD_CONFIG", os.path.join(REPO, "bench", "gateway.toml")))
    args = ap.parse_args()
    args.shared = os.path.abspath(args.shared)
    cases = [c for c in args.cases.split(",") if c]
    names = [n for n in args.variants.split(",") if n]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"unknown case {c}")
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n}")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = os.path.abspath(args.out or os.path.join(os.environ.get("TMPDIR", "/tmp"), "hxgwd-bench-usage", stamp))
    os.makedirs(out, exist_ok=True)
    log(f"run dir {out}")

    # --- a quiet machine first -------------------------------------------------------------
    idle = {"waited_s": 0, "seen_busy": []}
    if args.wait_idle > 0:
        idle = wait_idle(args.wait_idle)
        log(f"machine quiet after {idle['waited_s']} s of waiting; loadavg {loadavg()}")

    started_upstream = False
    pg = None
    variants: list[Variant] = []
    # own port (not servers.sh's 18080): an upstream we stop at the end is never one that another
    # benchmark started meanwhile took for its own and reused
    up_port = int(os.environ.get("HXGWD_USAGE_UPSTREAM_PORT", "18180"))
    run_dir = os.path.join(out, "servers")
    servers_env = dict(os.environ, BENCH_RUN_DIR=run_dir, BENCH_UPSTREAM_PORT=str(up_port))
    runs: list[dict] = []
    facts: dict = {}
    try:
        # --- the code under test ---------------------------------------------------------------
        src = REPO
        if args.rev:
            src = os.path.join(out, "src")
            os.makedirs(src, exist_ok=True)
            tar = subprocess.run(["git", "-C", REPO, "archive", args.rev, "hxgwd"], check=True, capture_output=True).stdout
            tarfile.open(fileobj=io.BytesIO(tar)).extractall(src)
            code = f"{subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', args.rev], capture_output=True, text=True).stdout.strip()} (git archive, --rev {args.rev})"
        else:
            head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "hxgwd"], capture_output=True, text=True).stdout.strip()
            code = f"working tree at {head}" + (" + uncommitted changes in hxgwd/" if dirty else " (hxgwd/ clean)")
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONPATH"] = src + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("HXBENCH_UPSTREAM_KEY", "sk-fake-upstream")

        # --- upstream --------------------------------------------------------------------------
        servers = os.path.join(args.shared, "servers.sh")
        if port_busy(up_port):
            log(f"upstream: port {up_port} already served by another process; reusing it (left running)")
            up_pid = None
        else:
            subprocess.run(["bash", servers, "start", "upstream"], env=servers_env, check=True,
                           stdout=sys.stderr)
            started_upstream = True
            up_pid = read_pid(os.path.join(run_dir, "upstream.pid"))

        # --- configs, PostgreSQL, hxgwd ------------------------------------------------------------
        with open(args.config) as f:
            template = f.read()
        port0 = int(os.environ.get("HXGWD_USAGE_PORT", "4020"))
        for i, n in enumerate(names):
            v = Variant(n, port0 + i, out)
            if n == "sqlite":
                v.sqlite_path = os.path.join(v.dir, "state", "hxgwd.db")
                v.db_url = f"sqlite:///{v.sqlite_path}"
            elif n == "postgresql":
                log("postgresql: starting a throwaway cluster" + (" (fsync=off)" if args.pg_fast else " (durable defaults)"))
                pg = start_postgres(args.pg_fast)
                v.pg_dsn = pg.dsn
                v.db_url = pg.dsn
                facts["postgresql"] = pg_settings(pg.dsn) + f"; data dir {pg.base} (removed at the end)"
                log(f"postgresql: {facts['postgresql']}")
            v.write_config(template, up_port)
            if n != "off":
                r = subprocess.run([args.python, "-m", "hxgwd", "db", "migrate", "-c", v.conf], cwd=src, env=env,
                                   capture_output=True, text=True, timeout=120)
                if r.returncode != 0:
                    raise SystemExit(f"{n}: db migrate failed: {r.stdout}{r.stderr}")
                log(f"{n}: db migrate: {(r.stdout + r.stderr).strip().splitlines()[-1:]}")
            variants.append(v)
        for v in variants:
            v.start(args.python, src, env)
        pg_pid = read_pid(os.path.join(pg.base, "data", "postmaster.pid")) if pg else None

        # --- smoke: one answer per variant and case; the stats endpoint ------------------------------
        bodies = {}
        for c in cases:
            with open(os.path.join(args.shared, "bodies", CASES[c][1])) as f:
                text = f.read().replace("@CHAT_MODEL@", "fake-model").replace("@EMBED_MODEL@", "fake-embed")
            bodies[c] = os.path.join(out, CASES[c][1])
            with open(bodies[c], "w") as f:
                f.write(text)
        for v in variants:
            for c in cases:
                status, body = http("POST", v.base + CASES[c][0], BENCH_KEY, open(bodies[c], "rb").read())
                if status != 200:
                    raise SystemExit(f"{v.name} {c}: HTTP {status}: {body[:300]!r}")
            s = v.stats()
            if s is None:
                raise SystemExit(f"{v.name}: GET /admin/stats failed")
            if (v.name == "off") != ("usage" not in s):
                raise SystemExit(f"{v.name}: unexpected /admin/stats: {s}")

        py_ver = subprocess.run([args.python, "-c", "import sys, trio, h11; print(sys.version.split()[0], trio.__version__, h11.__version__)"],
                                capture_output=True, text=True).stdout.split()
        facts.update({
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "hxgwd": code,
            "cpu": f"{os.cpu_count()} x " + next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"),
            "kernel": os.uname().release,
            "python": f"{py_ver[0]}; trio {py_ver[1]}; h11 {py_ver[2]}" if len(py_ver) == 3 else "?",
            "wrk": subprocess.run(["dpkg-query", "-W", "-f=${Version}", "wrk"], capture_output=True, text=True).stdout,
            "upstream": f"static nginx 127.0.0.1:{up_port}" + (" (started here)" if started_upstream else " (reused, not ours)"),
            "settings": f"rounds={args.rounds} duration={args.duration:g}s warmup={args.warmup:g}s conns={args.conns} "
                        f"wrk threads 1; cases {','.join(cases)}; variants {','.join(names)}",
            "waited_for_quiet_machine_s": idle["waited_s"],
            "busy_before": idle["seen_busy"],
            "loadavg_start": loadavg(),
            "databases": {v.name: (v.db_url if not v.pg_dsn else "postgresql (throwaway cluster)") or "off" for v in variants},
            "queue_size": "10000 (default), batch_size 1000 (default), spool_fsync batch (default)",
        })
        for k, val in facts.items():
            log(f"{k}: {val}")

        # --- warmup --------------------------------------------------------------------------------------
        if args.warmup > 0:
            for c in cases:
                for v in variants:
                    run_wrk(args, v, c, args.warmup, bodies[c])
            log(f"warmed up: {args.warmup:g} s per variant and case")

        # --- rounds ----------------------------------------------------------------------------------------
        jsonl = open(os.path.join(out, "runs.jsonl"), "w")
        me = os.getpid()
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for c in cases:
                for v in order:
                    v.scan_log()
                    log0 = v.log_requests
                    rows0 = v.rows()
                    st0 = (v.stats() or {}).get("usage") or {}
                    kids = children_map()
                    ours = lambda k: tree(me, k) + tree(pg_pid, k) + tree(up_pid, k)  # noqa: E731
                    hx0, pg0, all0, ours0 = cpu_s(tree(v.proc.pid, kids)), cpu_s(tree(pg_pid, kids)), machine_busy_s(), cpu_s(ours(kids))
                    main0 = main_thread_cpu_s(v.proc.pid)
                    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    sampler = Sampler(v)
                    sampler.start()
                    t0 = time.monotonic()
                    try:
                        w = run_wrk(args, v, c, args.duration, bodies[c])
                    finally:
                        sampler.stop_evt.set()
                        sampler.join()
                    wall = time.monotonic() - t0
                    kids = children_map()
                    hx1, pg1, all1 = cpu_s(tree(v.proc.pid, kids)), cpu_s(tree(pg_pid, kids)), machine_busy_s()
                    main1 = main_thread_cpu_s(v.proc.pid)
                    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    # wrk has been reaped: its CPU is in RUSAGE_CHILDREN, not in our tree any more
                    ours1 = cpu_s(ours(kids)) + (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
                    busy_others = foreign_busy()
                    # settle: channel empty and rows == access-log lines (bounded)
                    deadline = time.monotonic() + args.settle
                    while True:
                        # stats first (that request is logged and recorded too), then the log and
                        # the table once it had time to be written: no request in between
                        st = (v.stats() or {}).get("usage")
                        time.sleep(0.3)
                        v.scan_log()
                        rows = v.rows()
                        settled = st is None or (st.get("queued") == 0 and rows == v.log_requests)
                        if settled or time.monotonic() > deadline:
                            break
                    if st is not None:   # again: `written` of the check above may miss the batch then in flight
                        st = (v.stats() or {}).get("usage") or st
                        time.sleep(0.3)
                    settle_s = time.monotonic() - t0 - wall
                    n = w["requests"]
                    errs = {k: w[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout") if w[k]}
                    rec = {
                        "round": r + 1, "case": c, "variant": v.name,
                        "rps": round(n / (w["duration_us"] / 1e6), 1), "requests": n, "errors": errs,
                        "p50_ms": w["lat_us"]["p50"] / 1000, "p99_ms": w["lat_us"]["p99"] / 1000,
                        "hx_cpu_us_per_req": round((hx1 - hx0) / n * 1e6, 1) if n else None,
                        "hx_main_cpu_us_per_req": round((main1 - main0) / n * 1e6, 1) if n else None,
                        "hx_main_cpu_pct": round((main1 - main0) / wall * 100, 1),
                        "pg_cpu_us_per_req": round((pg1 - pg0) / n * 1e6, 1) if (n and pg_pid and v.name == "postgresql") else None,
                        "machine_cpu_pct": round((all1 - all0) / wall * 100, 1),
                        "others_cpu_pct": round(max(0.0, (all1 - all0) - (ours1 - ours0)) / wall * 100, 1),
                        "others_running": busy_others, "loadavg": loadavg(),
                        "log_lines": v.log_requests - log0,
                        "rows": (rows - rows0) if rows is not None and rows0 is not None else None,
                        "rows_total": rows, "log_total": v.log_requests, "settled": settled,
                        "settle_s": round(settle_s, 2),
                        "max_queued": sampler.max_queued if st is not None else None,
                        "stats_samples": sampler.samples, "stats_failures": sampler.failures,
                        "usage": st,
                        "usage_delta": {k: st.get(k, 0) - st0.get(k, 0) for k in ("written", "spooled", "replayed", "dropped", "rejected")} if st else None,
                    }
                    runs.append(rec)
                    jsonl.write(json.dumps(rec, separators=(",", ":")) + "\n")
                    jsonl.flush()
                    u = rec["usage_delta"]
                    log(f"round {r + 1} {c:10s} {v.name:10s} {rec['rps']:8.1f} req/s  p99 {rec['p99_ms']:.1f} ms  "
                        f"hx {rec['hx_cpu_us_per_req']} us/req (main thread {rec['hx_main_cpu_us_per_req']}, {rec['hx_main_cpu_pct']}% busy)  others {rec['others_cpu_pct']}% CPU  "
                        + (f"queued<= {rec['max_queued']} written+{u['written']} spooled+{u['spooled']} dropped+{u['dropped']} "
                           f"rows+{rec['rows']} log+{rec['log_lines']}" if u else f"log+{rec['log_lines']}")
                        + ("" if settled else "  NOT SETTLED") + (f"  errors {errs}" if errs else ""))
        jsonl.close()
        if args.profile > 0:
            facts["profile"] = {v.name: profile(args, v, bodies["chat"] if "chat" in bodies else next(iter(bodies.values())), out)
                                for v in variants}
        facts["loadavg_end"] = loadavg()
        facts["rss_mib_end"] = {v.name: round(rss_mib(v.proc.pid), 1) for v in variants}
        final = {v.name: (v.stats() or {}).get("usage") for v in variants}
        time.sleep(1.0)   # the last stats request: logged and written
        for v in variants:
            v.scan_log()
        facts["log_non_info_lines"] = {v.name: v.log_other for v in variants}
        facts["final_usage_stats"] = final
        facts["final_rows_vs_log"] = {v.name: {"rows": v.rows(), "access_log_lines": v.log_requests} for v in variants}
    finally:
        for v in variants:
            try:
                v.stop()
            except Exception as exc:   # noqa: BLE001
                log(f"{v.name}: stop failed: {exc}")
        if pg is not None:
            pg.close()
            log(f"postgresql: cluster stopped and removed ({pg.base})")
        if started_upstream:
            subprocess.run(["bash", os.path.join(args.shared, "servers.sh"), "stop", "upstream"], env=servers_env,
                           stdout=sys.stderr)

    summary = summarize(runs, names, cases, facts, args)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    with open(os.path.join(out, "facts.json"), "w") as f:
        json.dump(facts, f, indent=1, default=str)
    print(summary)
    if args.results:
        os.makedirs(args.results, exist_ok=True)
        for name in ("summary.md", "facts.json", "runs.jsonl"):
            with open(os.path.join(out, name), "rb") as src_f, open(os.path.join(args.results, name), "wb") as dst:
                dst.write(src_f.read())
        for v in variants:
            with open(v.conf) as src_f, open(os.path.join(args.results, f"gateway-{v.name}.toml"), "w") as dst:
                dst.write(src_f.read().replace(out, "<run dir>"))
        log(f"summary, runs and configs copied to {args.results}")
    log(f"results in {out}")
    return 0


def profile(args, v: Variant, body: str, out: str) -> dict:
    """py-spy (from the hxgwd venv) on one variant under chat load: all non-idle threads, then only
    the thread holding the GIL. Returns the share of samples per thread kind and the top frames
    (self time) outside the event-loop thread."""
    spy = os.path.join(os.path.dirname(args.python), "py-spy")
    if not os.path.exists(spy):
        log("profile: no py-spy next to the hxgwd python; skipped")
        return {}
    secs = args.profile
    path, _ = CASES["chat"]
    wrk = subprocess.Popen(["wrk", "-t", "1", "-c", str(args.conns), "-d", f"{2 * secs + 6:g}s", "--timeout", "10s",
                            "-s", os.path.join(args.shared, "wrk", "openai.lua"), v.base + path, "--", "POST", body, BENCH_KEY],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result: dict = {}
    try:
        time.sleep(2)
        for kind, extra in (("threads", []), ("gil", ["--gil"])):
            f = os.path.join(out, f"profile-{v.name}-{kind}.txt")
            subprocess.run([spy, "record", "--pid", str(v.proc.pid), "--duration", f"{secs:g}", "--rate", "200",
                            "--format", "raw", "--threads", *extra, "-o", f], timeout=secs + 60,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result[kind] = profile_summary(f)
            log(f"profile {v.name} ({kind}): {result[kind]['share']}")
    finally:
        try:
            wrk.wait(timeout=2 * secs + 30)
        except subprocess.TimeoutExpired:
            wrk.kill()
            wrk.wait()
    return result


def profile_summary(path: str, top: int = 12) -> dict:
    share: dict[str, int] = {}
    selfs: dict[str, int] = {}
    total = 0
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return {"share": {}, "top_outside_main": []}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        head, _, frames = stack.partition(";")
        name = head.split(": ", 1)[1] if ": " in head else head
        kind = "event loop (MainThread)" if name == "MainThread" else "worker threads"
        share[kind] = share.get(kind, 0) + n
        total += n
        if kind != "event loop (MainThread)" and frames:
            leaf = frames.split(";")[-1]
            leaf = re.sub(r" \((.*/)?([^/]+)\)$", r" (\2)", leaf)
            selfs[leaf] = selfs.get(leaf, 0) + n
    return {"samples": total,
            "share": {k: f"{v / total * 100:.1f}%" for k, v in share.items()} if total else {},
            "top_outside_main": [f"{k}: {v / total * 100:.1f}%" for k, v in sorted(selfs.items(), key=lambda kv: -kv[1])[:top]]}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict], names: list[str], cases: list[str], facts: dict, args) -> str:
    L = [f"# hxgwd usage-recording cost ({facts.get('date', '?')})", ""]
    L.append(f"hxgwd {facts.get('hxgwd')}; {facts.get('settings')}; {facts.get('cpu')}; "
             f"python {facts.get('python')}; wrk {facts.get('wrk')}; upstream {facts.get('upstream')}")
    if "postgresql" in facts:
        L.append(f"PostgreSQL: {facts['postgresql']}")
    L.append(f"loadavg at start {facts.get('loadavg_start')}, at end {facts.get('loadavg_end')}; "
             f"waited {facts.get('waited_for_quiet_machine_s')} s for a quiet machine")
    L.append("")
    L.append("| case | variant | req/s (median) | min-max | vs off (median of per-round ratios) | per-round ratios "
             "| vs off, quiet rounds only (n) "
             "| p50 ms | p99 ms | hxgwd CPU us/req (main thread) | PG CPU us/req | peak queued | spooled | dropped | rows == log lines after each run | others' CPU % (max) |")
    L.append("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    verdict = {"throughput": True, "channel": True, "rows": True}
    worst: dict[str, float] = {}
    clean_all = True
    for c in cases:
        off = {r["round"]: r["rps"] for r in runs if r["case"] == c and r["variant"] == "off"}
        # rounds in which no run of this case saw other processes use >= 10% of a core
        rounds_c = {r["round"] for r in runs if r["case"] == c}
        clean = {k for k in rounds_c if all(r["others_cpu_pct"] < 10 and not r["others_running"]
                                            for r in runs if r["case"] == c and r["round"] == k)}
        clean_all = clean_all and clean == rounds_c
        for n in names:
            rs = [r for r in runs if r["case"] == c and r["variant"] == n]
            if not rs:
                continue
            rps = [r["rps"] for r in rs]
            ratios = [r["rps"] / off[r["round"]] for r in rs if r["round"] in off and n != "off"]
            ratio = med(ratios)
            ratios_clean = [r["rps"] / off[r["round"]] for r in rs if r["round"] in off and r["round"] in clean and n != "off"]
            ratio_clean = med(ratios_clean)
            if n != "off" and ratio is not None:
                worst[f"{c}/{n}"] = ratio
                if ratio < 0.90:
                    verdict["throughput"] = False
            spooled = sum((r["usage_delta"] or {}).get("spooled", 0) for r in rs) if n != "off" else None
            dropped = sum((r["usage_delta"] or {}).get("dropped", 0) for r in rs) if n != "off" else None
            peak = max((r["max_queued"] or 0) for r in rs) if n != "off" else None
            rows_ok = all(r["rows_total"] == r["log_total"] and r["settled"] for r in rs) if n != "off" else None
            if n != "off":
                if spooled or dropped:
                    verdict["channel"] = False
                if not rows_ok:
                    verdict["rows"] = False
            rows_txt = "-" if rows_ok is None else ("yes (" + f"{sum(r['rows'] or 0 for r in rs):,}" + " rows)" if rows_ok else
                                                   "NO: " + ", ".join(f"r{r['round']} {r['rows_total']} vs {r['log_total']}" for r in rs if r["rows_total"] != r["log_total"] or not r["settled"]))
            fmt = lambda x, d=1: "-" if x is None else f"{x:,.{d}f}"  # noqa: E731
            L.append(f"| {c} | {n} | {fmt(med(rps))} | {fmt(min(rps), 0)}-{fmt(max(rps), 0)} | "
                     f"{'-' if n == 'off' else f'x{ratio:.3f} ({(ratio - 1) * 100:+.1f}%)'} | "
                     f"{'-' if n == 'off' else ' '.join(f'{x:.2f}' for x in ratios)} | "
                     f"{'-' if n == 'off' or ratio_clean is None else f'x{ratio_clean:.3f}'} ({len(clean)}) | "
                     f"{fmt(med([r['p50_ms'] for r in rs]), 2)} | {fmt(med([r['p99_ms'] for r in rs]), 2)} | "
                     f"{fmt(med([r['hx_cpu_us_per_req'] for r in rs]), 0)} ({fmt(med([r.get('hx_main_cpu_us_per_req') for r in rs]), 0)}) | {fmt(med([r['pg_cpu_us_per_req'] for r in rs]), 0)} | "
                     f"{'-' if peak is None else peak} | {'-' if spooled is None else spooled} | {'-' if dropped is None else dropped} | "
                     f"{rows_txt} | {max(r['others_cpu_pct'] for r in rs):.1f} |")
    L.append("")
    L.append("Quiet round: no run of that case in that round saw other processes use >= 10% of a core "
             "(`others' CPU`) or another benchmark running at its end."
             + ("" if clean_all else " Some rounds were not quiet: compare both ratio columns."))
    errors = sum(sum(r["errors"].values()) for r in runs)
    contended = [f"r{r['round']} {r['case']} {r['variant']}: {r['others_running'][:2]}" for r in runs if r["others_running"]]
    L += ["", "## Targets", ""]
    L.append(f"- recording costs < 10% of throughput: **{'met' if verdict['throughput'] else 'NOT met'}** "
             f"(worst: {min(worst.values()) if worst else float('nan'):.3f} of off; "
             + ", ".join(f"{k} x{v:.3f}" for k, v in worst.items()) + ")")
    L.append(f"- writer keeps up, channel never full (spooled 0, dropped 0 in every run): **{'met' if verdict['channel'] else 'NOT met'}**")
    L.append(f"- rows in the database == access-log lines after every run: **{'yes' if verdict['rows'] else 'NO'}**")
    L.append(f"- wrk errors: {errors}; runs with another benchmark running at their end: {len(contended)}"
             + ("" if not contended else " (" + "; ".join(contended[:5]) + ")"))
    fin = facts.get("final_usage_stats") or {}
    L += ["", "## Sink statistics at the end (GET /admin/stats, usage)", ""]
    for n, s in fin.items():
        L.append(f"- {n}: {json.dumps(s) if s else 'no usage store'}")
    rv = facts.get("final_rows_vs_log") or {}
    L.append("- rows vs access-log lines (whole run: smoke, warmup, measured runs and the /admin/stats polls, which are requests too): "
             + "; ".join(f"{n} {d['rows']} vs {d['access_log_lines']}" for n, d in rv.items()))
    L.append(f"- non-info log lines: {facts.get('log_non_info_lines')}; RSS at the end (MiB): {facts.get('rss_mib_end')}")
    if facts.get("profile"):
        L += ["", "## py-spy under chat load (share of samples; self time outside the event-loop thread)", ""]
        for n, p in facts["profile"].items():
            for kind, d in p.items():
                L.append(f"- {n}, {'all non-idle threads' if kind == 'threads' else 'GIL holder only'} ({d.get('samples')} samples): "
                         f"{d.get('share')}; top outside main: {'; '.join(d.get('top_outside_main', [])[:8])}")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
