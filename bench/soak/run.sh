#!/usr/bin/env bash
# Soak: SECONDS (default 240) of mixed load and abuse against one hxgwd, on loopback ports of its
# own (gateway 4320, fake upstreams 18380-18382). Every 10 s it prints hxgwd's RSS, open fds and
# threads; at the end the gateway's /admin/stats, a clean SIGTERM, wrk's counts, one line per
# attack and the canaries' latencies.
#
#   bench/soak/run.sh [SECONDS]
#
# Legitimate load, which must see 0 non-2xx and 0 socket errors: wrk chat (24 conns, static
# upstream), wrk streamed chat (8 conns, pyup), and clients.py's two canaries, GET /healthz every
# 100 ms on a new connection each time (canary: also sees connections left unaccepted) and on one
# keep-alive connection (canary-ka: event-loop stalls alone); target p99 < 50 ms, 0 failures.
# Abuse (clients.py; each attack in its own thread(s), bounded, stopping by itself at the end):
# the chaos mix (hang-ups, resets, slow readers, slowloris heads, noise, unfinished bodies),
# embeddings fan-out on a "prompt" backend (20,000 items and 2,048 items), 10-15 MB chat and 8 MB
# embeddings bodies, a 1 MB model name, 48 keyless slow bodies (a byte every 3 s) and an idle
# flood of max_connections + 64 keep-alive connections. The soak config sets [server]
# max_connections = SOAK_MAX_CONNECTIONS (256) so that the flood exceeds it.
# Memory that grows with time, fds that pile up, errors in the log, legitimate requests failing
# or a non-zero exit are the findings.
#
# Env: SHARED_BENCH (default <repo>/../shared/bench, else beside the main worktree), HXGWD_PYTHON
# (default <repo>/.venv/bin/python, else the main worktree's), SOAK_MAX_CONNECTIONS (256),
# SOAK_ATTACKS (clients.py --only: a comma-separated subset of chaos,fanout,huge,bigname,slowbody,
# idleflood,canary,canary-ka; default all). With today's idle lockout every attack that opens new
# connections (the big requests, the canary) waits behind the flood: a subset shows each alone.
# hxgwd runs from this checkout (PYTHONPATH=<repo>), whatever the venv has installed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# In a linked worktree <repo>/.. holds neither shared/ nor .venv: look beside the main worktree.
MAIN="$(dirname "$(git -C "$REPO" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || echo "$REPO/.git")")"
SHARED="${SHARED_BENCH:-$REPO/../shared/bench}"
[[ -f "$SHARED/servers.sh" ]] || SHARED="$MAIN/../shared/bench"
[[ -f "$SHARED/servers.sh" ]] || { echo "no shared bench at $SHARED (set SHARED_BENCH)" >&2; exit 2; }
PY="${HXGWD_PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$MAIN/.venv/bin/python"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
SECONDS_WANTED="${1:-240}"
MAXCONN="${SOAK_MAX_CONNECTIONS:-256}"
OUT="$(mktemp -d "${TMPDIR:-/tmp}/hxgwd-soak.XXXXXX")"
export BENCH_RUN_DIR="$OUT/servers" BENCH_UPSTREAM_PORT=18380 BENCH_PYUP_PORT=18381 BENCH_PYUP_DELAY_PORT=18382
PORT=4320
sed -e "s/127.0.0.1:4010/127.0.0.1:$PORT/" -e 's/:18080/:18380/' -e 's/:18081/:18381/' -e 's/:18082/:18382/' \
    -e "s#^url = \"sqlite:[^\"]*\"#url = \"sqlite:///$OUT/hxgwd.db\"#" \
    -e 's/^sha256 = "3f6f/admin = true\nsha256 = "3f6f/' -e "/^listen = /a max_connections = $MAXCONN" \
    "$REPO/bench/gateway.toml" > "$OUT/gateway.toml"
{
    echo
    echo '# soak: a single-prompt backend (one upstream call per embeddings item), for the fan-out attack'
    echo '[[backends]]'
    echo 'name = "pyup-prompt"'
    echo "url = \"http://127.0.0.1:$BENCH_PYUP_PORT/v1\""
    echo 'api_key_env = "HXBENCH_UPSTREAM_KEY"'
    echo 'embeddings_input = "prompt"'
    echo
    echo '[[models]]'
    echo 'name = "fake-embed-prompt"'
    echo 'backend = "pyup-prompt"'
    echo 'kind = "embedding"'
} >> "$OUT/gateway.toml"
chmod 600 "$OUT/gateway.toml"
sed 's/@CHAT_MODEL@/fake-model/' "$SHARED/bodies/chat.json" > "$OUT/chat.json"
sed 's/@CHAT_MODEL@/fake-model-py/' "$SHARED/bodies/chat_stream.json" > "$OUT/stream.json"
HXBENCH_UPSTREAM_KEY=soak "$PY" -m hxgwd --check-config -c "$OUT/gateway.toml" >/dev/null
echo "soak: ${SECONDS_WANTED}s, hxgwd from $("$PY" -c 'import hxgwd, os; print(os.path.dirname(hxgwd.__file__))')," \
     "max_connections=$MAXCONN, output in $OUT"

