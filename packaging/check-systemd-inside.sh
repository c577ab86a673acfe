#!/bin/bash
# Runs INSIDE the bookworm container booted by packaging/check-systemd.sh (do not run it on a
# real host: it installs, breaks and purges hxgwd). Argument: the .deb path inside the container.
# The packaged config starts with workers = "auto"; the checks then set [server] workers = 2, so
# that the process tree is known whatever the CPU count: bootloader (MainPID) -> supervisor ->
# 2 workers, each one process reusing the bootloader's unpack directory.
set -euo pipefail
export LC_ALL=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 DEBIAN_FRONTEND=noninteractive
DEB=$1
CONFIG=/etc/hxgwd/hxgwd.toml
URL=http://127.0.0.1:4010

step() { printf '\n== %s\n' "$*"; }
ok()   { printf '   ok: %s\n' "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*"
    systemctl status --no-pager --lines=0 hxgwd 2>&1 | sed 's/^/   | /' || true
    journalctl -u hxgwd --no-pager -n 30 -o short-monotonic 2>&1 | sed 's/^/   | /' || true
    exit 1
}
prop()   { systemctl show -p "$1" --value hxgwd; }
state()  { echo "$(prop ActiveState) $(prop SubState) $(prop Result)"; }
expect() { local s; s=$(state); [ "$s" = "$1" ] || fail "$2: state '$s', want '$1'"; ok "$2: $s"; }
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
gen() { curl -sS --max-time 3 "$URL/healthz" 2>/dev/null | sed -n 's/.*"generation": *\([0-9]*\).*/\1/p'; }
wait_gen() { for _ in $(seq 50); do [ "$(gen)" = "$1" ] && return 0; sleep 0.1; done; return 1; }
api() { curl -sS -f --max-time 5 -H "Authorization: Bearer $KEY" "$@"; }
WORKERS=2

# The unit's processes, from its cgroup (hybrid hierarchy in nspawn: unified/ or systemd/).
cg_procs() {
    local cg f
    cg=$(prop ControlGroup)
    [ -n "$cg" ] || return 0
    for f in /sys/fs/cgroup$cg/cgroup.procs /sys/fs/cgroup/unified$cg/cgroup.procs \
             /sys/fs/cgroup/systemd$cg/cgroup.procs; do
        [ -r "$f" ] && { sort -n "$f" | paste -sd' '; return 0; }
    done
}
kids()    { { ps -o pid= --ppid "$1" || true; } | tr -d ' ' | paste -sd' '; }
cmdline() { tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null || true; }
envvar()  { { tr '\0' '\n' < "/proc/$1/environ" 2>/dev/null || true; } | sed -n "s/^$2=//p"; }
started() { awk '{ print $22 }' "/proc/$1/stat" 2>/dev/null || true; }   # pid + start time: no reuse
worker_pid() {   # worker_pid PARENT INDEX: the child of PARENT started with --worker INDEX:FD
    local k
    for k in $(kids "$1"); do cmdline "$k" | grep -q -- "--worker $2:" && echo "$k"; done
    return 0
}
cursor()  { journalctl -n0 --show-cursor -q | sed -n 's/^-- cursor: //p'; }
# since CURSOR [FORMAT]: the whole journal after CURSOR (-o cat; short: with "hxgwd[PID]:"). No
# matches (-u, _PID=): journalctl 252 --after-cursor then skips the first matching entry whenever
# the cursor's own entry does not match.
since()   { journalctl --after-cursor="$1" --no-pager -o "${2:-cat}"; }
# wait_log CURSOR REGEX [FORMAT]: up to 10 s for a journal line after CURSOR
wait_log() {
    for _ in $(seq 100); do since "$1" "${3:-cat}" | grep -Eq -- "$2" && return 0; sleep 0.1; done
    return 1
}
# The process tree with WORKERS workers; sets MAIN, SUP and W0 W1 ... (worker pids by index).
tree() {
    local procs n want=$((WORKERS + 2)) i w home
    MAIN=$(prop MainPID)
    procs=$(cg_procs)
    n=$(wc -w <<<"$procs")
    [ "$n" = "$want" ] || fail "cgroup holds $n processes ($procs), want $want: bootloader, supervisor, $WORKERS workers"
    SUP=$(kids "$MAIN")
    [ "$(wc -w <<<"$SUP")" = 1 ] || fail "MainPID $MAIN (bootloader) has children '$SUP', want one (the supervisor)"
    [ "$(wc -w <<<"$(kids "$SUP")")" = "$WORKERS" ] \
        || fail "supervisor $SUP has children '$(kids "$SUP")', want $WORKERS workers"
    home=$(envvar "$SUP" _PYI_APPLICATION_HOME_DIR)
    for i in $(seq 0 $((WORKERS - 1))); do
        w=$(worker_pid "$SUP" "$i")
        [ "$(wc -w <<<"$w")" = 1 ] || fail "worker $i: pids '$w' among the supervisor's children"
        [ -z "$(kids "$w")" ] || fail "worker $i ($w) has children '$(kids "$w")': want one process per worker"
        [ "$(readlink "/proc/$w/exe")" = /usr/bin/hxgwd ] || fail "worker $i runs $(readlink "/proc/$w/exe")"
        [ "$(envvar "$w" _PYI_APPLICATION_HOME_DIR)" = "$home" ] \
            || fail "worker $i unpacked itself again ($(envvar "$w" _PYI_APPLICATION_HOME_DIR), supervisor: $home)"
        [ -z "$(envvar "$w" NOTIFY_SOCKET)" ] || fail "worker $i has NOTIFY_SOCKET"
        eval "W$i=$w"
    done
    for p in $procs; do
        [ "$(ps -o user= -p "$p")" = hxgwd ] || fail "process $p runs as $(ps -o user= -p "$p"), want hxgwd"
    done
}
show_tree() { ps -o pid,ppid,sid,user,args --forest -p "$(cg_procs | tr ' ' ,)" | sed 's/^/   | /'; }

