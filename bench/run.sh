#!/usr/bin/env bash
# hxgwd overhead benchmark: hxgwd side by side with the direct fake upstream and an nginx
# reverse proxy (LiteLLM optional), using the shared harness (../shared/bench: servers.sh, run.py).
#
#   bench/run.sh --quick              # 1 round x 5 s per measurement (~4 min)
#   bench/run.sh                      # full: 3 rounds x 10 s (~16 min)
#   bench/run.sh --profile            # + py-spy profile of hxgwd, chat at 64 conns (after the runs)
#   bench/run.sh --profile-only       # only start things and profile
#
# Options:
#   --quick | --full        presets (full is the default)
#   --rounds N --duration S --warmup S --conns N   override the preset
#   --parts "main stream delay"   which comparisons (default all three):
#       main    chat, embeddings vs the static nginx upstream   (direct, nginx, hxgwd[, litellm])
#       stream  chat_stream vs pyup (real SSE, 20 chunks)        (direct-py, nginx-py, hxgwd[, litellm-py])
#       delay   chat, embeddings vs pyup with a 50 ms delay     (direct-delay, nginx-delay, hxgwd[, litellm-delay])
#   --cases-main LIST       cases of the main part (default chat,embeddings; add models if wanted)
#   --litellm               also measure LiteLLM (installs it with setup.sh litellm if missing)
#   --no-nginx              leave the nginx reverse proxy out
#   --no-store              run hxgwd with the usage store off ([database] url = ""); by default it
#                           is on, SQLite in OUT/state/ (never the system default /var/lib/hxgwd)
#   --also-rev REV          A/B: also start a second hxgwd as committed at REV (store on, its own
#                           SQLite file; port HXGWD_BENCH_PORT2, 4012), measured as target
#                           hxgwd-<short REV> in every part, in the same rounds (issue 15's
#                           "streamed chat >= 2x the build before it"); not with --also-no-store
#   --also-no-store         A/B: also start a second hxgwd with the store off (port
#                           HXGWD_BENCH_PORT2, 4012) and measure it as target hxgwd-nostore in
#                           the same rounds (main, delay), so the store's cost is not lost in drift
#   --floor                 also measure bench/floor.py in the main part: a bare trio pass-through
#                           (no auth/routing/logging/timeouts), i.e. the floor of what any trio
#                           gateway costs on this box, one per parser mode of --floor-modes
#   --floor-modes "h11 httptools"   floor.py modes measured by --floor (default both; also raw):
#                           h11 -> target "floor" on HXGWD_FLOOR_PORT (4011), httptools -> target
#                           "floor-httptools" on HXGWD_FLOOR_PORT+2 (4013), raw -> "floor-raw" on +3
#   --profile [SECONDS]     after the runs, py-spy (installed into the venv if missing) records
#                           hxgwd for SECONDS (default 20) while wrk loads chat at --conns;
#                           writes profile.svg, profile.txt (collapsed stacks), hotspots.md
#   --out DIR               results directory (default ${TMPDIR:-/tmp}/hxgwd-bench/<stamp>-<mode>)
#   (ports: if any default port is taken, all of them move up by 100, 200, ...; BENCH_PORT_OFFSET=N forces N)
#   --setup                 run setup.sh tools even if nginx and wrk are present
#   --rev REV               measure hxgwd as committed at REV (git archive into OUT/src), not the
#                           working tree: others' uncommitted edits then cannot change the code
#                           under test halfway through a run
#
# Env: SHARED_BENCH (default <repo>/../shared/bench, or <main checkout>/../shared/bench from a worktree), HXGWD_PYTHON (default <repo>/.venv/bin/python),
# HXGWD_BENCH_PORT (4010), HXGWD_BENCH_KEY (sk-hx-bench: the key whose sha256 is in gateway.toml),
# HXGWD_CONFIG (default bench/gateway.toml), BENCH_RUN_DIR (servers' pid files/logs; default
# ${TMPDIR:-/tmp}/hxbench-hxgwd, separate from the shared default so that other users' servers are
# never stopped), and the port variables of servers.sh.
#
# Servers of another session are never used: if a default port is taken, the whole port set moves
# (see above). Everything this script starts (upstreams, proxy, hxgwd, floor) is stopped at exit, by pid.
# Every load run is bounded by --duration (and each run.py call by `timeout`).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null || (cd "$HERE/.." && pwd))"
# default: beside the repository, or beside the main checkout when this is a git worktree
COMMON="$(cd "$(git -C "$HERE" rev-parse --git-common-dir 2>/dev/null || echo "$REPO/.git")/.." && pwd)"
SHARED="${SHARED_BENCH:-$REPO/../shared/bench}"
[[ -n "${SHARED_BENCH:-}" || -f "$SHARED/run.py" ]] || SHARED="$COMMON/../shared/bench"
[[ -x "$SHARED/run.py" || -f "$SHARED/run.py" ]] || { echo "no shared bench at $SHARED (set SHARED_BENCH)" >&2; exit 2; }
SHARED="$(cd "$SHARED" && pwd)"

