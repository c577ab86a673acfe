#!/bin/bash
# Build dist/hxgwd_<version>_<arch>.deb: PyInstaller onefile binary + staging tree + dpkg-deb.
#
# Reproducible: the same commit and build venv (packaging/make-venv.sh) give a byte-identical
# .deb, from any checkout path. The ingredients: PYTHONHASHSEED=0 (marshalled .pyc in the
# archive), SOURCE_DATE_EPOCH (dpkg-deb's ar/tar timestamps, the staging tree's mtimes), a
# bootloader built with -g0 (make-venv.sh), gzip -n, sorted md5sums, Installed-Size computed from
# file sizes (not from du, which depends on the file system).
#
# Usage: PYTHON=build/venv/bin/python packaging/build-deb.sh   (run from anywhere)
# Output: the .deb path on the last line of stdout.
set -euo pipefail
umask 022
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-build/venv/bin/python}
OUT=${OUT:-dist}
PYI=build/pyi
ROOT=build/deb/root
export LC_ALL=C.UTF-8 TZ=UTC

die() { echo "build-deb: $*" >&2; exit 1; }
[ -x "$PYTHON" ] || die "$PYTHON missing: run packaging/make-venv.sh (make deb does)"

VERSION=$("$PYTHON" -c 'import hxgwd; print(hxgwd.__version__)')
ARCH=$(dpkg --print-architecture)
CHANGELOG_VERSION=$(dpkg-parsechangelog -l debian/changelog -S Version)
[ "$VERSION" = "$CHANGELOG_VERSION" ] || die "hxgwd.__version__ is $VERSION but debian/changelog \
is at $CHANGELOG_VERSION: add an entry (dch -v $VERSION, or by hand)"

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || dpkg-parsechangelog -l debian/changelog -S Timestamp)
fi
export SOURCE_DATE_EPOCH PYTHONHASHSEED=0
echo "build-deb: hxgwd $VERSION $ARCH, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH" >&2

# --- 1. the binary -------------------------------------------------------------------------------
# The daemon imports its database drivers (SQLite, PostgreSQL, Redis) and its HTTP parser
# (httptools: llhttp in C, chosen at run time by hxgwd.http.resolve_parser) lazily, so
# PyInstaller's static analysis may not see them: collect them explicitly. hxgwd's own modules too, in case one
# is only reached through importlib. mypyc-compiled packages (coredis) import a shared runtime
# module "<hash>__mypyc" from C, also invisible: find it in the installed files.
mapfile -t MYPYC < <("$PYTHON" - <<'EOF'
import importlib.metadata as md
names = set()
for dist in md.distributions():
    for f in dist.files or ():
        top = str(f).split("/")[0]
        if "/" not in str(f) and "__mypyc" in top and top.endswith(".so"):
            names.add(top.split(".")[0])
print("\n".join(sorted(names)))
EOF
)
HIDDEN=()
for m in "${MYPYC[@]}"; do [ -n "$m" ] && HIDDEN+=(--hidden-import "$m"); done

rm -rf "$PYI"
"$PYTHON" -m PyInstaller --onefile --strip --clean --noconfirm --log-level WARN \
    --name hxgwd --paths . \
    --distpath "$PYI/dist" --workpath "$PYI/work" --specpath "$PYI" \
    --collect-submodules hxgwd \
    --hidden-import httpx --hidden-import sqlite3 \
    --collect-submodules httptools \
    --collect-submodules psycopg --collect-submodules psycopg_pool \
    --hidden-import psycopg_binary.pq --hidden-import psycopg_binary._psycopg \
    --collect-submodules coredis "${HIDDEN[@]}" \
    --add-data "$PWD/hxgwd/openapi.json:hxgwd" \
    packaging/entry.py
BIN=$PYI/dist/hxgwd
# The bootloader's .comment (compiler version) is not needed (lintian: binary-has-unneeded-section).
# Safe: PyInstaller 6 keeps its archive in an ELF section (pydata) that objcopy carries over.
objcopy --remove-section=.comment "$BIN"