step "boot"
for _ in $(seq 120); do
    s=$(systemctl is-system-running 2>/dev/null || true)
    case $s in running|degraded) break ;; esac
    sleep 0.5
done
ok "system: $s ($(systemctl --version | head -1))"

step "dpkg -i (postinst creates the user, enables and starts the unit)"
dpkg -i "$DEB" 2>&1 | sed 's/^/   | /'
[ "$(systemctl is-enabled hxgwd)" = enabled ] || fail "unit not enabled"
expect "active running success" "started by postinst"
n=$(nproc)
if [ "$n" -gt 1 ]; then
    prop StatusText | grep -q "with $n workers\$" \
        || fail "workers = \"auto\" with $n CPUs: status '$(prop StatusText)', want $n workers"
fi
ok "packaged workers = \"auto\": $(prop StatusText) ($n CPUs)"

step "[server] workers = $WORKERS (the rest of the checks run with it)"
sed -i 's/^workers = "auto"$/workers = '"$WORKERS"'/' "$CONFIG"
grep -q "^workers = $WORKERS\$" "$CONFIG" || fail "no 'workers = \"auto\"' line to change in $CONFIG"
systemctl restart hxgwd || fail "systemctl restart"
expect "active running success" "restarted"

step "systemctl stop / start"
systemctl stop hxgwd
expect "inactive dead success" "systemctl stop"
t0=$(date +%s%N)
systemctl start hxgwd || fail "systemctl start"
start_ms=$(ms_since "$t0")
expect "active running success" "systemctl start (returned after READY=1, in $start_ms ms)"
wait_gen 1 || fail "/healthz: generation $(gen), want 1"
ok "GET /healthz: $(curl -sS --max-time 3 "$URL/healthz")"
prop StatusText | grep -q "with $WORKERS workers\$" || fail "status '$(prop StatusText)', want $WORKERS workers"
ok "status: $(prop StatusText)"
tree
show_tree
ok "bootloader $MAIN (MainPID) -> supervisor $SUP -> workers $W0 $W1: one process each (no second bootloader), all user hxgwd"
meis=$({ ls -d /tmp/systemd-private-*-hxgwd.service-*/tmp/_MEI* 2>/dev/null || true; } | wc -l)
[ "$meis" = 1 ] || fail "$meis onefile unpack directories in the service's /tmp, want 1"
ok "workers reuse the bootloader's unpack directory $(envvar "$SUP" _PYI_APPLICATION_HOME_DIR) (1 in PrivateTmp), no NOTIFY_SOCKET"
bad=$(find /var/lib/hxgwd ! -user hxgwd | head -3)
[ -z "$bad" ] || fail "files in /var/lib/hxgwd not owned by hxgwd: $bad"
ok "/var/lib/hxgwd (StateDirectory): $(stat -c '%a %U' /var/lib/hxgwd), holds: $(ls /var/lib/hxgwd | paste -sd' ')"
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$URL/v1/models")
[ "$code" = 401 ] || fail "GET /v1/models with the packaged config (no keys): $code, want 401"
ok "packaged config: /v1/models without keys -> 401"

step "systemctl reload with a good config"
KEY="sk-check-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
cp -p "$CONFIG" /root/hxgwd.toml.orig
printf '\n[[keys]]\nname = "systemd-check"\nsha256 = "%s"\n\n[[models]]\nname = "echo-chat-2"\nbackend = "echo"\n' \
    "$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)" >> "$CONFIG"
