#!/bin/bash
# Check a built hxgwd .deb on this machine (root, no systemd needed): lintian, install, files and
# permissions, the binary as user hxgwd (check-config, a real request, SIGHUP reload, SIGTERM),
# the unit with systemd-analyze, then purge and check that nothing is left.
#
# Usage: packaging/check-deb.sh dist/hxgwd_<version>_<arch>.deb     (as root; make deb-check)
# It installs the package for real: it purges it again on exit, also on failure, and removes
# the hxgwd system user it created (the package itself keeps the user on purge, by convention).
set -euo pipefail
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive

DEB=${1:?usage: $0 path/to/hxgwd_VERSION_ARCH.deb}
[ -f "$DEB" ] || { echo "check-deb: $DEB not found (make deb)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "check-deb: must run as root (it installs the package)" >&2; exit 2; }
DEB=$(readlink -f "$DEB")
VERSION=$(dpkg-deb -f "$DEB" Version)
UNIT=/lib/systemd/system/hxgwd.service
CONFIG=/etc/hxgwd/hxgwd.toml

step() { printf '\n== %s\n' "$*"; }
ok()   { printf '   ok: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

# dpkg has no lock timeout: retry (bounded) while another job holds the dpkg lock.
dpkg_retry() {
    local n out
    for n in $(seq 60); do
        if out=$("$@" 2>&1); then [ -z "$out" ] || printf '%s\n' "$out"; return 0; fi
        grep -qi 'lock' <<<"$out" || { printf '%s\n' "$out" >&2; return 1; }
        sleep 5
    done
    printf '%s\n' "$out" >&2; return 1
}

apt_need() {   # apt_need COMMAND PACKAGE: install PACKAGE if COMMAND is missing
    command -v "$1" >/dev/null && return 0
    echo "check-deb: installing $2" >&2
    apt-get -q -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "$2" >/dev/null \
        || { apt-get -q -o DPkg::Lock::Timeout=300 update >/dev/null \
             && apt-get -q -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "$2" >/dev/null; }
}

WORK=$(mktemp -d /tmp/hxgwd-check.XXXXXX)
chmod 0755 "$WORK"    # user hxgwd reads the test config below it
PID=
cleanup() {
    local rc=$?
    set +e
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        kill -KILL "$PID"; wait "$PID" 2>/dev/null
    fi
    if dpkg-query -W -f='${db:Status-Status}' hxgwd 2>/dev/null | grep -qv '^not-installed$'; then
        echo "check-deb: purging hxgwd" >&2
        dpkg_retry dpkg -P hxgwd >/dev/null
    fi
    getent passwd hxgwd >/dev/null && deluser --quiet --system hxgwd >/dev/null 2>&1
    getent group hxgwd >/dev/null && delgroup --quiet --system hxgwd >/dev/null 2>&1
    rm -rf "$WORK"
    [ $rc = 0 ] && echo "check-deb: PASS ($VERSION)" || echo "check-deb: FAILED ($VERSION)" >&2
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "prerequisites"
apt_need lintian lintian
apt_need curl curl
apt_need python3 python3
# A leftover package or user from an earlier run would hide a broken install step.
if dpkg-query -W -f='${db:Status-Status}' hxgwd 2>/dev/null | grep -qv '^not-installed$'; then
    dpkg_retry dpkg -P hxgwd >/dev/null
fi
# The package's paths without the package: someone's data (e.g. hxgwd run as root with the
# default [database] creates /var/lib/hxgwd). The purge at the end would delete it: refuse.
for d in /etc/hxgwd /var/lib/hxgwd; do
    if [ -e "$d" ]; then
        echo "check-deb: $d exists but hxgwd is not installed; it is not ours to delete." >&2
        echo "check-deb: move it away (or stop whatever uses it) and run again." >&2
        trap - EXIT; rm -rf "$WORK"; exit 2
    fi
done
if getent passwd hxgwd >/dev/null; then deluser --quiet --system hxgwd >/dev/null 2>&1; fi
if getent group hxgwd >/dev/null; then delgroup --quiet --system hxgwd >/dev/null 2>&1; fi
! getent passwd hxgwd >/dev/null && ! getent group hxgwd >/dev/null || fail "cannot delete user hxgwd"
! dpkg-statoverride --list "$CONFIG" >/dev/null || dpkg-statoverride --remove "$CONFIG"
ok "clean start: no hxgwd package, user, group or statoverride"

step "lintian"
lintian --fail-on error,warning --display-info "$DEB" 2>/dev/null || fail "lintian: errors or warnings"
ok "lintian: no errors, no warnings"

step "dpkg -i $(basename "$DEB")"
dpkg_retry dpkg -i "$DEB"
[ "$(dpkg-query -W -f='${db:Status-Status} ${Version}' hxgwd)" = "installed $VERSION" ] \
    || fail "hxgwd $VERSION is not installed"
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd hxgwd) || fail "user hxgwd missing"
[ "$uid" -lt 1000 ] && [ "$shell" = /usr/sbin/nologin ] && [ "$home" = /nonexistent ] \
    || fail "user hxgwd: uid $uid, home $home, shell $shell"
[ "$(getent group hxgwd | cut -d: -f3)" = "$gid" ] || fail "group hxgwd is not the user's group"
ok "system user hxgwd (uid $uid), nologin, no home"
[ "$(stat -c '%a %U:%G' "$CONFIG")" = "640 root:hxgwd" ] \
    || fail "$CONFIG is $(stat -c '%a %U:%G' "$CONFIG"), want 640 root:hxgwd"
dpkg-statoverride --list "$CONFIG" | grep -qE "^root hxgwd 0?640 $CONFIG\$" \
    || fail "statoverride: $(dpkg-statoverride --list "$CONFIG")"
dpkg-query -W -f='${Conffiles}\n' hxgwd | grep -q " $CONFIG " || fail "$CONFIG is not a conffile"
ok "$CONFIG: conffile, 640 root:hxgwd (statoverride)"
[ "$(stat -c '%a %U:%G' /usr/bin/hxgwd)" = "755 root:root" ] || fail "/usr/bin/hxgwd perms"
[ "$(stat -c '%a %U:%G' /var/lib/hxgwd)" = "750 hxgwd:hxgwd" ] || fail "/var/lib/hxgwd perms"
[ "$(stat -c '%a %U:%G' $UNIT)" = "644 root:root" ] || fail "$UNIT perms"
[ -L /etc/systemd/system/multi-user.target.wants/hxgwd.service ] || fail "unit not enabled"
ok "/usr/bin/hxgwd 755, /var/lib/hxgwd 750 hxgwd, unit installed and enabled"

step "the installed binary"
out=$(env -i /usr/bin/hxgwd --version) || fail "env -i hxgwd --version"
[ "$out" = "hxgwd $VERSION (http parser: httptools)" ] \
    || fail "--version printed '$out', want 'hxgwd $VERSION (http parser: httptools)'"
ok "env -i /usr/bin/hxgwd --version: $out"
as_hxgwd() { setpriv --reuid=hxgwd --regid=hxgwd --init-groups --reset-env -- "$@"; }
as_hxgwd /usr/bin/hxgwd --check-config > "$WORK/check.out" 2>&1 \
    || { cat "$WORK/check.out" >&2; fail "hxgwd --check-config as user hxgwd"; }
grep -q "configuration OK" "$WORK/check.out" || fail "check-config output: $(cat "$WORK/check.out")"
ok "hxgwd --check-config as user hxgwd (default path $CONFIG): OK"
if setpriv --reuid=nobody --regid=nogroup --clear-groups -- /usr/bin/hxgwd --check-config >/dev/null 2>&1; then
    fail "user nobody can read $CONFIG"
fi
ok "user nobody cannot read the config (--check-config fails)"
env -i /usr/bin/hxgwd genkey --name deb-check | grep -q '^\[\[keys\]\]$' || fail "hxgwd genkey"
ok "hxgwd genkey prints a [[keys]] entry"

step "systemd-analyze"
out=$(systemd-analyze verify --man=no "$UNIT" 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify printed (it exits 0 on warnings): $out"
ok "systemd-analyze verify: silent"
# systemd 252's --threshold is on a 0-100 scale: 20 means an exposure of 2.0
score=$(systemd-analyze security --offline=true --threshold=20 --no-pager "$UNIT" 2>&1 | tail -1) \
    || fail "systemd-analyze security above 2.0: $score"
ok "systemd-analyze security:${score#*:}"

step "run the daemon as user hxgwd"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
KEY="sk-check-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
KEYSHA=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
install -d -m 0750 -o root -g hxgwd "$WORK/etc"
CFG=$WORK/etc/hxgwd.toml
# the installed config, on a free port, with a test key (the packaged one has none: all 401), and
# http_parser = "httptools" explicitly (the default "auto" would fall back to h11 without it; this
# way the daemon refuses to start if the bundled httptools cannot be imported)
edit_config() {
    { sed -e "s/^listen = .*/listen = [\"127.0.0.1:$PORT\"]\nhttp_parser = \"httptools\"/" "$CONFIG"
      printf '\n[[keys]]\nname = "deb-check"\nsha256 = "%s"\n' "$KEYSHA"
      cat; } > "$CFG.new"
    chown root:hxgwd "$CFG.new"; chmod 0640 "$CFG.new"; mv "$CFG.new" "$CFG"
}
edit_config </dev/null
grep -q "127.0.0.1:$PORT" "$CFG" || fail "could not set the port in the copy of $CONFIG"
LOG=$WORK/hxgwd.log
setpriv --reuid=hxgwd --regid=hxgwd --init-groups --reset-env -- \
    /usr/bin/hxgwd -c "$CFG" 2>"$LOG" &
PID=$!
URL=http://127.0.0.1:$PORT
get()  { curl -sS --max-time 5 -H "Authorization: Bearer $KEY" "$@"; }
json() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"; }
for _ in $(seq 100); do
    curl -sf --max-time 1 "$URL/healthz" >/dev/null 2>&1 && break
    kill -0 $PID 2>/dev/null || { cat "$LOG" >&2; fail "hxgwd exited at start"; }
    sleep 0.1
done
health=$(curl -sS --max-time 5 "$URL/healthz") || { cat "$LOG" >&2; fail "no /healthz after 10 s"; }
[ "$(json 'd["generation"]' <<<"$health")" = 1 ] || fail "/healthz: $health"
ok "GET /healthz: $health"
grep '"msg":"listening"' "$LOG" | grep -q '"http_parser":"httptools"' \
    || fail "the daemon does not run httptools: $(grep '"msg":"listening"' "$LOG")"
ok "the daemon listens with http_parser httptools (llhttp, bundled)"
doc=$(curl -sS --max-time 5 "$URL/openapi.json") || fail "GET /openapi.json"
[ "$(json 'd["info"]["version"]' <<<"$doc")" = "$VERSION" ] || fail "/openapi.json: $(head -c 200 <<<"$doc")"
ok "GET /openapi.json without a key: the OpenAPI document of $VERSION (bundled package data)"
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$URL/v1/models")
[ "$code" = 401 ] || fail "GET /v1/models without a key: HTTP $code, want 401"
ok "GET /v1/models without a key: 401"
reply=$(get -H 'Content-Type: application/json' "$URL/v1/chat/completions" \
    -d '{"model": "echo-chat", "messages": [{"role": "user", "content": "hello from check-deb"}]}') \
    || fail "POST /v1/chat/completions"
content=$(json 'd["choices"][0]["message"]["content"]' <<<"$reply") || fail "chat reply: $reply"
grep -q "hello from check-deb" <<<"$content" || fail "echo reply does not echo: $reply"
ok "POST /v1/chat/completions (echo-chat): $(head -c 80 <<<"$content")"

printf '\n[[models]]\nname = "echo-chat-2"\nbackend = "echo"\n' | edit_config
kill -HUP $PID
for _ in $(seq 50); do
    [ "$(curl -sS --max-time 2 "$URL/healthz" | json 'd["generation"]')" = 2 ] && break
    sleep 0.1
done
health=$(curl -sS --max-time 5 "$URL/healthz")
[ "$(json 'd["generation"]' <<<"$health")" = 2 ] || fail "SIGHUP: generation did not go to 2: $health"
models=$(get "$URL/v1/models" | json '" ".join(sorted(m["id"] for m in d["data"]))')
grep -qw echo-chat-2 <<<"$models" || fail "SIGHUP: echo-chat-2 not in /v1/models: $models"
ok "edit + SIGHUP: generation 1 -> 2, /v1/models: $models"

echo 'this is [not toml' | edit_config
kill -HUP $PID
for _ in $(seq 50); do grep -q rejected "$LOG" && break; sleep 0.1; done
grep -q rejected "$LOG" || echo "   warning: no 'rejected' line in the log after a bad reload" >&2
health=$(curl -sS --max-time 5 "$URL/healthz") || fail "no /healthz after a bad reload"
[ "$(json 'd["generation"]' <<<"$health")" = 2 ] || fail "bad reload changed the generation: $health"
get -o /dev/null -f "$URL/v1/models" || fail "bad reload: the old config does not serve"
ok "bad config + SIGHUP: rejected, generation stays 2, still serving"

kill -TERM $PID
for _ in $(seq 300); do kill -0 $PID 2>/dev/null || break; sleep 0.1; done
kill -0 $PID 2>/dev/null && fail "hxgwd still running 30 s after SIGTERM"
rc=0; wait $PID || rc=$?
PID=
[ $rc = 0 ] || { tail -5 "$LOG" >&2; fail "SIGTERM: exit status $rc, want 0"; }
ok "SIGTERM: exit 0"
bad=$(find /var/lib/hxgwd ! -user hxgwd | head -3)
[ -z "$bad" ] || fail "files in /var/lib/hxgwd not owned by hxgwd: $bad"
ok "/var/lib/hxgwd after the run, all owned by hxgwd: $(cd /var/lib/hxgwd && ls | paste -sd' ')"
left=$(find /tmp -maxdepth 1 -name '_MEI*' -user hxgwd 2>/dev/null | wc -l)
[ "$left" = 0 ] || fail "$left onefile unpack dir(s) left in /tmp"
ok "no /tmp/_MEI* left behind"

step "upgrade (the same files repacked as $VERSION+check1)"
echo "# local edit by check-deb" >> "$CONFIG"
dpkg-deb -R "$DEB" "$WORK/repack"
sed -i "s/^Version: .*/Version: $VERSION+check1/" "$WORK/repack/DEBIAN/control"
dpkg-deb --root-owner-group -b "$WORK/repack" "$WORK/upgrade.deb" >/dev/null
dpkg_retry dpkg --force-confdef --force-confold -i "$WORK/upgrade.deb"
[ "$(dpkg-query -W -f='${Version}' hxgwd)" = "$VERSION+check1" ] || fail "upgrade not installed"
tail -1 "$CONFIG" | grep -q "local edit by check-deb" || fail "upgrade lost the local config edit"
[ "$(stat -c '%a %U:%G' "$CONFIG")" = "640 root:hxgwd" ] || fail "upgrade changed $CONFIG perms"
[ "$(id -u hxgwd)" = "$uid" ] || fail "upgrade changed the uid of hxgwd"
ok "upgraded: local config edit kept, 640 root:hxgwd kept, same user"

step "dpkg -P hxgwd"
dpkg_retry dpkg -P hxgwd
for path in /etc/hxgwd /usr/bin/hxgwd /var/lib/hxgwd $UNIT \
            /etc/systemd/system/multi-user.target.wants/hxgwd.service \
            /var/lib/systemd/deb-systemd-helper-enabled/hxgwd.service.dsh-also \
            /usr/share/doc/hxgwd /usr/share/man/man8/hxgwd.8.gz /usr/share/man/man5/hxgwd.toml.5.gz; do
    [ ! -e "$path" ] && [ ! -L "$path" ] || fail "purge left $path"
done
dpkg-statoverride --list "$CONFIG" >/dev/null && fail "purge left the statoverride of $CONFIG"
[ "$(dpkg-query -W -f='${db:Status-Status}' hxgwd 2>/dev/null || echo not-installed)" = not-installed ] \
    || fail "hxgwd still known to dpkg"
ok "purged: no files, no statoverride, no unit state (user hxgwd kept by design)"
