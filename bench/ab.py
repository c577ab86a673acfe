#!/usr/bin/env python3
"""A/B of hxgwd builds on the chat benchmark: alternating rounds, so machine drift hits every build.

    bench/ab.py REV [REV ...] [--rounds 3] [--duration 5] [--no-store] [--no-log] [--http-parser h11]

REV: a git revision (hxgwd/ as committed there, via git archive) or "." (the working tree). Per
round and build: start hxgwd on bench/gateway.toml (port 4310, upstream rewritten to the static
nginx fake on BENCH_UPSTREAM_PORT, default 18280, which is started with ../shared/bench/servers.sh
if nothing answers there, and stopped again at the end), warm up, then wrk for --duration at 64
connections and at 1, and print: req/s, hxgwd CPU µs per request (utime + stime of the process,
all threads, from /proc), p99 at 64; p50 and p99 at 1. A closing line per build gives the means.

Used for the step-by-step measurements in the commit messages; bench/run.sh is the full comparison.
Machine noise here is a few percent between rounds; trust differences that hold in every round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _shared_bench() -> str:
    """$SHARED_BENCH, else ../shared/bench beside the repository, or beside the main checkout when
    this is a git worktree (as run.sh finds it)."""
    if "SHARED_BENCH" in os.environ:
        return os.environ["SHARED_BENCH"]
    beside = os.path.join(REPO, "..", "shared", "bench")
    if os.path.exists(os.path.join(beside, "run.py")):
        return beside
    common = subprocess.run(["git", "-C", REPO, "rev-parse", "--path-format=absolute", "--git-common-dir"],
                            capture_output=True, text=True).stdout.strip()
    return os.path.join(os.path.dirname(common), "..", "shared", "bench") if common else beside


SHARED = os.path.normpath(_shared_bench())
PORT = int(os.environ.get("BENCH_GATEWAY_PORT", "4310"))   # another, when two A/Bs share the machine
UP_PORT = int(os.environ.get("BENCH_UPSTREAM_PORT", "18280"))


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except Exception as exc:   # any HTTP answer at all will do
        return isinstance(exc, urllib.error.HTTPError)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_command(conns: int, seconds: float, body: str, url: str, key: str = "sk-hx-bench") -> list[str]:
    """wrk -t1 POSTing `body` to `url` with the shared openai.lua (which prints a WRKJSON line)."""
    return ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", os.path.join(SHARED, "wrk", "openai.lua"),
            url, "--", "POST", body, key]


def parse_wrk(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("WRKJSON "))[8:])


def wrk(conns: int, seconds: int, body: str) -> dict:
    url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
    return parse_wrk(subprocess.run(wrk_command(conns, seconds, body, url), capture_output=True, text=True,
                                    check=True).stdout)


def gateway_config(port: int, up_port: int, store: str) -> str:
    """bench/gateway.toml listening on `port`, its static backend on `up_port`, the usage store at
    `store` ("" = off): never the default [database], which is a system path."""
    config = open(os.path.join(HERE, "gateway.toml")).read()
    config = config.replace("127.0.0.1:4010", f"127.0.0.1:{port}").replace(":18080", f":{up_port}")
    config, n = re.subn(r'(?m)^url = "sqlite:[^"]*"', f'url = "{store}"', config)
    assert n == 1, "bench/gateway.toml: the [database] url line moved"
    return config


def source(rev: str, into: str) -> str:
    if rev == ".":
        return REPO
    os.makedirs(into)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "hxgwd"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("revs", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--no-store", action="store_true", help="usage store off ([database] url = \"\")")
    ap.add_argument("--no-log", action="store_true", help="access log off")
    ap.add_argument("--http-parser", help="[server] http_parser for every build (builds before it read with h11)")
    a = ap.parse_args()
    python = os.environ.get("HXGWD_PYTHON", os.path.join(REPO, ".venv", "bin", "python"))
    work = tempfile.mkdtemp(prefix="hxgwd-ab-")
    run_dir = os.path.join(work, "servers")
    started_upstream = False
    if not answers(f"http://127.0.0.1:{UP_PORT}/"):
        env = dict(os.environ, BENCH_RUN_DIR=run_dir, BENCH_UPSTREAM_PORT=str(UP_PORT))
        subprocess.run(["bash", os.path.join(SHARED, "servers.sh"), "start", "upstream"], env=env, check=True)
        started_upstream = True
    try:
        config = gateway_config(PORT, UP_PORT, "" if a.no_store else f"sqlite:///{work}/hxgwd.db")
        if a.no_log:
            config = config.replace("access_log = true", "access_log = false")
        config_path = os.path.join(work, "gateway.toml")
        open(config_path, "w").write(config)
        # builds from before [server] http_parser read with h11 and would refuse the key
        parser_config = config_path
        if a.http_parser:
            parser_config = os.path.join(work, "gateway-parser.toml")
            open(parser_config, "w").write(
                config.replace("[server]\n", f'[server]\nhttp_parser = "{a.http_parser}"\n', 1))
        body = os.path.join(work, "chat.json")
        template = open(os.path.join(SHARED, "bodies", "chat.json")).read()
        open(body, "w").write(template.replace("@CHAT_MODEL@", "fake-model"))
        trees = {rev: source(rev, os.path.join(work, f"src{i}")) for i, rev in enumerate(a.revs)}
        knows_parser = {rev: "http_parser" in open(os.path.join(tree, "hxgwd", "config", "model.py")).read()
                        for rev, tree in trees.items()}
        rows: dict[str, list[tuple[float, ...]]] = {rev: [] for rev in a.revs}
        for r in range(a.rounds):
            for rev, tree in trees.items():
                env = dict(os.environ, PYTHONPATH=tree, HXBENCH_UPSTREAM_KEY="dummy")
                with open(os.path.join(work, "hxgwd.log"), "wb") as log:
                    proc = subprocess.Popen([python, "-m", "hxgwd", "-c", parser_config if knows_parser[rev] else config_path], env=env, stderr=log, cwd=work)
                try:
                    deadline = time.monotonic() + 20
                    while not answers(f"http://127.0.0.1:{PORT}/healthz"):
                        if time.monotonic() > deadline or proc.poll() is not None:
                            raise SystemExit(f"{rev}: hxgwd did not start (see {work}/hxgwd.log)")
                        time.sleep(0.1)
                    wrk(64, 1, body)
                    before = cpu_seconds(proc.pid)
                    w64 = wrk(64, a.duration, body)
                    cpu = cpu_seconds(proc.pid) - before
                    w1 = wrk(1, a.duration, body)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=30)
                rps = w64["requests"] / (w64["duration_us"] / 1e6)
                row = (rps, cpu / w64["requests"] * 1e6, w64["lat_us"]["p99"] / 1000,
                       w1["lat_us"]["p50"] / 1000, w1["lat_us"]["p99"] / 1000)
                rows[rev].append(row)
                errors = w64["err_status"] + w1["err_status"] + w64["err_timeout"] + w1["err_timeout"]
                print(f"round {r + 1} {rev:12s} 64 conns {row[0]:7.0f} req/s {row[1]:5.0f} µs/req p99 {row[2]:6.2f} ms"
                      f" | 1 conn p50 {row[3]:.3f} ms p99 {row[4]:.3f} ms" + (f" ERRORS {errors}" if errors else ""),
                      flush=True)
        for rev, rs in rows.items():
            mean = [sum(col) / len(col) for col in zip(*rs)]
            print(f"mean    {rev:12s} 64 conns {mean[0]:7.0f} req/s {mean[1]:5.0f} µs/req p99 {mean[2]:6.2f} ms"
                  f" | 1 conn p50 {mean[3]:.3f} ms p99 {mean[4]:.3f} ms")
    finally:
        if started_upstream:
            subprocess.run(["bash", os.path.join(SHARED, "servers.sh"), "stop", "upstream"],
                           env=dict(os.environ, BENCH_RUN_DIR=run_dir, BENCH_UPSTREAM_PORT=str(UP_PORT)))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