c=$(cursor)
t0=$(date +%s%N)
systemctl reload hxgwd || fail "systemctl reload (good config)"
reload_ms=$(ms_since "$t0")
wait_gen 2 || fail "after reload: generation $(gen), want 2"
expect "active running success" "systemctl reload ($reload_ms ms): generation 1 -> 2"
# the supervisor's line has no "worker" tag (workers' lines: "msg":"config reloaded","worker":N)
wait_log "$c" '"msg":"config reloaded","event"' || fail "no 'config reloaded' from the supervisor"
host=$(since "$c" | grep '"msg":"config reloaded"' | grep -v '"worker":' || true)
[ "$(grep -c . <<<"$host")" = 1 ] || fail "supervisor's 'config reloaded' lines: $(grep -c . <<<"$host"), want 1"
grep -q '"generation":2,.*"workers":\[0,1\]' <<<"$host" || fail "reload line: $host"
ok "journal, once from the supervisor: $host"
per=$(since "$c" | grep '"msg":"config reloaded"' | grep -c '"worker":' || true)
[ "$per" = 0 ] || printf '   NOTE: %s more "config reloaded" line(s) from the workers themselves ("worker": N, "config": null)\n' "$per"
api -H 'Content-Type: application/json' "$URL/v1/chat/completions" \
    -d '{"model": "echo-chat-2", "messages": [{"role": "user", "content": "hi"}]}' >/dev/null \
    || fail "chat completion on the reloaded model echo-chat-2"
ok "POST /v1/chat/completions with the new key on the new model echo-chat-2"
cp -p "$CONFIG" /root/hxgwd.toml.good

step "systemctl reload with a bad config"
echo 'listen = [ "broken' >> "$CONFIG"
if systemctl reload hxgwd 2>/dev/null; then fail "systemctl reload succeeded with a bad config"; fi
ok "systemctl reload failed (ExecReload's --check-config)"
expect "active running success" "service after the failed reload"
[ "$(gen)" = 2 ] || fail "generation $(gen) after the failed reload, want 2"
api -o /dev/null "$URL/v1/models" || fail "the old config does not serve after the failed reload"
ok "still generation 2, old config serving"

step "kill -9 of a worker: the supervisor restarts it, the host keeps answering"
cp -p /root/hxgwd.toml.good "$CONFIG"
tree
old_main=$MAIN old_sup=$SUP victim=$W0 other=$W1
c=$(cursor)
kill -KILL "$victim"
answered=0
for _ in $(seq 20); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$URL/healthz" || true)
    [ "$code" = 200 ] && answered=$((answered + 1))
    sleep 0.05
done
[ "$answered" = 20 ] || fail "after kill -9 of worker 0: $answered/20 requests answered"
ok "kill -9 worker 0 (pid $victim): 20/20 /healthz answered meanwhile"
wait_log "$c" '"msg":"worker died: restarting","worker":0,"exit":"killed by SIGKILL"' \
    || fail "no 'worker died: restarting' for worker 0 in the journal"
ok "journal: $(since "$c" | grep -m1 '"msg":"worker died')"
for _ in $(seq 100); do
    new=$(worker_pid "$SUP" 0)
    [ -n "$new" ] && [ "$new" != "$victim" ] && since "$c" | grep -q "\"msg\":\"worker serving\",\"worker\":0,\"pid\":$new," && break
    sleep 0.1
done
since "$c" | grep -q "\"msg\":\"worker serving\",\"worker\":0,\"pid\":$new," \
    || fail "no new worker 0 serving within 10 s (pids: $(kids "$SUP"))"
tree
[ "$MAIN $SUP" = "$old_main $old_sup" ] || fail "bootloader/supervisor changed: $old_main $old_sup -> $MAIN $SUP"
[ "$W0" = "$new" ] && [ "$W1" = "$other" ] || fail "workers $W0 $W1, want $new $other"
expect "active running success" "unit untouched (NRestarts=$(prop NRestarts), MainPID $MAIN)"
ok "journal: $(since "$c" | grep -m1 '"msg":"worker serving"')"
# the new worker serves: with the other one stopped, every connection is accepted by it
c=$(cursor)
kill -STOP "$other"
served=0
for _ in $(seq 5); do
    api -o /dev/null "$URL/v1/models" && served=$((served + 1))
done
kill -CONT "$other"
[ "$served" = 5 ] || fail "new worker 0 ($new) answered $served/5 requests while worker 1 was stopped"
for _ in $(seq 100); do     # access lines are written in batches, and the journal lags a little
    lines=$(since "$c" short | grep -c "hxgwd\[$new\]: {.*\"msg\":\"request\",\"worker\":0," || true)
    [ "$lines" = 5 ] && break
    sleep 0.1
done
[ "$lines" = 5 ] || fail "access log lines of pid $new tagged worker 0 within 10 s: $lines, want 5"
ok "new worker 0 (pid $new) served 5/5 GET /v1/models (access log: pid $new, \"worker\": 0)"

