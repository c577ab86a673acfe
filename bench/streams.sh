#!/usr/bin/env bash
# Many concurrent slow streamed chats: hxgwd on its DEFAULT config beside the nginx reverse proxy.
#
#   bench/streams.sh [-n 2000] [--rounds 1] [--ramp 4] [--chunk-delay-ms 500] [--timeout 60]
#                    [--rev REV] [--out DIR] [--targets "nginx hxgwd"] [--set server.KEY=VALUE ...]
#
# The target case of issue 15: "2,000 concurrent streamed chats, events 500 ms apart, default
# config: 0 errors, p99 gap between events <= 1.1x nginx's in the same run, RSS <= 100 MiB".
#
# Starts, in its own run dir (BENCH_RUN_DIR, default ${TMPDIR:-/tmp}/hxbench-streams) and on a free
# port set (as run.sh: the defaults, else +100, +200, ...):
#   pyup-delay  the shared fake upstream with BENCH_DELAY_MS=0 and BENCH_CHUNK_DELAY_MS=500: 20
#               chat.completion.chunk events + [DONE], 500 ms apart (~10 s per stream)
#   proxy       the shared nginx reverse proxy; its port +2 (18092) goes to pyup-delay: the peer
#               (worker_connections 8192, worker_rlimit_nofile 65536 in the shared generator:
#               enough for 2,000 streams, two connections each)
#   hxgwd       `python -m hxgwd` on a config with nothing but [server] listen, one [[keys]], one
#               [[backends]] (pyup-delay) and one [[models]]: every limit, timeout and pool size at
#               its default (e.g. [server] max_connections 1024, backend max_connections 0 (no cap),
#               model queue_timeout 5 s). The one other line: [database] url points the (default,
#               on) SQLite usage store into the output dir instead of /var/lib/hxgwd.
# --set server.K=V / backend.K=V / model.K=V adds `K = V` (TOML value) to that section: to see what
# a non-default setting would do (e.g. --set backend.max_connections=4096); the verdict then says
# "not the default config".
# then runs bench/streams.py against each target in turn (alternating per round), and prints the
# streams.py lines and the verdict. The fd limit is raised to the hard limit for everything it
# starts. Everything it started is stopped at exit, by pid. Each client run is bounded by
# ramp + timeout + 5 s (and `timeout` around it).
#
# Env: SHARED_BENCH, HXGWD_PYTHON (default <repo>/.venv/bin/python), HXGWD_STREAMS_PORT (4015),
# BENCH_PORT_OFFSET, BENCH_RUN_DIR.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null || (cd "$HERE/.." && pwd))"
COMMON="$(cd "$(git -C "$HERE" rev-parse --git-common-dir 2>/dev/null || echo "$REPO/.git")/.." && pwd)"
SHARED="${SHARED_BENCH:-$REPO/../shared/bench}"
[[ -n "${SHARED_BENCH:-}" || -f "$SHARED/servers.sh" ]] || SHARED="$COMMON/../shared/bench"
SHARED="$(cd "$SHARED" && pwd)"
SETS=()
N=2000 ROUNDS=1 RAMP=4 CHUNK_MS=500 TIMEOUT=60 REV="" OUT="" TARGETS="nginx hxgwd"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) N="$2"; shift ;;
    --rounds) ROUNDS="$2"; shift ;;
    --ramp) RAMP="$2"; shift ;;
    --chunk-delay-ms) CHUNK_MS="$2"; shift ;;
    --timeout) TIMEOUT="$2"; shift ;;
    --rev) REV="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --targets) TARGETS="$2"; shift ;;
    --set) SETS+=("$2"); shift ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
(( NOFILE >= 2 * N + 256 )) || { echo "fd limit $NOFILE is too low for $N streams (need 2N + 256)" >&2; exit 2; }

PY="${HXGWD_PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
OFFSET="${BENCH_PORT_OFFSET:-auto}"
if [[ $OFFSET == auto ]]; then
  for off in 0 100 200 300 400 500 600 700; do
    free=1
    for p in 18082 18090 18091 18092 4015; do port_busy $((p + off)) && { free=0; break; }; done
    [[ $free == 1 ]] && { OFFSET=$off; break; }
  done
  [[ $OFFSET != auto ]] || { echo "no free port set; set BENCH_PORT_OFFSET" >&2; exit 1; }
