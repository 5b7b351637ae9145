"""redis-benchmark through a rewriting cluster listener vs a plain tcp listener vs direct.

One redis-server in cluster mode that owns every slot (so no request is redirected: this
measures the cost of framing every reply, the rewriting path's common case), and one
``cacheport run`` subprocess serving it twice: a plain ``tcp`` listener and the cluster's
own per-node listener. The three targets run alternately, ``--reps`` times each, in the
same run; the table shows medians and the ratio to direct.

    python bench/cluster_rewrite.py [--requests 200000] [--clients 50] [--pipeline 1 16]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                          text=True, timeout=10, check=True).stdout


def benchmark(port: int, tests: str, requests: int, clients: int, pipeline: int
              ) -> dict[str, float]:
    out = subprocess.run(
        ["redis-benchmark", "-h", HOST, "-p", str(port), "-t", tests, "-n", str(requests),
         "-c", str(clients), "-P", str(pipeline), "-r", "100000", "-d", "100", "--csv"],
        capture_output=True, text=True, timeout=600, check=True).stdout
    rows = csv.reader(io.StringIO(out))
    header = next(rows)
    rps = header.index("rps")
    return {row[0]: float(row[rps]) for row in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pipeline", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tests", default="get,set")
    args = parser.parse_args()
    for tool in ("redis-server", "redis-cli", "redis-benchmark"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    work = Path(tempfile.mkdtemp(prefix="cacheport-bench-"))
    node_port, plain_port, seed_port = free_port(), free_port(), free_port()
    node = subprocess.Popen(
        ["redis-server", "--port", str(node_port), "--bind", HOST, "--save", "",
         "--appendonly", "no", "--cluster-enabled", "yes", "--dir", str(work),
         "--cluster-config-file", "nodes.conf", "--logfile", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy: subprocess.Popen[bytes] | None = None
    try:
        wait_port(node_port)
        cli(node_port, "CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        deadline = time.monotonic() + 15
        while "cluster_state:ok" not in cli(node_port, "CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise SystemExit("single-node cluster did not become ok")
            time.sleep(0.05)
        low = high = free_port()  # one node, one port
        config = work / "bench.yaml"
        config.write_text(
            f"listeners:\n"
            f"  - {{name: plain, listen: '{HOST}:{plain_port}', upstream: '{HOST}:{node_port}'}}\n"
            f"clusters:\n"
            f"  - {{name: rc, engine: redis-cluster, seed: '{HOST}:{node_port}', "
            f"announce: {HOST}, listen: {HOST}, ports: {low}-{high}, seed_port: {seed_port}}}\n")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proxy = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config),
                                  "--log-level", "warning"], env=env, cwd=ROOT)
        wait_port(seed_port)
        wait_port(plain_port)
        state = json.loads((work / "bench.state.json").read_text())
        rewriting_port = next(iter(state["clusters"]["rc"]["ports"]["assigned"].values()))
        targets = {"direct": node_port, "plain tcp": plain_port, "rewriting": rewriting_port}
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip()
        print(f"# {time.strftime('%Y-%m-%d')} commit {commit}, {os.cpu_count()} CPUs, "
              f"-n {args.requests} -c {args.clients} -d 100, {args.reps} reps, medians (req/s)")
        print("| test | pipeline | direct | plain tcp | rewriting | plain/direct | "
              "rewriting/direct | rewriting/plain |")
        print("|---|---|---|---|---|---|---|---|")
        for pipeline in args.pipeline:
            results: dict[str, dict[str, list[float]]] = {t: {} for t in targets}
            for _ in range(args.reps):
                for name, port in targets.items():  # alternate: noise hits all three alike
                    for test, rps in benchmark(port, args.tests, args.requests, args.clients,
                                               pipeline).items():
                        results[name].setdefault(test, []).append(rps)
            for test in results["direct"]:
                d, p, r = (statistics.median(results[t][test]) for t in targets)
                print(f"| {test} | {pipeline} | {d:,.0f} | {p:,.0f} | {r:,.0f} | "
                      f"{p / d:.2f} | {r / d:.2f} | {r / p:.2f} |", flush=True)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        node.terminate()
        node.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
