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
# Two workers (pytest-xdist), a whole test file to each (--dist loadfile: a file's module
# fixtures, e.g. the conformance run or a cluster, stay in one process). Most tests wait on
# the real servers and processes they start rather than compute, so two at once about halve
# the wall time on 2 cores. Every name a test makes on the machine (network namespaces,
# uids, containers) carries its pid, and each worker picks fixed ports from its own share
# below the ephemeral range (tests/support.py free_port, free_range).
# One process: scripts/test.sh -n 0 (e.g. for --pdb).
exec python -m pytest -n 2 --dist loadfile "$@"