fi
PORT="${HXGWD_STREAMS_PORT:-$((4015 + OFFSET))}"
export BENCH_UPSTREAM_PORT=$((18080 + OFFSET)) BENCH_PYUP_PORT=$((18081 + OFFSET))
export BENCH_PYUP_DELAY_PORT=$((18082 + OFFSET)) BENCH_PROXY_PORT=$((18090 + OFFSET))
export BENCH_DELAY_MS=0 BENCH_CHUNK_DELAY_MS="$CHUNK_MS"
export BENCH_RUN_DIR="${BENCH_RUN_DIR:-${TMPDIR:-/tmp}/hxbench-streams}"
export HXBENCH_UPSTREAM_KEY="${HXBENCH_UPSTREAM_KEY:-sk-fake-upstream}"
PYD=$BENCH_PYUP_DELAY_PORT NGX=$((BENCH_PROXY_PORT + 2))
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="${OUT:-${TMPDIR:-/tmp}/hxgwd-bench/$STAMP-streams-$N}"
mkdir -p "$OUT" "$BENCH_RUN_DIR"
OUT="$(cd "$OUT" && pwd)"
SERVERS="$SHARED/servers.sh"
log() { printf '[streams %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

STARTED=() HX_PID=""
cleanup() {
  local rc=$?
  if [[ -n "$HX_PID" ]] && kill -0 "$HX_PID" 2>/dev/null; then
    kill -TERM "$HX_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$HX_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$HX_PID" 2>/dev/null && kill -KILL "$HX_PID" 2>/dev/null || true
    log "hxgwd stopped (pid $HX_PID)"
  fi
  if [[ ${#STARTED[@]} -gt 0 ]]; then bash "$SERVERS" stop "${STARTED[@]}" >&2 || true; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# our own run dir: a leftover there (an interrupted run) may have other delays: restart it
for c in proxy pyup-delay; do
  if bash "$SERVERS" status | grep -q "^$c: running"; then bash "$SERVERS" stop "$c" >&2; fi
done
for p in $PYD $BENCH_PROXY_PORT $((BENCH_PROXY_PORT + 1)) $NGX $PORT; do
  port_busy "$p" && { echo "port $p is taken (set BENCH_PORT_OFFSET)" >&2; exit 1; }
done
bash "$SERVERS" start pyup-delay >&2; STARTED+=(pyup-delay)
bash "$SERVERS" start proxy >&2; STARTED+=(proxy)
NGX_PID=$(cat "$BENCH_RUN_DIR/proxy.pid")
grep -h 'worker_connections' "$BENCH_RUN_DIR/nginx-proxy.conf" | sed 's/^ */nginx proxy: /' >&2

SRC="$REPO"
if [[ -n "$REV" ]]; then
  SRC="$OUT/src"; rm -rf "$SRC"; mkdir -p "$SRC"
  git -C "$REPO" archive "$REV" hxgwd | tar -x -C "$SRC"
fi
mkdir -p "$OUT/state"
CONF="$OUT/hxgwd.toml"
cat >"$CONF" <<EOF
# bench/streams.sh: hxgwd's default configuration but for what it must know
[server]
listen = ["127.0.0.1:$PORT"]

[database]
url = "sqlite:///$OUT/state/hxgwd.db"

[[keys]]
name = "bench"
sha256 = "3f6fd84c7b1401637625a7936edfe7a8cee3d4c2d25bf1d1f9777b5165b2c738"

[[backends]]
name = "pyup-stream"
url = "http://127.0.0.1:$PYD/v1"
api_key_env = "HXBENCH_UPSTREAM_KEY"

[[models]]
name = "fake-model-delay"
backend = "pyup-stream"
EOF
for kv in "${SETS[@]}"; do
  sec="${kv%%.*}" rest="${kv#*.}"
  case "$sec" in server) hdr='^\[server\]$' ;; backend) hdr='^\[\[backends\]\]$' ;; model) hdr='^\[\[models\]\]$' ;;
    *) echo "--set $kv: section must be server, backend or model" >&2; exit 2 ;; esac
  sed -i "/$hdr/a ${rest%%=*} = ${rest#*=}" "$CONF"
done
chmod 600 "$CONF"
HXLOG="$OUT/hxgwd.log"
( cd "$SRC" && exec env PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m hxgwd -c "$CONF" ) 2>"$HXLOG" </dev/null &
HX_PID=$!
for _ in $(seq 100); do
  grep -q '"msg":"listening"' "$HXLOG" 2>/dev/null && break
  kill -0 "$HX_PID" 2>/dev/null || { echo "hxgwd exited at start:" >&2; cat "$HXLOG" >&2; exit 1; }
  sleep 0.1
done
grep -q '"msg":"listening"' "$HXLOG" || { echo "hxgwd did not report listening in 10 s" >&2; exit 1; }
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); $N streams, ramp ${RAMP}s, events ${CHUNK_MS} ms apart, rounds $ROUNDS"
  echo "hxgwd: $([[ -n $REV ]] && git -C "$REPO" rev-parse --short "$REV" || echo "working tree at $(git -C "$REPO" rev-parse --short HEAD)"), pid $HX_PID, port $PORT; $(grep -o '"http_parser":"[a-z0-9]*"' "$HXLOG" | head -1)"
  if [[ ${#SETS[@]} -gt 0 ]]; then echo "NOT the default config: --set ${SETS[*]}"; else echo "hxgwd config: default (listen, key, backend, model, store path only)"; fi
  echo "nginx proxy: port $NGX (pid $NGX_PID) -> pyup-delay $PYD; fd limit $NOFILE; somaxconn $(cat /proc/sys/net/core/somaxconn)"
  echo "cpu: $(nproc); loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/facts.txt" >&2

# --- runs ----------------------------------------------------------------------------------------
KEY="${HXGWD_BENCH_KEY:-sk-hx-bench}"
BOUND=$(python3 -c "import math; print(math.ceil($RAMP + $TIMEOUT + 30))")
for r in $(seq "$ROUNDS"); do
  order="$TARGETS"; (( r % 2 == 0 )) && order="$(tr ' ' '\n' <<<"$TARGETS" | tac | paste -sd' ')"
  for t in $order; do
    case "$t" in
      nginx) args=(--url "http://127.0.0.1:$NGX/v1" --pid "$NGX_PID") ;;
      hxgwd) args=(--url "http://127.0.0.1:$PORT/v1" --key "$KEY" --pid "$HX_PID") ;;
      *) echo "unknown target $t" >&2; exit 2 ;;
    esac
    log "round $r: $t, $N streams, loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# round $r, $t: loadavg before $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/streams.txt"
    timeout "$BOUND" "$PY" "$HERE/streams.py" "${args[@]}" -n "$N" --ramp "$RAMP" --timeout "$TIMEOUT" \
      --model fake-model-delay --nominal-ms "$CHUNK_MS" --label "$t" --json "$OUT/streams.jsonl" | tee -a "$OUT/streams.txt" || true
    sleep 2    # let TIME_WAIT and the target's state settle
  done
