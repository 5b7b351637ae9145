"""``python -m bench cluster``: redis-cluster listeners (the buffered rewriting relay, and
framed by the native engine) vs a plain tcp listener vs twemproxy vs direct, through
redis-benchmark.

One redis-server in cluster mode that owns every slot (so no request is redirected: this
measures the cost of framing every reply, the rewriting path's common case), and one
``cacheport run`` serving it three times: a plain ``tcp`` listener and two clusters' own
per-node listeners, ``relay: python`` and ``relay: native``. twemproxy (``nutcracker``,
which parses every request and reply: the fair peer of a framing proxy) fronts the same
node when it is installed. The three targets run alternately, ``--reps`` times each, in the same
run; the table shows medians and the ratio to direct. Everything it starts is stopped by
PID; traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .sidebyside import (
    free_port,
    free_range,
    header,
    redis_rps,
    start_cacheport,
    start_redis,
    stop_all,
    table,
    wait_port,
)

HOST = "127.0.0.1"


def _cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                          text=True, timeout=10, check=True).stdout


def _wait_file(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} was not written within {timeout}s")
        time.sleep(0.05)


def _wait_clusters(path: Path, names: Sequence[str], timeout: float = 20) -> dict[str, Any]:
    """The state file's clusters once every one of ``names`` has its ports: each cluster's
    first refresh writes the file, so the first write may hold only one of them."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            try:
                clusters: dict[str, Any] = json.loads(path.read_text())["clusters"]
            except (ValueError, KeyError):
                clusters = {}
            if all(clusters.get(n, {}).get("ports", {}).get("assigned") for n in names):
                return clusters
        if time.monotonic() > deadline:
            raise SystemExit(f"{path}: clusters {', '.join(names)} not all written within "
                             f"{timeout}s")
        time.sleep(0.05)


def _start_twemproxy(procs: list[subprocess.Popen[bytes]], work: Path, node: int) -> int:
    """nutcracker in front of the node (one server: hashing plays no part)."""
    port = free_port()
    conf = work / "nutcracker.yml"
    conf.write_text(f"bench:\n  listen: {HOST}:{port}\n  redis: true\n  hash: fnv1a_64\n"
                    f"  distribution: ketama\n  servers:\n    - {HOST}:{node}:1\n")
    procs.append(subprocess.Popen(["nutcracker", "-c", str(conf), "-s", str(free_port()),
                                   "-a", HOST, "-o", str(work / "nutcracker.log")]))
    wait_port(port, procs=procs)
    return port


