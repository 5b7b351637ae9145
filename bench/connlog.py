"""``python -m bench connlog``: what ``log_connections: true`` costs, side by side.

A listener with the connection log off and one with it on, for the native engine and
for the Python relay (``relay: python``), beside redis-server direct. redis-benchmark
with ``-k 0`` reconnects for every request, so its requests/s are new connections per
second (accept, dial, one PING, both closes -- and, with the log on, one line) and its
p50 is the latency of a whole short connection. Runs are interleaved target by target
(alternating the order each round), and each "log on" run is judged against the "log off"
run beside it: the medians of those pairs' ratios and p50 differences are reported.
cacheport writes its log to a file, as it would to journald. Everything it starts is
stopped by PID; traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .sidebyside import ROOT, free_port, header, start_redis, stop_all, wait_port

RELAYS = ("native", "python")


def connect_rate(port: int, requests: int, clients: int) -> tuple[float, float]:
    """(new connections/s, p50 ms) from one ``redis-benchmark -k 0`` run of PING."""
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-t", "ping_inline", "-n", str(requests),
         "-c", str(clients), "-k", "0", "--csv"],
        capture_output=True, text=True, timeout=300).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    if not rows:
        return 0.0, 0.0
    return float(rows[-1]["rps"]), float(rows[-1]["p50_latency_ms"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench connlog",
                                     description="The connection log's cost: new "
                                                 "connections/s and p50, on vs off.")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5000,
                        help="connections per run (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args(argv)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="cacheport-connlog-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            node = start_redis(procs, "--maxclients", "10000")
            ports = {(relay, log): free_port() for relay in RELAYS for log in (False, True)}
            lines = ["admin: off", "listeners:"]
            for (relay, log), port in ports.items():
                lines.append(f"  - {{name: {relay}-{'on' if log else 'off'}, "
                             f"listen: '127.0.0.1:{port}', upstream: '127.0.0.1:{node}', "
                             f"health: off, relay: {relay}, log_connections: {log}}}")
            (tmp / "map.yaml").write_text("\n".join(lines) + "\n")
            log_file = tmp / "cacheport.log"
            with open(log_file, "wb") as sink:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "proxy", "run", "-c", str(tmp / "map.yaml"),
                     "--log-level", "warning"], cwd=ROOT, stdout=sink, stderr=sink))
            for port in ports.values():
                wait_port(port, procs=procs)
            time.sleep(0.5)
            targets = {"direct": node}
            targets |= {f"{relay}, log {'on' if log else 'off'}": port
                        for (relay, log), port in ports.items()}
            rps: dict[str, list[float]] = {name: [] for name in targets}
            p50: dict[str, list[float]] = {name: [] for name in targets}
            order = list(targets.items())
            for rep in range(args.reps):
                # Each pair runs back to back, in alternating order: drift on a shared
                # machine falls on both sides of a pair alike.
                for name, port in order if rep % 2 == 0 else order[::-1]:
                    rate, latency = connect_rate(port, args.requests, args.clients)
                    rps[name].append(rate)
                    p50[name].append(latency)
            written = sum(1 for line in log_file.read_text(errors="replace").splitlines()
                          if "connection closed" in line)
            print(header(f"redis-benchmark -k 0 (a new connection per PING), "
                         f"{args.clients} clients, {args.requests} connections a run",
                         args.reps))
            print()
            print("| target | connections/s | on / off (median of pairs) | p50 ms "
                  "| p50 added by the log (median of pairs) |")
            print("|---|---:|---:|---:|---:|")
            for name in targets:
                rate, latency = statistics.median(rps[name]), statistics.median(p50[name])
                base = name.replace("log on", "log off")
                if name.endswith("log on"):
                    ratio = statistics.median(
                        on / off for on, off in zip(rps[name], rps[base], strict=True) if off)
                    added = statistics.median(
                        on - off for on, off in zip(p50[name], p50[base], strict=True))
                    cells = f"{ratio:.2f}x | {latency:.3f} | {added * 1000:+.0f} us"
                else:
                    cells = f"- | {latency:.3f} | -"
                print(f"| {name} | {rate:,.0f} | {cells} |")
            print(f"\nconnection log lines written: {written:,}")
        finally:
            stop_all(procs)
    return 0
