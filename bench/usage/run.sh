#!/usr/bin/env bash
# Usage-recording cost: hxgwd req/s with the usage store off vs SQLite vs PostgreSQL
# (issue 4, point 8). Runs bench/usage/measure.py with the hxgwd venv's python; see
# bench/usage/README.md and `bench/usage/run.sh --help`.
#
#   bench/usage/run.sh                         # 5 rounds x 10 s x {chat, embeddings} x 3 variants, ~8 min
#   bench/usage/run.sh --rounds 2 --duration 5 # quick
#   bench/usage/run.sh --results bench/usage/results/STAMP   # also keep summary/runs/configs there
#
# Before measuring it waits (poll 10 s, --wait-idle 1800 s at most) until no other benchmark
# (bench/run.sh, wrk, shared run.py) and no package build (PyInstaller) is running.
# Env: HXGWD_PYTHON (default <repo>/.venv/bin/python), SHARED_BENCH (<repo>/../shared/bench),
# HXGWD_CONFIG (bench/gateway.toml), HXGWD_USAGE_PORT (4020: off, +1 sqlite, +2 postgresql),
# HXGWD_USAGE_UPSTREAM_PORT (18180: its own static nginx upstream), HXGWD_BENCH_KEY (sk-hx-bench).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null || (cd "$HERE/../.." && pwd))"
PY="${HXGWD_PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || { echo "no python at $PY (set HXGWD_PYTHON)" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk not found: run ../shared/bench/setup.sh tools" >&2; exit 2; }
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || { echo "nginx not found: run ../shared/bench/setup.sh tools" >&2; exit 2; }
exec "$PY" "$HERE/measure.py" "$@"
