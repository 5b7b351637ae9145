#!/usr/bin/env bash
# Redis's own test suite, direct and through every kind of cacheport listener
# (docs/conformance.md). Sets up what it needs (scripts/bootstrap.sh: apt packages, the
# deb-src entry, .venv), then runs python -m bench.conformance with these arguments:
#   scripts/conformance.sh                 # every unit, about half an hour
#   scripts/conformance.sh --subset        # the units CI runs, about three minutes
#   scripts/conformance.sh --units unit/protocol --kinds native python
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=scripts/bootstrap.sh
source "$ROOT/scripts/bootstrap.sh"
exec python -m bench.conformance "$@"
