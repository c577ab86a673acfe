#!/bin/sh
# Create the pinned build venv (default build/venv) for packaging/build-deb.sh.
#
# PyInstaller is installed from its sdist so its bootloader is compiled here with Debian's
# hardening flags (PIE, BIND_NOW, fortify, stack protector: lintian's hardening-* checks) and
# -g0 (with debug info the GNU build-id hashes pip's random temp path: not reproducible).
# --no-cache-dir: pip would otherwise reuse a cached wheel built with other flags.
# --no-build-isolation: the sdist is built with the pinned setuptools, not whatever is newest.
#
# Usage: packaging/make-venv.sh [VENV]   (PY=python3.11 to choose the interpreter; it must have a
# shared libpython, as Debian's python3 and pyenv builds with --enable-shared do)
set -eu
VENV=${1:-build/venv}
PY=${PY:-python3}
REQ=packaging/requirements-build.txt

"$PY" -c 'import sys, sysconfig
if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
    sys.exit("packaging/make-venv.sh: %s has no shared libpython; PyInstaller needs one" % sys.executable)'
rm -rf "$VENV"
"$PY" -m venv "$VENV"
# build backends first: the sdist build below runs without isolation
BOOTSTRAP='pip|setuptools|hatchling|pathspec|pluggy|tomlkit|trove-classifiers|packaging'
grep -E "^($BOOTSTRAP)==" "$REQ" > "$VENV/bootstrap.txt"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$VENV/bootstrap.txt"

eval "$(DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --export=sh)"
CFLAGS="$CFLAGS -g0"
export CFLAGS
PYINSTALLER_COMPILE_BOOTLOADER=1 "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    --no-cache-dir --no-build-isolation --no-binary pyinstaller -r "$REQ"
"$VENV/bin/python" -m pip check
# every installed distribution must be pinned in $REQ (a new transitive dependency fails here)
norm() { tr 'A-Z_' 'a-z-' | LC_ALL=C sort; }
"$VENV/bin/python" -m pip freeze --all --disable-pip-version-check | norm > "$VENV/freeze.txt"
grep -E '^[A-Za-z]' "$REQ" | sed 's/[[:space:]]*#.*//' | norm > "$VENV/pinned.txt"
if ! cmp -s "$VENV/freeze.txt" "$VENV/pinned.txt"; then
    echo "packaging/make-venv.sh: the venv differs from $REQ (< installed, > pinned):" >&2
    diff "$VENV/freeze.txt" "$VENV/pinned.txt" >&2 || true
    exit 1
fi
touch "$VENV/.stamp"
