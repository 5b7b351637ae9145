#!/usr/bin/env bash
# Puts a valkey-server for the engine tests in DIR/usr/bin (default .cache/valkey), without
# changing the system: one on PATH is linked; else on Debian the valkey-server and
# valkey-tools packages are downloaded from the release's own suite (trixie and later) or
# its backports (bookworm: 8.0) with a private apt list, and unpacked with dpkg-deb -x.
# Optional: exit 1 when none can be had, and the Valkey tests are skipped.
#   scripts/valkey.sh [DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$ROOT/.cache/valkey}
BIN="$DIR/usr/bin/valkey-server"
if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
    exit 0
fi
mkdir -p "$DIR/usr/bin"
if command -v valkey-server >/dev/null 2>&1; then
    ln -sf "$(command -v valkey-server)" "$BIN"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || exit 1
# shellcheck source=/dev/null
. /etc/os-release
[ "${ID:-}" = debian ] && [ -n "${VERSION_CODENAME:-}" ] || exit 1
APT="$DIR/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs"
{
    echo "deb http://deb.debian.org/debian $VERSION_CODENAME main"
    echo "deb http://deb.debian.org/debian $VERSION_CODENAME-backports main"
} > "$APT/sources.list"
OPTS=(-o "Dir::Etc::sourcelist=$APT/sources.list" -o "Dir::Etc::sourceparts=-"
      -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "APT::Sandbox::User=root")
apt-get "${OPTS[@]}" update -qq >/dev/null 2>&1 || exit 1
(cd "$APT/debs" && apt-get "${OPTS[@]}" download valkey-server valkey-tools >/dev/null 2>&1) \
    || exit 1
for deb in "$APT/debs"/*.deb; do
    dpkg-deb -x "$deb" "$DIR"
done
rm -rf "$APT"
"$BIN" --version >/dev/null 2>&1
