#!/usr/bin/env bash
# Set up (apt packages, .venv, cacheport[dev]) and run every check CI runs:
# ruff, mypy and the pytest suite against real memcached and redis-server.
# Extra arguments go to pytest, e.g. scripts/test.sh -k relay -x
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=scripts/bootstrap.sh
source "$ROOT/scripts/bootstrap.sh"

echo "==> ruff check" >&2
ruff check proxy tests bench
echo "==> mypy (strict) proxy/" >&2
mypy
echo "==> pytest" >&2
exec python -m pytest "$@"
