#!/usr/bin/env python3
"""TLS termination's cost: one hxgwd, on bench/gateway.toml, listening plain on PORT and with TLS
on PORT+1 (a throwaway self-signed certificate made with openssl), and wrk alternating between the
two listeners, so that machine drift hits both alike.

    SHARED_BENCH=/work/shared/bench bench/tls_cost.py [--rounds 3] [--duration 5] [--key ec|rsa]

Per round and listener: keep-alive at 64 connections (req/s, hxgwd CPU µs per request from /proc,
p99) and at 1 (p50, p99); then a new connection per request (`Connection: close`, 8 connections:
req/s and CPU µs per request, so the handshake's cost). The upstream is the static nginx fake of
../shared/bench on BENCH_UPSTREAM_PORT (default 18290 here: not the port bench/ab.py shares).
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
SHARED = os.environ.get("SHARED_BENCH", os.path.join(REPO, "..", "shared", "bench"))
PORT = 4320
UP_PORT = int(os.environ.get("BENCH_UPSTREAM_PORT", "18290"))


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except Exception as exc:   # any HTTP answer at all will do
        return isinstance(exc, urllib.error.HTTPError)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, conns: int, seconds: int, body: str, *extra: str) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", *extra, "-s",
                          os.path.join(SHARED, "wrk", "openai.lua"), f"{url}/v1/chat/completions",
                          "--", "POST", body, "sk-hx-bench"], capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("WRKJSON "))[8:])


def make_cert(work: str, kind: str) -> tuple[str, str]:
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if kind == "ec" else ["-newkey", "rsa:2048"]
    subprocess.run(["openssl", "req", "-x509", *newkey, "-nodes", "-days", "2", "-keyout", key, "-out", cert,
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    os.chmod(key, 0o600)
    return cert, key


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--key", choices=("ec", "rsa"), default="ec", help="P-256 or RSA 2048 certificate")
    a = ap.parse_args()
    python = os.environ.get("HXGWD_PYTHON", os.path.join(REPO, ".venv", "bin", "python"))
    work = tempfile.mkdtemp(prefix="hxgwd-tls-")
    run_dir = os.path.join(work, "servers")
    env = dict(os.environ, BENCH_RUN_DIR=run_dir, BENCH_UPSTREAM_PORT=str(UP_PORT))
    started_upstream = False
    if not answers(f"http://127.0.0.1:{UP_PORT}/"):
        subprocess.run(["bash", os.path.join(SHARED, "servers.sh"), "start", "upstream"], env=env, check=True)
        started_upstream = True
    proc = None
    try:
        cert, key = make_cert(work, a.key)
        plain, tls = f"127.0.0.1:{PORT}", f"127.0.0.1:{PORT + 1}"
        config = open(os.path.join(HERE, "gateway.toml")).read().replace(":18080", f":{UP_PORT}")
        config = config.replace('listen = ["127.0.0.1:4010"]', f'listen = ["{plain}", "{tls}"]\ntls_listen = ["{tls}"]\n'
                                f'tls_cert = "{cert}"\ntls_key = "{key}"')
        config = re.sub(r'(?m)^url = "sqlite:[^"]*"', f'url = "sqlite:///{work}/hxgwd.db"', config)
        config_path = os.path.join(work, "gateway.toml")
        open(config_path, "w").write(config)
        body = os.path.join(work, "chat.json")
        open(body, "w").write(open(os.path.join(SHARED, "bodies", "chat.json")).read().replace("@CHAT_MODEL@", "fake-model"))
        log = open(os.path.join(work, "hxgwd.log"), "wb")
        proc = subprocess.Popen([python, "-m", "hxgwd", "-c", config_path], stderr=log, cwd=work,
                                env=dict(os.environ, PYTHONPATH=REPO, HXBENCH_UPSTREAM_KEY="dummy"))
        deadline = time.monotonic() + 20
        while not answers(f"http://{plain}/healthz"):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"hxgwd did not start (see {work}/hxgwd.log)")
            time.sleep(0.1)
        urls = {"plain": f"http://{plain}", "tls": f"https://{tls}"}
        for url in urls.values():
            wrk(url, 64, 1, body)
        rows: dict[str, list[tuple[float, ...]]] = {name: [] for name in urls}
        for r in range(a.rounds):
            for name, url in urls.items():
                before = cpu_seconds(proc.pid)
                w64 = wrk(url, 64, a.duration, body)
                cpu64 = cpu_seconds(proc.pid) - before
                w1 = wrk(url, 1, a.duration, body)
                before = cpu_seconds(proc.pid)
                wc = wrk(url, 8, a.duration, body, "-H", "Connection: close")
                cpuc = cpu_seconds(proc.pid) - before
                row = (w64["requests"] / (w64["duration_us"] / 1e6), cpu64 / w64["requests"] * 1e6,
                       w64["lat_us"]["p99"] / 1000, w1["lat_us"]["p50"] / 1000, w1["lat_us"]["p99"] / 1000,
                       wc["requests"] / (wc["duration_us"] / 1e6), cpuc / max(wc["requests"], 1) * 1e6)
                rows[name].append(row)
                errors = sum(w[k] for w in (w64, w1, wc) for k in ("err_status", "err_timeout", "err_connect"))
                print(f"round {r + 1} {name:5s} keep-alive 64 conns {row[0]:6.0f} req/s {row[1]:5.0f} µs/req "
                      f"p99 {row[2]:6.2f} ms | 1 conn p50 {row[3]:.3f} ms p99 {row[4]:.3f} ms | "
                      f"close, 8 conns {row[5]:5.0f} req/s {row[6]:5.0f} µs/req" + (f" ERRORS {errors}" if errors else ""),
                      flush=True)
        for name, rs in rows.items():
            m = [sum(col) / len(col) for col in zip(*rs)]
            print(f"mean    {name:5s} keep-alive 64 conns {m[0]:6.0f} req/s {m[1]:5.0f} µs/req p99 {m[2]:6.2f} ms | "
                  f"1 conn p50 {m[3]:.3f} ms p99 {m[4]:.3f} ms | close, 8 conns {m[5]:5.0f} req/s {m[6]:5.0f} µs/req")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        if started_upstream:
            subprocess.run(["bash", os.path.join(SHARED, "servers.sh"), "stop", "upstream"], env=env)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