PID="" LOAD=()
trap 'kill $PID ${LOAD[@]+"${LOAD[@]}"} 2>/dev/null || true; bash "$SHARED/servers.sh" stop >/dev/null' EXIT
bash "$SHARED/servers.sh" start upstream pyup pyup-delay >/dev/null
HXBENCH_UPSTREAM_KEY=soak "$PY" -m hxgwd -c "$OUT/gateway.toml" 2>"$OUT/hxgwd.log" &
PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done

wrk -t1 -c24 -d"${SECONDS_WANTED}s" -s "$SHARED/wrk/openai.lua" "http://127.0.0.1:$PORT/v1/chat/completions" \
    -- POST "$OUT/chat.json" sk-hx-bench > "$OUT/wrk-chat.txt" &
LOAD+=($!)
wrk -t1 -c8 -d"${SECONDS_WANTED}s" -s "$SHARED/wrk/openai.lua" "http://127.0.0.1:$PORT/v1/chat/completions" \
    -- POST "$OUT/stream.json" sk-hx-bench > "$OUT/wrk-stream.txt" &
LOAD+=($!)
python3 "$HERE/clients.py" "$PORT" "$SECONDS_WANTED" --max-connections "$MAXCONN" \
    ${SOAK_ATTACKS:+--only "$SOAK_ATTACKS"} > "$OUT/clients.txt" &
LOAD+=($!)
for i in $(seq $((SECONDS_WANTED / 10))); do
    sleep 10
    echo "t=$((i * 10))s rss=$(awk '/VmRSS/{print $2}' /proc/$PID/status) kB fds=$(ls /proc/$PID/fd | wc -l)" \
         "threads=$(ls /proc/$PID/task | wc -l)"
done
wait "${LOAD[@]}" 2>/dev/null || true
LOAD=()
sleep 2
echo "after the load: rss=$(awk '/VmRSS/{print $2}' /proc/$PID/status) kB fds=$(ls /proc/$PID/fd | wc -l)" \
     "peak rss=$(awk '/VmHWM/{print $2}' /proc/$PID/status) kB"
curl -s -m 10 "http://127.0.0.1:$PORT/admin/stats" -H "Authorization: Bearer sk-hx-bench"; echo
kill -TERM $PID 2>/dev/null || echo "hxgwd was no longer running"
wait $PID && echo "hxgwd exit 0" || echo "hxgwd exit $?"
for w in chat stream; do   # wrk's own lines name errors only when there are some: say 0 too
    python3 - "$OUT/wrk-$w.txt" "$w" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("WRKJSON ")]
if not lines:
    sys.exit(print(f"wrk {sys.argv[2]}: no WRKJSON line, see {sys.argv[1]}"))
r = json.loads(lines[-1][8:])
print(f"wrk {sys.argv[2]}: {r['requests']} requests, {r['requests'] / (r['duration_us'] / 1e6):.0f} req/s,"
      f" non-2xx {r['err_status']}, socket errors connect {r['err_connect']} read {r['err_read']}"
      f" write {r['err_write']} timeout {r['err_timeout']}, p99 {r['lat_us']['p99'] / 1000:.1f} ms,"
      f" max {r['lat_us']['max'] / 1000:.1f} ms")
PY
done
sed 's/^/clients: /' "$OUT/clients.txt"
echo "log: $(grep -c '"level":"error"' "$OUT/hxgwd.log" || true) error lines, $(grep -c '"level":"warning"' "$OUT/hxgwd.log" || true) warnings ($OUT/hxgwd.log)"