MODE=full ROUNDS="" DURATION="" WARMUP="" CONNS=64
PARTS="main stream delay" CASES_MAIN="chat,embeddings"
FLOOR_MODES="h11 httptools"
LITELLM=0 NGINX_PROXY=1 STORE=1 AB_NOSTORE=0 FLOOR=0 PROFILE=0 PROFILE_ONLY=0 PROFILE_SECS=20 OUT="" SETUP=0 REV="" ALSO_REV=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) MODE=quick ;;
    --full) MODE=full ;;
    --rounds) ROUNDS="$2"; shift ;;
    --duration) DURATION="$2"; shift ;;
    --warmup) WARMUP="$2"; shift ;;
    --conns) CONNS="$2"; shift ;;
    --parts) PARTS="$2"; shift ;;
    --cases-main) CASES_MAIN="$2"; shift ;;
    --litellm) LITELLM=1 ;;
    --no-nginx) NGINX_PROXY=0 ;;
    --floor) FLOOR=1 ;;
    --floor-modes) FLOOR=1; FLOOR_MODES="${2//,/ }"; shift ;;
    --no-store) STORE=0 ;;
    --also-no-store) AB_NOSTORE=1 ;;
    --profile) PROFILE=1; if [[ "${2:-}" =~ ^[0-9]+$ ]]; then PROFILE_SECS="$2"; shift; fi ;;
    --profile-only) PROFILE=1; PROFILE_ONLY=1; PARTS="" ;;
    --out) OUT="$2"; shift ;;
    --setup) SETUP=1 ;;
    --rev) REV="$2"; shift ;;
    --also-rev) ALSO_REV="$2"; shift ;;
    -h|--help) sed -n '2,53p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $MODE == quick ]]; then
  ROUNDS="${ROUNDS:-1}" DURATION="${DURATION:-5}" WARMUP="${WARMUP:-1}"
else
  ROUNDS="${ROUNDS:-3}" DURATION="${DURATION:-10}" WARMUP="${WARMUP:-3}"
fi

PY="${HXGWD_PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Ports: the defaults (upstreams 18080-18082, proxy 18090-18092, hxgwd 4010-4012) unless one of
# them is taken (another session's servers), then the whole set moves up by 100, 200, ... We never
# lean on servers someone else started: they may be stopped halfway through our run.
OFFSET="${BENCH_PORT_OFFSET:-auto}"
if [[ $OFFSET == auto ]]; then
  for off in 0 100 200 300 400 500; do
    free=1
    for p in 18080 18081 18082 18090 18091 18092 18400 4010 4011 4012 4013 4014; do
      if port_busy $((p + off)); then free=0; break; fi
    done
    if [[ $free == 1 ]]; then OFFSET=$off; break; fi
  done
  [[ $OFFSET != auto ]] || { echo "no free port set (offsets 0-500 tried); set BENCH_PORT_OFFSET" >&2; exit 1; }
