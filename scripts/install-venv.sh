#!/usr/bin/env bash
# Install cacheport into a virtualenv: the one install step shared by
# scripts/bootstrap.sh (development: editable, with extras) and the Dockerfile
# (the image: a plain install), so a green test run means the image's step works.
#   scripts/install-venv.sh VENV [EXTRAS] [--editable]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:?usage: install-venv.sh VENV [EXTRAS] [--editable]}
EXTRAS=${2:-}
EDITABLE=${3:-}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" || { echo "python3 -m venv failed; install python3-venv" >&2; exit 1; }
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
spec="$ROOT"
[ -n "$EXTRAS" ] && spec="$ROOT[$EXTRAS]"
if [ "$EDITABLE" = "--editable" ]; then
    "$VENV/bin/python" -m pip install -q -e "$spec"
else
    "$VENV/bin/python" -m pip install -q --no-cache-dir "$spec"
fi
"$VENV/bin/cacheport" --version >/dev/null
