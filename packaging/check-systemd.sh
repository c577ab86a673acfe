#!/bin/bash
# Check the hxgwd .deb under a real systemd: boot a minimal Debian bookworm with systemd-nspawn,
# install the package, then start / reload (good and bad config) / stop it and check the unit's
# states, with [server] workers = 2: the process tree, kill -9 of a worker (restarted by the
# supervisor) and of the supervisor (systemd kills the rest and restarts the unit)
# (packaging/check-systemd-inside.sh does that part, inside the container).
#
# Usage: packaging/check-systemd.sh dist/hxgwd_<version>_<arch>.deb   (as root; make
# deb-systemd-check). Works without systemd on the host (--register=no --keep-unit, nsenter).
#
# The debootstrapped rootfs is cached in build/nspawn/ (first run ~1 min, later ~15 s); each run
# boots a throw-away copy of it. MIRROR=... overrides the Debian mirror, which is otherwise taken
# from apt's sources. Every wait is bounded; the container is powered off and removed on exit.
set -euo pipefail
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive
cd "$(dirname "$0")/.."

DEB=${1:?usage: $0 path/to/hxgwd_VERSION_ARCH.deb}
[ -f "$DEB" ] || { echo "check-systemd: $DEB not found (make deb)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "check-systemd: must run as root" >&2; exit 2; }
SUITE=bookworm
VARIANT=minbase
INCLUDE=systemd,systemd-sysv,dbus,adduser,procps,ca-certificates,curl,zlib1g
NSPAWN=build/nspawn
CACHE=$NSPAWN/$SUITE-rootfs
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MACHINE=hxgwd-check-$$
RUN=$NSPAWN/run-$$

say() { printf 'check-systemd: %s\n' "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

apt_need() {   # apt_need COMMAND PACKAGE...
    command -v "$1" >/dev/null && return 0
    shift; say "installing $*"
    apt-get -q -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "$@" >/dev/null \
        || { apt-get -q -o DPkg::Lock::Timeout=300 update >/dev/null \
             && apt-get -q -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "$@" >/dev/null; }
}

# The Debian mirror apt uses here (deb822 .sources or one-line .list), main archive only.
apt_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            /^[[:space:]]*$/ { if (u != "" && s) { print u; done = 1; exit } u = ""; s = 0; next }
            tolower($1) == "uris:" { u = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) s = 1 }
            END { if (!done && u != "" && s) print u }' "$f"
    done
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | grep -v '^#' \
        | awk -v suite="$SUITE" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/) break;
                                  if ($(i + 1) == suite) print $i }' || true
}