fi
PORT="${HXGWD_BENCH_PORT:-$((4010 + OFFSET))}"
FLOOR_PORT="${HXGWD_FLOOR_PORT:-$((4011 + OFFSET))}"
PORT2="${HXGWD_BENCH_PORT2:-$((4012 + OFFSET))}"
# floor.py per mode: target name and port (h11 keeps the historical name "floor")
declare -A FLOOR_NAME=([h11]=floor [httptools]=floor-httptools [raw]=floor-raw)
declare -A FLOOR_PORTS=([h11]=$FLOOR_PORT [httptools]=$((FLOOR_PORT + 2)) [raw]=$((FLOOR_PORT + 3)))
for m in $FLOOR_MODES; do
  [[ -n "${FLOOR_NAME[$m]:-}" ]] || { echo "unknown floor mode $m (h11, httptools, raw)" >&2; exit 2; }
done
export BENCH_UPSTREAM_PORT="${BENCH_UPSTREAM_PORT:-$((18080 + OFFSET))}"
export BENCH_PYUP_PORT="${BENCH_PYUP_PORT:-$((18081 + OFFSET))}"
export BENCH_PYUP_DELAY_PORT="${BENCH_PYUP_DELAY_PORT:-$((18082 + OFFSET))}"
export BENCH_PROXY_PORT="${BENCH_PROXY_PORT:-$((18090 + OFFSET))}"
export BENCH_LITELLM_PORT="${BENCH_LITELLM_PORT:-$((18400 + OFFSET))}"
KEY="${HXGWD_BENCH_KEY:-sk-hx-bench}"
CONFIG_SRC="${HXGWD_CONFIG:-$HERE/gateway.toml}"
export BENCH_RUN_DIR="${BENCH_RUN_DIR:-${TMPDIR:-/tmp}/hxbench-hxgwd}"
export HXBENCH_UPSTREAM_KEY="${HXBENCH_UPSTREAM_KEY:-sk-fake-upstream}"
UP="${BENCH_UPSTREAM_PORT:-18080}" PYP="${BENCH_PYUP_PORT:-18081}" PYD="${BENCH_PYUP_DELAY_PORT:-18082}"
PX="${BENCH_PROXY_PORT:-18090}" LL="${BENCH_LITELLM_PORT:-18400}"
LLKEY="${LITELLM_MASTER_KEY:-sk-bench-master}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="${OUT:-${TMPDIR:-/tmp}/hxgwd-bench/$STAMP-$MODE}"
mkdir -p "$OUT" "$BENCH_RUN_DIR"
OUT="$(cd "$OUT" && pwd)"
SERVERS="$SHARED/servers.sh"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# --- tools ---------------------------------------------------------------------------------------
if [[ $SETUP == 1 ]] || ! command -v wrk >/dev/null || ! { command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]]; } \
   || ! command -v curl >/dev/null; then
  log "installing nginx, wrk, curl (setup.sh tools)"
  bash "$SHARED/setup.sh" tools
fi
if [[ $LITELLM == 1 && ! -x "${LITELLM_VENV:-${TMPDIR:-/tmp}/litellm-venv}/bin/litellm" ]]; then
  log "installing LiteLLM into a venv (setup.sh litellm)"
  bash "$SHARED/setup.sh" litellm
fi
if [[ $PROFILE == 1 ]] && ! "$PY" -m pip show -q py-spy >/dev/null 2>&1 && [[ ! -x "$(dirname "$PY")/py-spy" ]]; then
  log "installing py-spy into $(dirname "$(dirname "$PY")")"
  "$PY" -m pip install -q py-spy
fi
PYSPY="$(dirname "$PY")/py-spy"; [[ -x "$PYSPY" ]] || PYSPY="$(command -v py-spy || true)"

