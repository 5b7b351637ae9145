"""``python -m bench cluster``: cluster listeners (the buffered rewriting relay, and framed
by the native engine) vs a plain tcp listener vs twemproxy vs direct: throughput through
redis-benchmark, added latency (p50/p99 of one connection's GETs, bench/client.c), and the
same for a Memcached ``clusters:`` entry's node port (bench/client.c, pipelined and not).

One redis-server in cluster mode that owns every slot (so no request is redirected: this
measures the cost of framing every reply, the rewriting path's common case), and one
``cacheport run`` serving it three times: a plain ``tcp`` listener and two clusters' own
per-node listeners, ``relay: python`` and ``relay: native``. twemproxy (``nutcracker``,
which parses every request and reply: the fair peer of a framing proxy) fronts the same
node when it is installed. The targets run alternately, ``--reps`` times each, in the same
run; the tables show medians and the ratio to direct (latency: the microseconds added to
direct's). The Memcached entry's seed is a memcached holding the auto-discovery key
(``get AmazonElastiCache:cluster``, the older engines' form). Everything it starts is
stopped by PID; traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .clients import Client, build_c_client
from .procs import BenchError
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


def _start_twemproxy(procs: list[subprocess.Popen[bytes]], work: Path, node: int,
                     redis: bool = True) -> int:
    """nutcracker in front of the node (one server: hashing plays no part)."""
    port = free_port()
    conf = work / "nutcracker.yml"
    conf.write_text(f"bench:\n  listen: {HOST}:{port}\n  redis: {str(redis).lower()}\n"
                    "  hash: fnv1a_64\n"
                    f"  distribution: ketama\n  servers:\n    - {HOST}:{node}:1\n")
    procs.append(subprocess.Popen(["nutcracker", "-c", str(conf), "-s", str(free_port()),
                                   "-a", HOST, "-o", str(work / "nutcracker.log")]))
    wait_port(port, procs=procs)
    return port


def _latency(client: Client, targets: dict[str, int], proto: str, reps: int, n: int,
             work: Path) -> str:
    """p50/p99 of ``n`` sequential GETs (100 B) on one connection per target, ``reps``
    times alternately; the table shows medians and what each adds to direct's."""
    got: dict[str, list[tuple[float, float]]] = {}
    for _ in range(reps):
        for name, port in targets.items():
            try:
                _, samples = client.latency(HOST, port, proto, "get", 100, n, 60, 200,
                                            work / "lat.u32")
            except BenchError as exc:
                raise SystemExit(f"latency through {name}: {exc}") from None
            ordered = sorted(samples)
            got.setdefault(name, []).append((ordered[len(ordered) // 2] / 1000,
                                             ordered[int(len(ordered) * 0.99)] / 1000))
    med = {name: (statistics.median(p for p, _ in v), statistics.median(q for _, q in v))
           for name, v in got.items()}
    base = med["direct"]
    lines = ["| target | p50 us | added p50 | p99 us | added p99 |", "|---|---:|---:|---:|---:|"]
    for name, (p50, p99) in med.items():
        lines.append(f"| {name} | {p50:.1f} | {p50 - base[0]:+.1f} | {p99:.1f} | "
                     f"{p99 - base[1]:+.1f} |")
    return "\n".join(lines)


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
            block = free_range(8)  # per cluster a seed port and three node ports, distinct
            for k, (name, relay) in enumerate((("rc", "python"), ("rn", "native"))):
                seed, low = block + 4 * k, block + 4 * k + 1
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
    parser.add_argument("--latency-requests", type=int, default=5000)
    parser.add_argument("--engines", nargs="+", choices=("redis", "memcached"),
                        default=["redis", "memcached"])
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
    if 1 not in args.masters or "redis" not in args.engines:
        if "memcached" in args.engines:
            _memcached(args)
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
            # Five distinct ports (free_port() may hand out one twice): one node, one port.
            plain, seed, low, nseed, nlow = range(free_range(5), 10**6)[:5]
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
            binary, why = build_c_client()
            if binary is None:
                print(f"\n(no latency table: {why})")
            else:
                print()
                print(header(f"latency, one connection, {args.latency_requests} GETs of 100 B",
                             args.reps))
                print()
                print(_latency(Client(binary), targets, "redis", args.reps,
                               args.latency_requests, work))
        finally:
            stop_all(procs)
    if "memcached" in args.engines:
        _memcached(args)
    return 0


def _memcached(args: argparse.Namespace) -> None:
    """A Memcached ``clusters:`` entry's node port on each relay vs a plain tcp listener vs
    twemproxy vs direct: bench/client.c GETs (100 B), pipelined and one at a time."""
    binary, why = build_c_client()
    if binary is None or not shutil.which("memcached"):
        print(f"\n(no Memcached table: {why or 'memcached is not installed'})")
        return
    client = Client(binary)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="cacheport-mccluster-") as tmpdir:
        work = Path(tmpdir)
        try:
            node = free_port()
            root = ["-u", "root"] if os.geteuid() == 0 else []  # it refuses root otherwise
            procs.append(subprocess.Popen(["memcached", "-l", HOST, "-p", str(node), "-U", "0",
                                           "-t", "2", "-m", "256", *root]))
            wait_port(node, procs=procs)
            block = f"1\nnode1|{HOST}|{node}\n".encode()
            with socket.create_connection((HOST, node), timeout=5) as s:
                s.sendall(b"set AmazonElastiCache:cluster 0 0 %d\r\n%s\r\n" % (len(block),
                                                                                  block))
                if not s.recv(64).startswith(b"STORED"):
                    raise SystemExit("memcached did not store the auto-discovery key")
            plain, *lows = range(free_range(3), 10**6)[:3]
            entries = []
            for (name, relay), low in zip((("mc", "python"), ("mn", "native")), lows,
                                          strict=True):
                entries.append(f"  - {{name: {name}, engine: memcached, seed: '{HOST}:{node}', "
                               f"announce: {HOST}, listen: {HOST}, ports: {low}-{low}, "
                               f"relay: {relay}}}\n")
            config = work / "bench.yaml"
            config.write_text(
                f"admin: off\nlisteners:\n  - {{name: plain, listen: '{HOST}:{plain}', "
                f"upstream: '{HOST}:{node}', protocol: memcached}}\n"
                "clusters:\n" + "".join(entries))
            start_cacheport(procs, config)
            wait_port(plain, procs=procs)
            clusters = _wait_clusters(work / "bench.state.json", ("mc", "mn"))
            ports = {n: int(next(iter(clusters[n]["ports"]["assigned"].values())))
                     for n in ("mc", "mn")}
            for port in ports.values():
                wait_port(port, procs=procs)
            targets = {"direct": node, "plain tcp": plain,
                       "cluster, relay: python": ports["mc"],
                       "cluster, relay: native": ports["mn"]}
            if shutil.which("nutcracker"):
                targets["twemproxy"] = _start_twemproxy(procs, work, node, redis=False)
            columns = [f"GET -P {p}" for p in args.pipeline]
            results: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.reps):
                for depth in args.pipeline:
                    for name, port in targets.items():
                        try:
                            run = client.pipelined(HOST, port, "memcached", "get", 100,
                                                   args.clients, depth, args.requests, 60)
                        except BenchError as exc:
                            raise SystemExit(f"memcached through {name}: {exc}") from None
                        results.setdefault((name, f"GET -P {depth}"), []).append(
                            run.requests / run.elapsed_s if run.elapsed_s else 0.0)
            print()
            print(header(f"Memcached, bench/client.c -c {args.clients} -s 100 "
                         f"-n {args.requests}", args.reps))
            print()
            print(table(results, list(targets), columns))
            print()
            print(header(f"Memcached latency, one connection, {args.latency_requests} GETs "
                         "of 100 B", args.reps))
            print()
            print(_latency(client, targets, "memcached", args.reps, args.latency_requests,
                           work))
        finally:
            stop_all(procs)