def _three_masters(args: argparse.Namespace, tests: list[str]) -> None:
    """redis-benchmark --cluster through the seed port of a 3-master cluster: direct, and
    behind cacheport's clusters: on each relay (twemproxy is not cluster-aware)."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="cacheport-cluster3-") as tmpdir:
        work = Path(tmpdir)
        try:
            nodes = [start_redis(procs, "--cluster-enabled", "yes", "--dir", str(work),
                                 "--cluster-config-file", f"nodes-{i}.conf",
                                 "--cluster-port", str(free_port()))  # not port + 10000
                     for i in range(3)]
            subprocess.run(["redis-cli", "--cluster", "create",
                            *[f"{HOST}:{n}" for n in nodes], "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            deadline = time.monotonic() + 30
            while not all("cluster_state:ok" in _cli(n, "CLUSTER", "INFO") for n in nodes):
                if time.monotonic() > deadline:
                    raise SystemExit("3-master cluster did not become ok")
                time.sleep(0.1)
            entries, seeds = [], {}
            for name, relay in (("rc", "python"), ("rn", "native")):
                seed, low = free_port(), free_range(3)
                seeds[name] = seed
                entries.append(f"  - {{name: {name}, engine: redis-cluster, seed: "
                               f"'{HOST}:{nodes[0]}', announce: {HOST}, listen: {HOST}, "
                               f"ports: {low}-{low + 2}, seed_port: {seed}, relay: {relay}}}\n")
            config = work / "bench.yaml"
            config.write_text("admin: off\nlisteners: []\nclusters:\n" + "".join(entries))
            start_cacheport(procs, config)
            for seed in seeds.values():
                wait_port(seed, procs=procs)
            state = work / "bench.state.json"
            _wait_file(state)
            deadline = time.monotonic() + 20
            while any(len(json.loads(state.read_text())["clusters"].get(n, {}).get("ports", {})
                          .get("assigned", {})) < 3 for n in seeds):
                if time.monotonic() > deadline:
                    raise SystemExit("cacheport did not assign three node ports")
                time.sleep(0.1)
                _wait_file(state)
            time.sleep(1)  # the node listeners bind right after the assignment
            targets = {"direct": nodes[0], "cluster, relay: python": seeds["rc"],
                       "cluster, relay: native": seeds["rn"]}
            columns = [f"{t.upper()} -P {p} --cluster" for p in args.pipeline for t in tests]
            results: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.reps):
                for pipeline in args.pipeline:
                    for test in tests:
                        for name, port in targets.items():
                            results.setdefault((name, f"{test.upper()} -P {pipeline} --cluster"),
                                               []).append(redis_rps(
                                port, test, args.requests, pipeline, 100,
                                ("-r", "100000", "--cluster"), args.clients))
            print()
            print(header(f"3 masters, redis-benchmark --cluster -c {args.clients} -d 100 "
                         f"-n {args.requests}", args.reps))
            print()
            print(table(results, list(targets), columns))
        finally:
            stop_all(procs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench cluster",
                                     description="A rewriting redis-cluster listener vs a plain "
                                                 "tcp listener vs direct, through redis-benchmark.")
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pipeline", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tests", default="get,set")
    parser.add_argument("--masters", type=int, choices=(1, 3), nargs="+", default=[1],
                        help="1: one node, every column; 3: redis-benchmark --cluster "
                             "through the seed port of a 3-master cluster")
    args = parser.parse_args(argv)
    missing = [t for t in ("redis-server", "redis-cli", "redis-benchmark") if not shutil.which(t)]
    if missing:
        print(f"bench cluster: {', '.join(missing)} not installed", file=sys.stderr)
        return 2
    if 3 in args.masters:
        _three_masters(args, [t for t in args.tests.split(",") if t])
    if 1 not in args.masters:
        return 0
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="cacheport-cluster-") as tmpdir:
        work = Path(tmpdir)
        try:
            node = start_redis(procs, "--cluster-enabled", "yes", "--dir", str(work),
                               "--cluster-config-file", "nodes.conf",
                               "--cluster-port", str(free_port()))  # not port + 10000
            _cli(node, "CLUSTER", "ADDSLOTSRANGE", "0", "16383")
            deadline = time.monotonic() + 15
            while "cluster_state:ok" not in _cli(node, "CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise SystemExit("single-node cluster did not become ok")
                time.sleep(0.05)
            plain, seed, low = free_port(), free_port(), free_port()  # one node, one port
            nseed, nlow = free_port(), free_port()
            config = work / "bench.yaml"
            config.write_text(
                f"admin: off\nlisteners:\n"
                f"  - {{name: plain, listen: '{HOST}:{plain}', upstream: '{HOST}:{node}', "
                "protocol: tcp}\n"
                f"clusters:\n"
                f"  - {{name: rc, engine: redis-cluster, seed: '{HOST}:{node}', "
                f"announce: {HOST}, listen: {HOST}, ports: {low}-{low}, seed_port: {seed}, "
                "relay: python}\n"
                f"  - {{name: rn, engine: redis-cluster, seed: '{HOST}:{node}', "
                f"announce: {HOST}, listen: {HOST}, ports: {nlow}-{nlow}, seed_port: {nseed}, "
                "relay: native}\n")
            start_cacheport(procs, config)
            wait_port(seed, procs=procs)
            wait_port(plain, procs=procs)
            state = work / "bench.state.json"
            clusters = _wait_clusters(state, ("rc", "rn"))
            rewriting = int(next(iter(clusters["rc"]["ports"]["assigned"].values())))
            framed = int(next(iter(clusters["rn"]["ports"]["assigned"].values())))
            wait_port(rewriting, procs=procs)
            wait_port(framed, procs=procs)
            targets = {"direct": node, "plain tcp": plain, "cluster, relay: python": rewriting,
                       "cluster, relay: native": framed}
            if shutil.which("nutcracker"):
                targets["twemproxy"] = _start_twemproxy(procs, work, node)
            tests = [t for t in args.tests.split(",") if t]
            columns = [f"{t.upper()} -P {p}" for p in args.pipeline for t in tests]
            results: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.reps):
                for pipeline in args.pipeline:
                    for test in tests:
                        for name, port in targets.items():  # alternate: noise hits all alike
                            results.setdefault((name, f"{test.upper()} -P {pipeline}"), []).append(
                                redis_rps(port, test, args.requests, pipeline, 100,
                                          ("-r", "100000"), args.clients))
            print(header(f"redis-benchmark -c {args.clients} -d 100 -n {args.requests}",
                         args.reps))
            print()
            print(table(results, list(targets), columns))
        finally:
            stop_all(procs)
    return 0