# --- cleanup: only what we started, by pid ----------------------------------------------------------
STARTED=() HX_PID="" HX2_PID="" HX2_NAME=hxgwd-nostore
declare -A FLOOR_PIDS=()
cleanup() {
  local rc=$?
  if [[ -n "$HX2_PID" ]] && kill -0 "$HX2_PID" 2>/dev/null; then
    kill -TERM "$HX2_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$HX2_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$HX2_PID" 2>/dev/null && kill -KILL "$HX2_PID" 2>/dev/null || true
    log "$HX2_NAME stopped (pid $HX2_PID)"
  fi
  local m fp
  for m in "${!FLOOR_PIDS[@]}"; do
    fp="${FLOOR_PIDS[$m]}"
    if kill -0 "$fp" 2>/dev/null; then
      kill -TERM "$fp" 2>/dev/null || true; wait "$fp" 2>/dev/null || true
      log "floor ($m) stopped (pid $fp)"
    fi
  done
  if [[ -n "$HX_PID" ]] && kill -0 "$HX_PID" 2>/dev/null; then
    kill -TERM "$HX_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$HX_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$HX_PID" 2>/dev/null && kill -KILL "$HX_PID" 2>/dev/null || true
    log "hxgwd stopped (pid $HX_PID)"
  fi
  if [[ ${#STARTED[@]} -gt 0 ]]; then bash "$SERVERS" stop "${STARTED[@]}" >&2 || true; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# PROC[c]: run.py process option for component c
declare -A PROC
start_component() {
  local c="$1" port="$2"
  if bash "$SERVERS" status | grep -q "^$c: running"; then
    if port_busy "$port"; then
      PROC[$c]=";proc=$c"; log "$c: already running in $BENCH_RUN_DIR on $port, reusing (left running)"; return
    fi
    log "$c: a leftover in $BENCH_RUN_DIR on other ports (an interrupted run?); stopping it"
    bash "$SERVERS" stop "$c" >&2
  fi
  if port_busy "$port"; then echo "$c: port $port is taken by another process (set BENCH_PORT_OFFSET)" >&2; exit 1; fi
  bash "$SERVERS" start "$c" >&2
  STARTED+=("$c"); PROC[$c]=";proc=$c"
}
start_component upstream "$UP"
start_component pyup "$PYP"
start_component pyup-delay "$PYD"
[[ $NGINX_PROXY == 1 ]] && start_component proxy "$PX"
[[ $LITELLM == 1 ]] && start_component litellm "$LL"

# --- hxgwd -----------------------------------------------------------------------------------------
if port_busy "$PORT"; then echo "port $PORT is in use; set HXGWD_BENCH_PORT" >&2; exit 1; fi
SRC="$REPO"
if [[ -n "$REV" ]]; then
  SRC="$OUT/src"; rm -rf "$SRC"; mkdir -p "$SRC"
  git -C "$REPO" archive "$REV" hxgwd | tar -x -C "$SRC"
  log "hxgwd from $(git -C "$REPO" rev-parse --short "$REV") (git archive) in $SRC"
fi
CONF="$OUT/gateway.toml"
sed -e "s/127\.0\.0\.1:4010/127.0.0.1:$PORT/" \
    -e "s/127\.0\.0\.1:18080/127.0.0.1:$UP/; s/127\.0\.0\.1:18081/127.0.0.1:$PYP/; s/127\.0\.0\.1:18082/127.0.0.1:$PYD/" \
    "$CONFIG_SRC" >"$CONF"
if [[ $STORE == 1 ]]; then
  mkdir -p "$OUT/state"
  DBURL="sqlite:///$OUT/state/hxgwd.db"
else
  DBURL=""
fi
if grep -q '^\[database\]' "$CONF"; then
  sed -i "/^\[database\]/,/^\[/ s|^url = .*|url = \"$DBURL\"|" "$CONF"
else
  printf '\n[database]\nurl = "%s"\n' "$DBURL" >>"$CONF"
fi
chmod 600 "$CONF"
HXLOG="$OUT/hxgwd.log"
( cd "$SRC" && exec env PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m hxgwd -c "$CONF" ) 2>"$HXLOG" </dev/null &
HX_PID=$!
echo "$HX_PID" >"$OUT/hxgwd.pid"
for _ in $(seq 100); do
  grep -q '"msg":"listening"' "$HXLOG" 2>/dev/null && break
  kill -0 "$HX_PID" 2>/dev/null || { echo "hxgwd exited at start:" >&2; cat "$HXLOG" >&2; exit 1; }
  sleep 0.1
done
grep -q '"msg":"listening"' "$HXLOG" || { echo "hxgwd did not report listening in 10 s" >&2; cat "$HXLOG" >&2; exit 1; }
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kb() { awk '/^VmHWM:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
RSS_START=$(rss_kb "$HX_PID")
log "hxgwd pid $HX_PID on 127.0.0.1:$PORT ($("$PY" -c 'import sys; print(sys.version.split()[0])'), log $HXLOG), RSS $((RSS_START / 1024)) MiB"

[[ $AB_NOSTORE == 1 && -n "$ALSO_REV" ]] && { echo "--also-rev and --also-no-store both use the second hxgwd" >&2; exit 2; }
if [[ $AB_NOSTORE == 1 || -n "$ALSO_REV" ]]; then
  if port_busy "$PORT2"; then echo "port $PORT2 is in use; set HXGWD_BENCH_PORT2" >&2; exit 1; fi
  SRC2="$SRC" CONF2="$OUT/gateway-nostore.toml"
  [[ -n "$ALSO_REV" ]] && HX2_NAME="hxgwd-$(git -C "$REPO" rev-parse --short "$ALSO_REV")" \
    CONF2="$OUT/gateway-also.toml" SRC2="$OUT/src-also"
  sed -e "s/127\.0\.0\.1:$PORT\"/127.0.0.1:$PORT2\"/" "$CONF" >"$CONF2"
  if [[ -n "$ALSO_REV" ]]; then
    [[ -n "$DBURL" ]] && sed -i "/^\[database\]/,/^\[/ s|^url = .*|url = \"sqlite:///$OUT/state/hxgwd-also.db\"|" "$CONF2"
    rm -rf "$SRC2"; mkdir -p "$SRC2"
    git -C "$REPO" archive "$ALSO_REV" hxgwd | tar -x -C "$SRC2"
  else
    sed -i "/^\[database\]/,/^\[/ s|^url = .*|url = \"\"|" "$CONF2"
  fi
  chmod 600 "$CONF2"
  ( cd "$SRC2" && exec env PYTHONPATH="$SRC2${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m hxgwd -c "$CONF2" ) \
    2>"$OUT/$HX2_NAME.log" </dev/null &
  HX2_PID=$!
  for _ in $(seq 100); do
    grep -q '"msg":"listening"' "$OUT/$HX2_NAME.log" 2>/dev/null && break
    kill -0 "$HX2_PID" 2>/dev/null || { echo "$HX2_NAME exited at start:" >&2; cat "$OUT/$HX2_NAME.log" >&2; exit 1; }
    sleep 0.1
  done
  log "$HX2_NAME ($([[ -n "$ALSO_REV" ]] && echo "git archive of $ALSO_REV" || echo "store off")) pid $HX2_PID on 127.0.0.1:$PORT2"
fi
if [[ $FLOOR == 1 ]]; then
  for m in $FLOOR_MODES; do
    fport="${FLOOR_PORTS[$m]}" flog="$OUT/${FLOOR_NAME[$m]}.log"
    if port_busy "$fport"; then echo "port $fport (floor $m) is in use; set HXGWD_FLOOR_PORT" >&2; exit 1; fi
    "$PY" "$HERE/floor.py" --mode "$m" --port "$fport" --upstream "127.0.0.1:$UP" >"$flog" 2>&1 </dev/null &
    FLOOR_PIDS[$m]=$!
    for _ in $(seq 50); do port_busy "$fport" && break; sleep 0.1; done
    port_busy "$fport" || { echo "floor.py --mode $m did not start:" >&2; cat "$flog" >&2; exit 1; }
    log "floor (bare trio pass-through, $m) pid ${FLOOR_PIDS[$m]} on 127.0.0.1:$fport"
  done
fi

# --- facts -------------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode: $MODE; rounds=$ROUNDS duration=${DURATION}s warmup=${WARMUP}s conns=$CONNS; wrk threads 1"
  if [[ -n "$REV" ]]; then echo "hxgwd: $(git -C "$REPO" rev-parse --short "$REV") (git archive of hxgwd/ at --rev $REV)"
  else echo "hxgwd: working tree at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet HEAD -- hxgwd 2>/dev/null && [[ -z "$(git -C "$REPO" ls-files --others --exclude-standard -- hxgwd)" ]] || echo ' + uncommitted changes in hxgwd/')"; fi
  echo "cpu: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); kernel $(uname -r)"
  echo "python (hxgwd): $("$PY" --version 2>&1 | cut -d' ' -f2); trio $("$PY" -c 'import trio; print(trio.__version__)'); h11 $("$PY" -c 'import h11; print(h11.__version__)'); httptools $("$PY" -c 'import httptools; print(httptools.__version__)' 2>/dev/null || echo none)"
  echo "nginx: $(nginx -v 2>&1 | cut -d/ -f2); wrk: $(dpkg-query -W -f='${Version}' wrk 2>/dev/null)"
  echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "hxgwd usage store: ${DBURL:-off}"
  echo "hxgwd RSS after start: $((RSS_START / 1024)) MiB"
} | tee "$OUT/facts.txt" >&2

# --- runs ----------------------------------------------------------------------------------------
HXT="hxgwd=http://127.0.0.1:$PORT/v1;key=$KEY;pid=$HX_PID"
HXT2="$HX2_NAME=http://127.0.0.1:$PORT2/v1;key=$KEY;pid=$HX2_PID"
COMMON=(--rounds "$ROUNDS" --duration "$DURATION" --warmup "$WARMUP" --conns "$CONNS")
run_part() { # NAME CASES TARGET...
  local name="$1" cases="$2"; shift 2
  local targets=() t
  for t in "$@"; do targets+=(--target "$t"); done
  local n_t=$# n_c; n_c=$(tr ',' '\n' <<<"$cases" | wc -l)
  local bound=$(( (ROUNDS * n_c * 2 * (DURATION + 2) + n_c * (WARMUP + 2)) * n_t + 120 ))
  log "part $name: cases $cases, $n_t targets, bounded at ${bound}s"
  echo "python3 run.py ${COMMON[*]} --cases $cases $(printf -- "--target '%s' " "$@")" >>"$OUT/commands.txt"
  timeout "$bound" python3 "$SHARED/run.py" "${COMMON[@]}" --cases "$cases" \
    --out "$OUT/$name.jsonl" --md "$OUT/$name.md" "${targets[@]}" >/dev/null
}
for part in $PARTS; do
  case "$part" in
    main)
      T=("direct=http://127.0.0.1:$UP/v1${PROC[upstream]}")
      [[ $NGINX_PROXY == 1 ]] && T+=("nginx=http://127.0.0.1:$PX/v1${PROC[proxy]}")
      if [[ $FLOOR == 1 ]]; then
        for m in $FLOOR_MODES; do
          T+=("${FLOOR_NAME[$m]}=http://127.0.0.1:${FLOOR_PORTS[$m]}/v1;pid=${FLOOR_PIDS[$m]}")
        done
      fi
      T+=("$HXT")
      [[ -n "$HX2_PID" ]] && T+=("$HXT2")
      [[ $LITELLM == 1 ]] && T+=("litellm=http://127.0.0.1:$LL/v1;key=$LLKEY${PROC[litellm]}")
      run_part main "$CASES_MAIN" "${T[@]}" ;;
    stream)
      T=("direct-py=http://127.0.0.1:$PYP/v1${PROC[pyup]}")
      [[ $NGINX_PROXY == 1 ]] && T+=("nginx-py=http://127.0.0.1:$((PX + 1))/v1${PROC[proxy]}")
      T+=("$HXT;model=fake-model-py")
      [[ -n "$ALSO_REV" ]] && T+=("$HXT2;model=fake-model-py")
      [[ $LITELLM == 1 ]] && T+=("litellm-py=http://127.0.0.1:$LL/v1;key=$LLKEY;model=fake-model-py${PROC[litellm]}")
      run_part stream chat_stream "${T[@]}" ;;
    delay)
      T=("direct-delay=http://127.0.0.1:$PYD/v1${PROC[pyup-delay]}")
      [[ $NGINX_PROXY == 1 ]] && T+=("nginx-delay=http://127.0.0.1:$((PX + 2))/v1${PROC[proxy]}")
      T+=("$HXT;model=fake-model-delay;embed_model=fake-embed-delay")
      [[ -n "$HX2_PID" ]] && T+=("$HXT2;model=fake-model-delay;embed_model=fake-embed-delay")
      [[ $LITELLM == 1 ]] && T+=("litellm-delay=http://127.0.0.1:$LL/v1;key=$LLKEY;model=fake-model-delay;embed_model=fake-embed-delay${PROC[litellm]}")
      run_part delay chat,embeddings "${T[@]}" ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done

RSS_END=$(rss_kb "$HX_PID") HWM=$(hwm_kb "$HX_PID")
kill -0 "$HX_PID" 2>/dev/null || { echo "hxgwd died during the run; see $HXLOG" >&2; exit 1; }
{
  echo "hxgwd RSS after the runs: $((RSS_END / 1024)) MiB (peak VmHWM $((HWM / 1024)) MiB)"
  [[ -n "$HX2_PID" ]] && echo "$HX2_NAME RSS after the runs: $(($(rss_kb "$HX2_PID") / 1024)) MiB"
  echo "hxgwd log: $(grep -c '"msg":"request"' "$HXLOG") access-log lines, $(grep -c '"level":"error"' "$HXLOG" || true) error lines, $(grep -c '"level":"warning"' "$HXLOG" || true) warnings"
  echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee -a "$OUT/facts.txt" >&2

# --- profile (after the measured runs, so py-spy does not disturb them) -------------------------
if [[ $PROFILE == 1 ]]; then
  [[ -n "$PYSPY" ]] || { echo "py-spy not found" >&2; exit 1; }
  BODY="$OUT/chat-body.json"
  sed -e 's/@CHAT_MODEL@/fake-model/' "$SHARED/bodies/chat.json" >"$BODY"
  WRK_SECS=$((2 * PROFILE_SECS + 6))
  log "profile: wrk chat ${CONNS} conns for ${WRK_SECS}s; py-spy ${PROFILE_SECS}s raw, then ${PROFILE_SECS}s flamegraph, 250 Hz"
  wrk -t 1 -c "$CONNS" -d "${WRK_SECS}s" --timeout 10s -s "$SHARED/wrk/openai.lua" \
    "http://127.0.0.1:$PORT/v1/chat/completions" -- POST "$BODY" "$KEY" >"$OUT/profile-wrk.txt" 2>&1 &
  WRK_PID=$!
  sleep 2
  timeout $((PROFILE_SECS + 30)) "$PYSPY" record --pid "$HX_PID" --duration "$PROFILE_SECS" --rate 250 --format raw --full-filenames \
    -o "$OUT/profile.txt" >&2 || true
  timeout $((PROFILE_SECS + 30)) "$PYSPY" record --pid "$HX_PID" --duration "$PROFILE_SECS" --rate 250 \
    -o "$OUT/profile.svg" >&2 || true
  wait "$WRK_PID" || true
  echo "profile run, wrk with py-spy attached: $(grep -o '"requests":[0-9]*' "$OUT/profile-wrk.txt" | cut -d: -f2) requests in ${WRK_SECS}s" >&2
  python3 "$HERE/hotspots.py" "$OUT/profile.txt" --top 25 --hxgwd-groups --main-thread >"$OUT/hotspots.md"
  python3 "$HERE/hotspots.py" "$OUT/profile.txt" --top 25 >"$OUT/hotspots-all-threads.md"
  cat "$OUT/hotspots.md" >&2
fi

# --- summary -------------------------------------------------------------------------------------
if [[ -n "$PARTS" ]]; then
  python3 "$HERE/summarize.py" "$OUT" --rss-kb "$RSS_END" --rss-start-kb "$RSS_START" | tee "$OUT/summary.md"
fi
log "results in $OUT"
