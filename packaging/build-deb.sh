#!/usr/bin/env bash
# Build the Debian package from this checkout and check it with lintian:
#   bash packaging/build-deb.sh [OUTDIR]        -> OUTDIR/portproxy_<version>_all.deb (default: dist/)
# Needs the Build-Depends of debian/control and lintian, from Debian:
#   apt-get build-dep ./ && apt-get install --no-install-recommends lintian
# (debhelper depends on man-db, whose installation starts man-db.service and enables
# man-db.timer; tests/system/test_packaging.py therefore builds inside a throw-away root.)
# The build runs in a scratch copy of the checkout (its files as git sees them, uncommitted
# changes included), so the tree stays clean and dpkg-buildpackage's output lands in OUTDIR.
set -euo pipefail
# Debian's own python3 and tools, whatever else (pyenv, a venv) is first on PATH.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
src="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$src/dist}" && cd "${1:-$src/dist}" && pwd)"
scratch="$(mktemp -d /tmp/portproxy-deb-XXXXXX)"
trap 'rm -rf "$scratch"' EXIT

mkdir "$scratch/portproxy"
if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$src" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
        [ -e "$f" ] && printf '%s\0' "$f"; done | xargs -0 cp --parents -t "$scratch/portproxy")
else
    tar -C "$src" --exclude=./.venv --exclude=./dist -cf - . | tar -C "$scratch/portproxy" -xf -
fi
(cd "$scratch/portproxy" && dpkg-buildpackage -us -uc -b >"$scratch/build.log" 2>&1) || {
    tail -n 40 "$scratch/build.log" >&2; echo "build-deb: dpkg-buildpackage failed" >&2; exit 1; }
deb="$(ls "$scratch"/portproxy_*_all.deb)"
cp "$deb" "$scratch"/portproxy_*.changes "$out/"
# lintian: errors and warnings fail the build; each remaining tag has an override with its reason.
lintian --fail-on error,warning "$out/$(basename "$deb")" >&2
echo "$out/$(basename "$deb")"