done
kill -0 "$HX_PID" 2>/dev/null || { echo "hxgwd died during the run; see $HXLOG" >&2; exit 1; }
echo "hxgwd log: $(grep -c '"level":"error"' "$HXLOG" || true) error lines, $(grep -c '"level":"warning"' "$HXLOG" || true) warnings; loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/facts.txt" >&2

# --- verdict (the worst round of each target) -----------------------------------------------------
python3 - "$OUT/streams.jsonl" "$N" <<'EOF' | tee "$OUT/verdict.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
n = int(sys.argv[2])
def worst(label, key, agg=max):
    vals = [r[key] for r in rows if r["label"] == label and r[key] is not None]
    return agg(vals) if vals else None
failed = worst("hxgwd", "failed")
p99, ngx = worst("hxgwd", "gap_p99_ms"), worst("nginx", "gap_p99_ms")
rss = worst("hxgwd", "rss_peak_mib")
checks = [
    ("errors (failed streams of %d)" % n, "0", failed, failed == 0),
    ("p99 gap between events", "<= 1.1 x nginx's (%s ms)" % (f"{ngx:.1f}" if ngx else "-"),
     f"{p99:.1f} ms" if p99 else "-", bool(p99 and ngx and p99 <= 1.1 * ngx)),
    ("RSS peak", "<= 100 MiB", f"{rss} MiB" if rss is not None else "-", rss is not None and rss <= 100),
]
default = "NOT the default config" not in open(sys.argv[1].rsplit("/", 1)[0] + "/facts.txt").read()
print(f"| hxgwd, {'default config' if default else 'NOT the default config (--set)'} | wanted | measured (worst round) | met? |\n|---|---|---|---|")
for desc, want, got, ok in checks:
    verdict = "yes" if ok else "not measured" if got in (None, "-") or (ngx is None and "nginx" in want) else "**no**"
    print(f"| {desc} | {want} | {got} | {verdict} |")
print(f"\nAll met: {'yes' if all(c[3] for c in checks) else 'no'}")
EOF
log "results in $OUT"
