"""What `workers: 2` gives on this machine: redis-benchmark through 1 and 2 workers vs direct.

    python -m bench.workers_ab [--reps 3] [--requests 200000]

Runs are interleaved (direct, 1 worker, 2 workers, repeated) and the medians
reported, as requests/s and as a ratio of direct. Everything it starts is
stopped by PID; traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.ab import free_port, redis_rps, start_redis, stop_all, table, wait_port

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        node = start_redis(procs)
        ports = {"direct": node}
        tmp = Path(tempfile.mkdtemp(prefix="cacheport-workers-"))
        for workers in (1, 2):
            port = free_port()
            path = tmp / f"w{workers}.yaml"
            path.write_text(f"workers: {workers}\nadmin: off\nlisteners:\n  - {{name: r, "
                            f"listen: '127.0.0.1:{port}', upstream: '127.0.0.1:{node}', "
                            "protocol: redis, health: off}\n")
            procs.append(subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(path),
                                           "--log-level", "warning"], cwd=ROOT))
            wait_port(port)
            ports[f"{workers} worker{'s' if workers > 1 else ''}"] = port
        time.sleep(1.0)
        results: dict[tuple[str, str], list[float]] = {}
        for _rep in range(args.reps):
            for pipeline in (1, 16):
                for name, port in ports.items():
                    results.setdefault((name, f"-P {pipeline}"), []).append(
                        redis_rps(port, "get", args.requests, pipeline))
        print(f"redis-benchmark GET, 50 clients, {args.requests} requests, "
              f"median of {args.reps}\n")
        print(table(results, list(ports), ["-P 1", "-P 16"]))
    finally:
        stop_all(procs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
