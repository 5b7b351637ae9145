#!/usr/bin/env bash
# The local demo: real memcached and redis-server on loopback behind cacheport
# (config/demo.yaml). Sets everything up first. Serves until Ctrl-C; with
# --once it checks both paths through cacheport and exits.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=scripts/bootstrap.sh
CACHEPORT_SETUP=demo source "$ROOT/scripts/bootstrap.sh"

ONCE=0
[ "${1:-}" = "--once" ] && ONCE=1
MC_PORT=21211 RD_PORT=26379 MC_PROXY=11311 RD_PROXY=6479
RUN=$(mktemp -d /tmp/cacheport-demo.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in $MC_PORT $RD_PORT $MC_PROXY $RD_PROXY; do
    port_free "$port" || die "port 127.0.0.1:$port is already in use; stop what holds it (demo ports: $MC_PORT $RD_PORT $MC_PROXY $RD_PROXY)"
done
ADMIN_NOTE=""
if ! port_free 9180; then  # the default admin port: cacheport then serves without it
    ADMIN_NOTE="
  (127.0.0.1:9180 was already taken, so this cacheport has no admin endpoint:
   the status and metrics commands above reach whatever holds that port)"
fi

wait_port() {
    for _ in $(seq 100); do port_free "$1" || return 0; sleep 0.05; done
    die "nothing listens on 127.0.0.1:$1 after 5s ($2); see $RUN/*.log"
}

memcached -u "$(id -un)" -l 127.0.0.1 -p "$MC_PORT" -U 0 -m 64 >"$RUN/memcached.log" 2>&1 &
PIDS+=($!)
redis-server --port "$RD_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no --logfile "$RUN/redis.log" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$MC_PORT" memcached
wait_port "$RD_PORT" redis-server
cacheport run -c config/demo.yaml &
PIDS+=($!)
wait_port "$MC_PROXY" cacheport
wait_port "$RD_PROXY" cacheport

python - "$MC_PROXY" "$RD_PROXY" <<'PY'
import sys
from pymemcache.client.base import Client
import redis

mc_port, rd_port = int(sys.argv[1]), int(sys.argv[2])
mc = Client(("127.0.0.1", mc_port), connect_timeout=2, timeout=2)
mc.set("demo:greeting", b"hello through cacheport")
print(f"memcached via cacheport :{mc_port}: version {mc.version().decode()}, "
      f"get demo:greeting -> {mc.get('demo:greeting').decode()!r}")
r = redis.Redis(port=rd_port, socket_timeout=2)
r.set("demo:greeting", "hello through cacheport")
print(f"redis     via cacheport :{rd_port}: PING -> {r.ping()}, "
      f"GET demo:greeting -> {r.get('demo:greeting').decode()!r}")
PY

cat <<MSG

cacheport is forwarding:
  127.0.0.1:$MC_PROXY -> memcached    127.0.0.1:$MC_PORT
  127.0.0.1:$RD_PROXY  -> redis-server 127.0.0.1:$RD_PORT

Try it from another terminal:
  redis-cli -p $RD_PROXY ping
  redis-benchmark -p $RD_PROXY -q -t get,set -n 10000
  printf 'version\r\n' | nc -q1 127.0.0.1 $MC_PROXY
  .venv/bin/cacheport status                 # health, connections, bytes per listener
  curl -s 127.0.0.1:9180/metrics | grep ^cacheport_$ADMIN_NOTE
MSG
if [ "$ONCE" = 1 ]; then
    echo "(--once: stopping)"
    exit 0
fi
echo "Press Ctrl-C to stop."
wait "${PIDS[2]}"
