#!/bin/bash
# Runs INSIDE the bookworm container booted by packaging/check-systemd.sh (do not run it on a
# real host: it installs, breaks and purges hxgwd). Argument: the .deb path inside the container.
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

step "systemctl stop / start"
systemctl stop hxgwd
expect "inactive dead success" "systemctl stop"
t0=$(date +%s%N)
systemctl start hxgwd || fail "systemctl start"
start_ms=$(ms_since "$t0")
expect "active running success" "systemctl start (returned after READY=1, in $start_ms ms)"
wait_gen 1 || fail "/healthz: generation $(gen), want 1"
ok "GET /healthz: $(curl -sS --max-time 3 "$URL/healthz")"
main=$(systemctl show -p MainPID --value hxgwd)
users=$(ps -o user= -p "$main" --ppid "$main" | sort -u | paste -sd' ')
[ "$users" = hxgwd ] || fail "processes run as '$users', want hxgwd"
ok "MainPID $main and its child run as user hxgwd"
ok "status: $(systemctl show -p StatusText --value hxgwd)"
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
t0=$(date +%s%N)
systemctl reload hxgwd || fail "systemctl reload (good config)"
reload_ms=$(ms_since "$t0")
wait_gen 2 || fail "after reload: generation $(gen), want 2"
expect "active running success" "systemctl reload ($reload_ms ms): generation 1 -> 2"
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

step "systemctl stop"
cp -p /root/hxgwd.toml.good "$CONFIG"
t0=$(date +%s%N)
systemctl stop hxgwd
stop_ms=$(ms_since "$t0")
expect "inactive dead success" "systemctl stop ($stop_ms ms)"
st=$(systemctl show -p ExecMainStatus --value hxgwd)
[ "$st" = 0 ] || fail "ExecMainStatus=$st, want 0"
ok "exit status 0"
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
