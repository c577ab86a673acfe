#!/bin/bash
# Reproducibility check: two from-scratch `make deb` (build venv included) in two clean clones of
# HEAD at different paths must give byte-identical .debs. About 2-3 minutes.
#
# Usage: packaging/check-repro.sh        (make deb-repro; PY= selects the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
REV=$(git rev-parse HEAD)
BASE=build/repro
rm -rf "$BASE"; mkdir -p "$BASE"
for d in one two-at-another-path; do
    git clone -q --no-hardlinks . "$BASE/$d"
    git -C "$BASE/$d" checkout -q "$REV"
    echo "check-repro: building $REV in $BASE/$d" >&2
    make -s -C "$BASE/$d" deb PY="${PY:-python3}" > "$BASE/$d.log" 2>&1 \
        || { tail -20 "$BASE/$d.log" >&2; echo "check-repro: build in $BASE/$d failed" >&2; exit 1; }
done
a=$(ls "$BASE"/one/dist/hxgwd_*.deb); b=$(ls "$BASE"/two-at-another-path/dist/hxgwd_*.deb)
sha256sum "$a" "$b"
if cmp -s "$a" "$b"; then
    echo "check-repro: identical: $(basename "$a") $(sha256sum < "$a" | cut -c1-16)"
    rm -rf "$BASE"
else
    echo "check-repro: the two .debs differ; compare with diffoscope $a $b" >&2
    exit 1
fi
