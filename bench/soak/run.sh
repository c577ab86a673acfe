#!/usr/bin/env bash
# Soak: SECONDS (default 240) of mixed load and abuse against one hxgwd, on loopback ports of its
# own (gateway 4320, fake upstreams 18380-18382). Every 10 s it prints hxgwd's RSS, open fds and
# threads; at the end the gateway's /admin/stats, a clean SIGTERM, wrk's counts and the abusers'.
#
#   bench/soak/run.sh [SECONDS]
#
# Load: wrk chat (24 conns, static upstream) + wrk streamed chat (8 conns, pyup) + clients.py
# (6 threads of hang-ups, resets, slow readers, slowloris, noise, unfinished bodies).
# Memory that grows with time, fds that pile up, errors in the log or a non-zero exit are the
# findings; nothing here is timed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SHARED="${SHARED_BENCH:-$REPO/../shared/bench}"
PY="${HXGWD_PYTHON:-$REPO/.venv/bin/python}"
SECONDS_WANTED="${1:-240}"
OUT="$(mktemp -d "${TMPDIR:-/tmp}/hxgwd-soak.XXXXXX")"
export BENCH_RUN_DIR="$OUT/servers" BENCH_UPSTREAM_PORT=18380 BENCH_PYUP_PORT=18381 BENCH_PYUP_DELAY_PORT=18382
PORT=4320
sed -e "s/127.0.0.1:4010/127.0.0.1:$PORT/" -e 's/:18080/:18380/' -e 's/:18081/:18381/' -e 's/:18082/:18382/' \
    -e "s#^url = \"sqlite:[^\"]*\"#url = \"sqlite:///$OUT/hxgwd.db\"#" \
    -e 's/^sha256 = "3f6f/admin = true\nsha256 = "3f6f/' "$REPO/bench/gateway.toml" > "$OUT/gateway.toml"
sed 's/@CHAT_MODEL@/fake-model/' "$SHARED/bodies/chat.json" > "$OUT/chat.json"
sed 's/@CHAT_MODEL@/fake-model-py/' "$SHARED/bodies/chat_stream.json" > "$OUT/stream.json"

bash "$SHARED/servers.sh" start upstream pyup pyup-delay >/dev/null
HXBENCH_UPSTREAM_KEY=soak "$PY" -m hxgwd -c "$OUT/gateway.toml" 2>"$OUT/hxgwd.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true; bash "$SHARED/servers.sh" stop >/dev/null' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done

wrk -t1 -c24 -d"${SECONDS_WANTED}s" -s "$SHARED/wrk/openai.lua" "http://127.0.0.1:$PORT/v1/chat/completions" \
    -- POST "$OUT/chat.json" sk-hx-bench > "$OUT/wrk-chat.txt" &
wrk -t1 -c8 -d"${SECONDS_WANTED}s" -s "$SHARED/wrk/openai.lua" "http://127.0.0.1:$PORT/v1/chat/completions" \
    -- POST "$OUT/stream.json" sk-hx-bench > "$OUT/wrk-stream.txt" &
python3 "$HERE/clients.py" "$PORT" "$SECONDS_WANTED" > "$OUT/clients.txt" &
for i in $(seq $((SECONDS_WANTED / 10))); do
    sleep 10
    echo "t=$((i * 10))s rss=$(awk '/VmRSS/{print $2}' /proc/$PID/status) kB fds=$(ls /proc/$PID/fd | wc -l)" \
         "threads=$(ls /proc/$PID/task | wc -l)"
done
wait %2 %3 %4 2>/dev/null || true
sleep 2
echo "after the load: rss=$(awk '/VmRSS/{print $2}' /proc/$PID/status) kB fds=$(ls /proc/$PID/fd | wc -l)"
curl -s "http://127.0.0.1:$PORT/admin/stats" -H "Authorization: Bearer sk-hx-bench"; echo
kill -TERM $PID
wait $PID && echo "hxgwd exit 0" || echo "hxgwd exit $?"
grep -h -E "requests in|Requests/sec|Non-2xx|Socket errors" "$OUT/wrk-chat.txt" "$OUT/wrk-stream.txt"
echo "clients: $(cat "$OUT/clients.txt")"
echo "log: $(grep -c '"level":"error"' "$OUT/hxgwd.log" || true) error lines, $(grep -c '"level":"warning"' "$OUT/hxgwd.log" || true) warnings ($OUT/hxgwd.log)"