# The frozen binary must behave like the source: version, hardening, lazily imported drivers.
got=$(env -i "$BIN" --version) || die "$BIN --version failed"
[ "${got%% (*}" = "hxgwd $VERSION" ] || die "$BIN --version says '$got', want 'hxgwd $VERSION (...)'"
[ "$got" = "hxgwd $VERSION (http parser: httptools)" ] \
    || die "$BIN --version says '$got', want '(http parser: httptools)': httptools not bundled?"
readelf -d "$BIN" | grep -q 'FLAGS_1.*NOW.*PIE' \
    || die "$BIN is not PIE + BIND_NOW: the bootloader was not compiled by packaging/make-venv.sh"
env -i HXGWD_FROZEN_SELFTEST=1 "$BIN" >&2 || die "frozen selftest failed (a missing hidden import?)"
env -i "$BIN" --check-config -c packaging/hxgwd.toml >/dev/null 2>&1 \
    || die "the packaged config does not pass --check-config"

# --- 2. the staging tree -------------------------------------------------------------------------
rm -rf "$ROOT"
install -D -m 0755 "$BIN"                   "$ROOT/usr/bin/hxgwd"
install -D -m 0640 packaging/hxgwd.toml     "$ROOT/etc/hxgwd/hxgwd.toml"
install -D -m 0644 packaging/hxgwd.service  "$ROOT/lib/systemd/system/hxgwd.service"
install -D -m 0644 debian/copyright         "$ROOT/usr/share/doc/hxgwd/copyright"
install -D -m 0644 debian/lintian-overrides "$ROOT/usr/share/lintian/overrides/hxgwd"
install -d -m 0755 "$ROOT/usr/share/man/man8" "$ROOT/usr/share/man/man5" "$ROOT/DEBIAN"
gzip -9n < debian/changelog  > "$ROOT/usr/share/doc/hxgwd/changelog.gz"
# the man pages' headers show this version and the date of its changelog entry; hxgwd.toml.5 is
# made from hxgwd.toml.example by docs/build.py (tests/test_man_pages.py checks it is up to date)
MANDATE=$(date -u -d "@$(dpkg-parsechangelog -l debian/changelog -S Timestamp)" +%Y-%m-%d)
sed -e "s/^\.TH HXGWD 8 .*/.TH HXGWD 8 \"$MANDATE\" \"hxgwd $VERSION\" \"System Administration\"/" \
    packaging/hxgwd.8 | gzip -9n > "$ROOT/usr/share/man/man8/hxgwd.8.gz"
sed -e "s/^\.TH HXGWD\.TOML 5 .*/.TH HXGWD.TOML 5 \"$MANDATE\" \"hxgwd $VERSION\" \"File Formats\"/" \
    packaging/hxgwd.toml.5 | gzip -9n > "$ROOT/usr/share/man/man5/hxgwd.toml.5.gz"
chmod 0644 "$ROOT/usr/share/doc/hxgwd/changelog.gz" "$ROOT/usr/share/man/man8/hxgwd.8.gz" \
    "$ROOT/usr/share/man/man5/hxgwd.toml.5.gz"
install -m 0644 debian/conffiles "$ROOT/DEBIAN/conffiles"
install -m 0755 debian/postinst debian/prerm debian/postrm "$ROOT/DEBIAN/"

# Installed-Size as dpkg-gencontrol computes it: KiB per file rounded up, 1 per dir/symlink.
SIZE=$(cd "$ROOT" && find . -path ./DEBIAN -prune -o -mindepth 1 -printf '%y %s\n' \
       | awk '{ n += ($1 == "f") ? int(($2 + 1023) / 1024) : 1 } END { print n }')
sed -e "s/@VERSION@/$VERSION/" -e "s/@INSTALLED_SIZE@/$SIZE/" -e "s/@ARCH@/$ARCH/" \
    debian/control.in > "$ROOT/DEBIAN/control"
(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum > DEBIAN/md5sums)
chmod 0644 "$ROOT/DEBIAN/control" "$ROOT/DEBIAN/md5sums"
find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

# --- 3. the package ------------------------------------------------------------------------------
mkdir -p "$OUT"
DEB=$OUT/hxgwd_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >&2
echo "build-deb: $(stat -c %s "$DEB") bytes, binary $(stat -c %s "$BIN") bytes, sha256 \
$(sha256sum "$DEB" | cut -d' ' -f1)" >&2
echo "$DEB"
