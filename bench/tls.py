"""``python -m bench tls``: cacheport's TLS against redis-server's own TLS port, stunnel,
HAProxy ``ssl`` and nginx stream ``ssl``, side by side in one run.

Two legs, each with its own table:

- termination: TLS client -> target -> plain redis-server. The baseline is the client
  speaking TLS to redis-server's own TLS port: "added" latency is the target's minus it.
- origination: plain client -> target -> redis-server's TLS port (certificate and name
  verified, SNI sent). The baseline is the plain client straight to the plain node.

Targets: cacheport under ``relay: native`` (TLS in the engine thread) and ``relay:
python`` (asyncio's TLS), and the peers (bench/tls_peers.py), each skipped with the
reason where not installed. Columns: added p50/p99 of a small GET (one in flight),
pipelined GETs/s (redis-benchmark, 50 clients, -P 16), GETs/s of a 16 KB and a 1 MB value
(the bench's own client, bench/tls_client.py: redis-benchmark's TLS client stalls once a
value spans two records), the target's CPU ms per MB over the 1 MB GETs, new
connections/s (full handshake; on termination also resumed from a ticket) and the RSS a
target holds per idle connection. The client's columns go round the targets in
``--slices`` turns per rep; medians of ``--reps``; read figures against each other within
one run. Certificates are made here with trustme; everything started is
stopped by PID; traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import tls_client as tc
from . import tls_peers
from .sidebyside import free_port, header, redis_rps, start_cacheport, start_redis, stop_all
from .sidebyside import wait_port as _wait_port

PEERS = ("stunnel", "haproxy", "nginx")
COLUMNS = ("p50 +µs", "p99 +µs", "-P16 GET/s", "16 KB GET/s", "1 MB GET/s", "CPU ms/MB",
           "conn/s full", "conn/s resumed", "KB/idle conn")


def wait_port(port: int, procs: list[subprocess.Popen[bytes]]) -> None:
    _wait_port(port, procs=procs)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (nginx's workers), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def cacheport_map(tmp: Path, ports: dict[str, int], node: int, node_tls: int) -> Path:
    lines = ["admin: off", "listeners:"]
    for relay in ("native", "python"):
        lines.append(f"  - {{name: term-{relay}, listen: '127.0.0.1:{ports['term-' + relay]}',"
                     f" upstream: '127.0.0.1:{node}', protocol: redis, health: off,"
                     f" relay: {relay}, tls: {{cert: cert.pem, key: key.pem}}}}")
        lines.append(f"  - {{name: orig-{relay}, listen: '127.0.0.1:{ports['orig-' + relay]}',"
                     f" upstream: '127.0.0.1:{node_tls}', protocol: redis, health: off,"
                     f" relay: {relay}, upstream_tls: {{ca: ca.pem, server_name: localhost}}}}")
    path = tmp / "map.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


Target = tuple[int, list[int]]  # port, [PID]: it and its children are the target's


def measure(leg: str, targets: dict[str, Target], base: str, ctx: ssl.SSLContext | None,
            args: argparse.Namespace, results: dict[tuple[str, str], list[float]],
            bench_tls: Sequence[str]) -> None:
    """One rep of every column for every target of a leg. The client's columns go round
    the targets in ``--slices`` turns, so a burst of load elsewhere on the machine falls
    on all of them, not on whichever ran then."""
    def each(column: str, fn: Callable[[int, list[int]], float]) -> None:
        for name, (port, root) in targets.items():
            try:
                value = fn(port, descendants(root[0]))
            except (OSError, ConnectionError, AssertionError) as exc:
                print(f"  {leg} {name} {column}: failed: {exc}", file=sys.stderr)
                value = float("nan")
            results.setdefault((name, column), []).append(value)

    def sliced(columns: tuple[str, ...],
               fn: Callable[[int, list[int], int], tuple[float, ...]], count: int) -> None:
        """``fn(port, pids, n) -> (rate, other...)``, n = count / slices per turn: rates
        combine as total count over total time; other figures by their median."""
        spent: dict[str, float] = {}
        others: dict[str, list[list[float]]] = {}
        per = max(count // args.slices, 1)
        for _ in range(args.slices):
            for name, (port, root) in targets.items():
                if spent.get(name) == float("inf"):
                    continue
                try:
                    figures = fn(port, descendants(root[0]), per)
                except (OSError, ConnectionError, AssertionError) as exc:
                    print(f"  {leg} {name} {columns[0]}: failed: {exc}", file=sys.stderr)
                    spent[name] = float("inf")
                    continue
                spent[name] = spent.get(name, 0.0) + (per / figures[0] if figures[0] else
                                                      float("inf"))
                others.setdefault(name, []).append(list(figures[1:]))
        for name in targets:
            total = spent.get(name, float("inf"))
            results.setdefault((name, columns[0]), []).append(
                per * args.slices / total if total not in (0.0, float("inf")) else float("nan"))
            for k, column in enumerate(columns[1:]):
                values = [o[k] for o in others.get(name, []) if o[k] == o[k]]
                results.setdefault((name, column), []).append(
                    statistics.median(values) if values else float("nan"))

    lat: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(args.slices):
        for name, (port, _) in targets.items():
            lat[name] += tc.latencies(port, ctx, max(args.latency // args.slices, 1))
    lat = {name: sorted(samples) for name, samples in lat.items()}
    for name in targets:
        for column, q in (("p50 +µs", 0.5), ("p99 +µs", 0.99)):
            mine = lat[name][int(q * (len(lat[name]) - 1))]
            ref = lat[base][int(q * (len(lat[base]) - 1))]
            results.setdefault((name, column), []).append((mine - ref) * 1e6)
    each("-P16 GET/s", lambda port, _: redis_rps(port, "get", args.requests, 16, 3, bench_tls))
    sliced(("16 KB GET/s",),
           lambda port, pids, n: tc.values(port, ctx, b"v16k", 16 << 10, n, pids)[:1],
           args.small_values)
    sliced(("1 MB GET/s", "CPU ms/MB"),
           lambda port, pids, n: tc.values(port, ctx, b"v1m", 1 << 20, n, pids),
           args.big_values)
    sliced(("conn/s full",), lambda port, _, n: tc.connects(port, ctx, n, False)[:1],
           args.connects)
    if ctx is not None:
        def resumed(port: int, _: list[int], n: int) -> tuple[float]:
            rate, share = tc.connects(port, ctx, n, True)
            return (rate if share > 0.9 else 0.0,)  # not resumed: no figure
        sliced(("conn/s resumed",), resumed, args.connects)


def render(results: dict[tuple[str, str], list[float]], targets: Sequence[str],
           columns: Sequence[str]) -> str:
    lines = ["| target | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in targets:
        cells = []
        for column in columns:
            values = [v for v in results.get((name, column), []) if v == v]
            if not values:
                cells.append("-")
                continue
            m = statistics.median(values)
            cells.append(f"{m:+.0f}" if "+" in column else
                         f"{m:.1f}" if column.startswith(("CPU", "KB")) else f"{m:,.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench tls", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=100_000,
                        help="redis-benchmark requests per pipelined run")
    parser.add_argument("--latency", type=int, default=3000, help="GETs per latency sample")
    parser.add_argument("--small-values", type=int, default=2000, help="16 KB GETs per run")
    parser.add_argument("--big-values", type=int, default=100, help="1 MB GETs per run")
    parser.add_argument("--connects", type=int, default=400, help="connections per run")
    parser.add_argument("--idle", type=int, default=300, help="idle connections held")
    parser.add_argument("--slices", type=int, default=5,
                        help="turns round the targets per rep for the client's columns")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma-separated peers (stunnel,haproxy,nginx); empty: none")
    args = parser.parse_args(argv)
    try:
        import trustme
    except ImportError:
        print("bench tls: needs trustme (pip install -e '.[dev]')", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="cacheport-tls-") as tmpdir:
        tmp = Path(tmpdir)
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        pki = tls_peers.Pki(tmp / "cert.pem", tmp / "key.pem", tmp / "ca.pem",
                            tmp / "combined.pem")
        cert.cert_chain_pems[0].write_to_path(str(pki.cert))
        cert.private_key_pem.write_to_path(str(pki.key))
        ca.cert_pem.write_to_path(str(pki.ca))
        pki.combined.write_bytes(pki.cert.read_bytes() + pki.key.read_bytes())
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        try:
            node = start_redis(procs)
            node_proc = procs[-1]
            node_tls = free_port()
            plain_side = free_port()
            while plain_side in (node_tls, node):  # free_port() may hand one out twice
                plain_side = free_port()
            start_redis(procs, "--tls-port", str(node_tls), "--tls-cert-file", str(pki.cert),
                        "--tls-key-file", str(pki.key), "--tls-ca-cert-file", str(pki.ca),
                        "--tls-auth-clients", "no", port=plain_side)
            tls_proc = procs[-1]
            wait_port(node_tls, procs)
            taken = {node, node_tls, plain_side}
            ports: dict[str, int] = {}
            for k in ("term-native", "term-python", "orig-native", "orig-python"):
                while (port := free_port()) in taken:
                    pass
                ports[k] = port
                taken.add(port)
            start_cacheport(procs, cacheport_map(tmp, ports, node, node_tls))
            cp = procs[-1]
            term: dict[str, Target] = {"redis-server TLS port": (node_tls, [tls_proc.pid])}
            orig: dict[str, Target] = {"direct (plain)": (node, [node_proc.pid])}
            for relay in ("native", "python"):
                term[f"cacheport relay: {relay}"] = (ports[f"term-{relay}"], [cp.pid])
                orig[f"cacheport relay: {relay}"] = (ports[f"orig-{relay}"], [cp.pid])
            versions = []
            for peer in [p for p in args.peers.split(",") if p]:
                why = tls_peers.missing(peer)
                if why is not None:
                    print(f"bench tls: skipping {peer}: {why}", file=sys.stderr)
                    continue
                legs = tls_peers.Legs(free_port(), free_port(), node, node_tls)
                tls_peers.start(peer, pki, legs, tmp, procs)
                wait_port(legs.term, procs)
                wait_port(legs.orig, procs)
                term[peer] = (legs.term, [procs[-1].pid])
                orig[peer] = (legs.orig, [procs[-1].pid])
                versions.append(tls_peers.version(peer))
            for port in ports.values():
                wait_port(port, procs)
            time.sleep(0.5)
            for port, c in ((node, None), (node_tls, ctx)):
                conn = tc.Conn(port, c)
                conn.call(b"SET", b"v16k", b"x" * (16 << 10))
                conn.call(b"SET", b"v1m", os.urandom(1 << 20))
                conn.close()
            results: dict[str, dict[tuple[str, str], list[float]]] = {"term": {}, "orig": {}}
            bench_tls = ("--tls", "--cacert", str(pki.ca))
            for rep in range(args.reps):
                print(f"bench tls: rep {rep + 1}/{args.reps}", file=sys.stderr)
                measure("termination", term, "redis-server TLS port", ctx, args,
                        results["term"], bench_tls)
                measure("origination", orig, "direct (plain)", None, args, results["orig"], ())
            for leg, targets, c in (("term", term, ctx), ("orig", orig, None)):
                for name, (port, root) in targets.items():
                    results[leg][(name, "KB/idle conn")] = [
                        tc.idle_memory(port, c, args.idle, descendants(root[0])) / 1024]
            print(header("python -m bench tls", args.reps))
            print(f"peers: {'; '.join(versions) or 'none'}; openssl: {ssl.OPENSSL_VERSION}")
            print("\nTermination (TLS client -> target -> plain redis-server); added latency "
                  "against redis-server's own TLS port:\n")
            print(render(results["term"], list(term), COLUMNS))
            print("\nOrigination (plain client -> target -> TLS redis-server, verified); added "
                  "latency against the plain client straight to the plain node:\n")
            print(render(results["orig"], list(orig),
                         [c for c in COLUMNS if c != "conn/s resumed"]))
        finally:
            stop_all(procs)
    return 0
