#!/usr/bin/env bash
# Runs tests against an AddressSanitizer build of the native engine (engine.c and the
# framer): a copy of the tree in a temporary directory gets the sanitized extension, and
# Python runs with libasan preloaded. Usage: scripts/asan.sh [pytest args]
# (default: the engine's and the framer's tests). Leak checking is off: CPython's own
# allocations at exit would drown the report.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${CACHEPORT_VENV:-$ROOT/.venv}/bin/python
CC=${CC:-gcc}
LIBASAN=$("$CC" -print-file-name=libasan.so)
[ -e "$LIBASAN" ] || { echo "asan.sh: libasan not found (install gcc's sanitizer runtime)" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$ROOT/proxy" "$ROOT/tests" "$ROOT/pyproject.toml" "$WORK/"
rm -f "$WORK"/proxy/relay/_engine*.so
INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
# A build's sources, one a line, as pyproject.toml lists them.
sources() {
    "$PY" - "$ROOT" "$1" <<'EOF'
import sys, tomllib
root, name = sys.argv[1:]
with open(f"{root}/pyproject.toml", "rb") as f:
    builds = tomllib.load(f)["tool"]["setuptools"]["ext-modules"]
print("\n".join(f"{root}/{s}" for b in builds if b["name"] == name for s in b["sources"]))
EOF
}
mapfile -t SRC < <(sources proxy.relay._engine)
"$CC" -shared -fPIC -g -O1 -fsanitize=address,undefined -fno-omit-frame-pointer \
    -Wall -Wextra -Wno-missing-field-initializers -Wno-unused-parameter -I"$INC" \
    "${SRC[@]}" -o "$WORK/proxy/relay/_engine$SUFFIX" -lpthread
# The TLS build too, where libssl's headers are installed (tls_engine.c).
if [ -e /usr/include/openssl/ssl.h ]; then
    mapfile -t SRC < <(sources proxy.relay._engine_tls)
    "$CC" -shared -fPIC -g -O1 -fsanitize=address,undefined -fno-omit-frame-pointer \
        -Wall -Wextra -Wno-missing-field-initializers -Wno-unused-parameter -I"$INC" \
        -DCACHEPORT_TLS=1 "${SRC[@]}" \
        -o "$WORK/proxy/relay/_engine_tls$SUFFIX" -lpthread -lssl -lcrypto
fi
cd "$WORK"
[ $# -gt 0 ] || set -- tests/test_native_cluster.py tests/test_framer_fuzz.py tests/test_native.py \
    tests/test_native_tls.py
LD_PRELOAD="$LIBASAN" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1} \
    "$PY" -m pytest -q -p no:cacheprovider "$@"
