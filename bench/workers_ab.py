"""What `workers: 2` gives on this machine: redis-benchmark through 1 and 2 workers vs direct.

    python bench/workers_ab.py [--reps 3] [--requests 200000]

Runs are interleaved (direct, 1 worker, 2 workers, repeated) and the medians
reported, as requests/s and as a ratio of direct. Everything it starts is
stopped by PID; traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {deadline}s")


def rps(port: int, requests: int, pipeline: int) -> float:
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-q", "-t", "get", "-n", str(requests), "-c", "50",
         "-P", str(pipeline)], capture_output=True, text=True, timeout=120).stdout
    found = re.findall(r"GET: ([\d.]+) requests per second", out.replace("\r", "\n"))
    return float(found[-1]) if found else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        node = free_port()
        procs.append(subprocess.Popen(["redis-server", "--port", str(node), "--save", "",
                                       "--appendonly", "no"], stdout=subprocess.DEVNULL))
        wait_port(node)
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
        results: dict[tuple[str, int], list[float]] = {}
        for _rep in range(args.reps):
            for pipeline in (1, 16):
                for name, port in ports.items():
                    results.setdefault((name, pipeline), []).append(
                        rps(port, args.requests, pipeline))
        print(f"redis-benchmark GET, 50 clients, {args.requests} requests, "
              f"median of {args.reps}\n")
        print("| target | -P 1 req/s | x direct | -P 16 req/s | x direct |")
        print("|---|---:|---:|---:|---:|")
        for name in ports:
            cells = []
            for pipeline in (1, 16):
                value = statistics.median(results[(name, pipeline)])
                base = statistics.median(results[("direct", pipeline)])
                cells += [f"{value:,.0f}", f"{value / base:.2f}x"]
            print(f"| {name} | " + " | ".join(cells) + " |")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