NSPAWN_PID=
CPID=
cleanup() {
    local rc=$?
    set +e
    if [ -n "$CPID" ] && kill -0 "$CPID" 2>/dev/null; then
        in_container systemctl poweroff >/dev/null 2>&1
    fi
    if [ -n "$NSPAWN_PID" ]; then
        for _ in $(seq 60); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$NSPAWN_PID" 2>/dev/null; then
            say "container did not power off in 30 s: killing it"
            kill -KILL "$CPID" "$NSPAWN_PID" 2>/dev/null
        fi
        wait "$NSPAWN_PID" 2>/dev/null
    fi
    if [ $rc != 0 ] && [ -s "$RUN.console" ]; then
        say "container console (last 30 lines):"; tail -30 "$RUN.console" >&2
    fi
    rm -rf "$RUN" "$RUN.console"
    rmdir /run/systemd/nspawn/propagate/"$MACHINE" /run/systemd/nspawn/propagate \
          /run/systemd/nspawn/incoming 2>/dev/null
    [ $rc = 0 ] && say "PASS" || say "FAILED"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_container() {
    timeout --kill-after=5 180 nsenter --target "$CPID" --mount --uts --ipc --net --pid --cgroup \
        --root --wd -- /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb "$@"
}

T0=$(date +%s)
apt_need debootstrap debootstrap
apt_need systemd-nspawn systemd-container
[ -r "$KEYRING" ] || apt_need gpgv debian-archive-keyring

# --- the cached rootfs ------------------------------------------------------------------------
KEY="$SUITE $VARIANT $INCLUDE"
if [ ! -f "$CACHE/.hxgwd-rootfs" ] || [ "$(cat "$CACHE/.hxgwd-rootfs")" != "$KEY" ]; then
    MIRROR=${MIRROR:-$(apt_mirror | head -1)}
    [ -n "$MIRROR" ] || die "no Debian mirror for $SUITE in /etc/apt/sources.list*; set MIRROR="
    say "debootstrap $SUITE from $MIRROR into $CACHE (cached for later runs)"
    rm -rf "$CACHE" "$CACHE.tmp"
    mkdir -p "$NSPAWN"
    timeout 600 debootstrap --variant="$VARIANT" --include="$INCLUDE" --keyring="$KEYRING" \
        "$SUITE" "$CACHE.tmp" "$MIRROR" > "$NSPAWN/debootstrap.log" 2>&1 \
        || { tail -20 "$NSPAWN/debootstrap.log" >&2; die "debootstrap failed (log: $NSPAWN/debootstrap.log)"; }
    # quieter, faster boots: no getty on the console, no apt timers
    chroot "$CACHE.tmp" systemctl mask -q console-getty.service getty@tty1.service \
        apt-daily.timer apt-daily-upgrade.timer systemd-timesyncd.service 2>/dev/null || true
    : > "$CACHE.tmp/etc/machine-id"
    echo "$KEY" > "$CACHE.tmp/.hxgwd-rootfs"
    mv "$CACHE.tmp" "$CACHE"
fi
T1=$(date +%s)

# --- boot a throw-away copy -------------------------------------------------------------------
rm -rf "$RUN"
cp -a --reflink=auto "$CACHE" "$RUN"
install -m 0644 "$DEB" "$RUN/srv/hxgwd.deb"
install -m 0755 packaging/check-systemd-inside.sh "$RUN/srv/check-inside.sh"
say "booting $SUITE in systemd-nspawn ($MACHINE)"
timeout --kill-after=10 300 systemd-nspawn --quiet -D "$RUN" -M "$MACHINE" -b \
    --private-network --register=no --keep-unit --console=read-only > "$RUN.console" 2>&1 &
NSPAWN_PID=$!
# the container's PID 1: the process named systemd below the nspawn process
for _ in $(seq 100); do
    CPID=$(ps -e -o pid=,ppid=,comm= | awk -v root="$NSPAWN_PID" '
        { parent[$1] = $2; comm[$1] = $3 }
        END { for (p in comm) if (comm[p] == "systemd") {
                  q = p; while (q in parent && q != root && q > 1) q = parent[q]
                  if (q == root) { print p; exit } } }')
    [ -n "$CPID" ] && break
    kill -0 "$NSPAWN_PID" 2>/dev/null || die "systemd-nspawn exited: $(tail -5 "$RUN.console")"
    sleep 0.1
done
[ -n "$CPID" ] || die "no systemd in the container after 10 s"
# wait until systemd answers (the inside script then waits for the boot to finish)
for _ in $(seq 100); do in_container systemctl is-system-running >/dev/null 2>&1 && break
    [ "$(in_container systemctl is-system-running 2>/dev/null)" = starting ] && break; sleep 0.1; done
T2=$(date +%s)

# --- the checks -------------------------------------------------------------------------------
in_container /srv/check-inside.sh /srv/hxgwd.deb 2>&1 | tee "$NSPAWN/inside.log"
grep -q '^INSIDE: PASS$' "$NSPAWN/inside.log" || die "checks inside the container failed"
T3=$(date +%s)
say "timing: rootfs $((T1 - T0)) s, boot $((T2 - T1)) s, checks $((T3 - T2)) s"