step "kill -9 of the supervisor: the bootloader exits, systemd kills the rest and restarts the unit"
tree
old_pids=""
for p in $(cg_procs); do old_pids="$old_pids $p:$(started "$p")"; done
restarts=$(prop NRestarts)
systemctl reset-failed hxgwd 2>/dev/null || true     # the start limit counts this restart too
c=$(cursor)
kill -KILL "$SUP"
for _ in $(seq 150); do
    [ "$(prop NRestarts)" != "$restarts" ] && [ "$(state)" = "active running success" ] && break
    sleep 0.1
done
expect "active running success" "restarted by Restart=on-failure (NRestarts $restarts -> $(prop NRestarts))"
for ps in $old_pids; do
    p=${ps%%:*}
    [ "$(started "$p")" != "${ps#*:}" ] || fail "process $p of the killed supervisor's unit is still running: $(cmdline "$p")"
done
ok "none of the old processes ($(for ps in $old_pids; do printf '%s ' "${ps%%:*}"; done)) is left"
since "$c" | grep -q "Main process exited, code=killed, status=9/KILL" \
    || fail "no 'Main process exited, code=killed' in the journal"
since "$c" | grep -E 'Main process exited|Killing process|Failed with result|Scheduled restart|supervisor is gone' \
    | sed 's/^/   | /' || true
wait_gen 1 || fail "/healthz after the restart: generation $(gen)"
tree
ok "serving again: bootloader $MAIN -> supervisor $SUP -> workers $W0 $W1"

step "systemctl stop"
t0=$(date +%s%N)
systemctl stop hxgwd
stop_ms=$(ms_since "$t0")
expect "inactive dead success" "systemctl stop ($stop_ms ms)"
st=$(systemctl show -p ExecMainStatus --value hxgwd)
[ "$st" = 0 ] || fail "ExecMainStatus=$st, want 0"
ok "exit status 0"
left=$(pgrep -u hxgwd | paste -sd' ' || true)
[ -z "$left" ] && [ -z "$(prop ControlGroup)" ] || fail "processes left after stop: $left (cgroup '$(prop ControlGroup)')"
ok "no process left (supervisor and $WORKERS workers gone, cgroup removed)"
left=$(find /tmp /var/tmp -maxdepth 1 -name 'systemd-private-*-hxgwd.service-*' | wc -l)
[ "$left" = 0 ] || fail "$left PrivateTmp dir(s) (with the onefile unpack dirs) left after stop"
ok "PrivateTmp (where the binary unpacked itself) removed"

step "systemctl start with a bad config"
echo 'this is not toml [' > "$CONFIG"
if systemctl start hxgwd 2>/dev/null; then fail "started with a bad config"; fi
res=$(systemctl show -p Result --value hxgwd)
[ "$res" = exit-code ] || fail "Result=$res, want exit-code"
ok "systemctl start failed in ExecStartPre (Result=exit-code, Restart= retries, bounded by StartLimit)"
systemctl stop hxgwd; systemctl reset-failed hxgwd 2>/dev/null || true
cp -p /root/hxgwd.toml.orig "$CONFIG"
systemctl start hxgwd || fail "start after restoring the config"
expect "active running success" "config restored, started again"

step "upgrade (the same files repacked with a higher version): postinst restarts the service"
old_pid=$(prop MainPID)
version=$(dpkg-query -W -f='${Version}' hxgwd)
rm -rf /root/repack
dpkg-deb -R "$DEB" /root/repack
sed -i "s/^Version: .*/Version: $version+check1/" /root/repack/DEBIAN/control
dpkg-deb --root-owner-group -b /root/repack /root/upgrade.deb >/dev/null
dpkg --force-confdef --force-confold -i /root/upgrade.deb 2>&1 | sed 's/^/   | /'
expect "active running success" "after the upgrade"
[ "$(prop MainPID)" != "$old_pid" ] || fail "the upgrade did not restart the service"
wait_gen 1 || fail "/healthz after the upgrade: generation $(gen)"
ok "restarted by the upgrade (MainPID $old_pid -> $(prop MainPID)), serving"

step "dpkg -P (prerm stops the service)"
dpkg -P hxgwd 2>&1 | sed 's/^/   | /'
s="$(prop ActiveState) $(prop LoadState)"
[ "$s" = "inactive not-found" ] || fail "after purge: $s, want 'inactive not-found'"
for p in /etc/hxgwd /usr/bin/hxgwd /var/lib/hxgwd /lib/systemd/system/hxgwd.service \
         /etc/systemd/system/multi-user.target.wants/hxgwd.service; do
    [ ! -e "$p" ] && [ ! -L "$p" ] || fail "purge left $p"
done
ok "purged: stopped, unit gone, no files left"
echo "TIMES start_ms=$start_ms reload_ms=$reload_ms stop_ms=$stop_ms"
echo "INSIDE: PASS"
