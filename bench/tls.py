"""``python -m bench tls``: TLS next to plain, through redis-benchmark.

Targets: redis-server direct (plain, and its own TLS port), a plain cacheport
listener, and a cacheport listener that terminates TLS (certificates made here
with trustme). Runs are interleaved and the medians reported, as requests/s and
as a ratio of direct, for small GETs and 4 KB SETs. (Not 16 KB: redis-benchmark's
TLS client waits ~40 ms per request once a value spans two TLS records, against
redis-server's own TLS port too, which would measure the client rather than the
proxy.) Everything it starts is stopped by PID; traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .sidebyside import (
    free_port,
    header,
    redis_rps,
    start_cacheport,
    start_redis,
    stop_all,
    table,
    wait_port,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench tls",
                                     description="TLS next to plain, through redis-benchmark.")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=50_000)
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
        cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
        cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
        ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
        try:
            node = start_redis(procs)
            node_tls = free_port()
            start_redis(procs, "--tls-port", str(node_tls), "--tls-cert-file",
                        str(tmp / "cert.pem"), "--tls-key-file", str(tmp / "key.pem"),
                        "--tls-ca-cert-file", str(tmp / "ca.pem"), "--tls-auth-clients", "no")
            wait_port(node_tls, procs=procs)
            plain, tls = free_port(), free_port()
            (tmp / "map.yaml").write_text(
                "admin: off\nlisteners:\n"
                f"  - {{name: plain, listen: '127.0.0.1:{plain}', upstream: '127.0.0.1:{node}', "
                "protocol: redis, health: off}\n"
                f"  - {{name: tls, listen: '127.0.0.1:{tls}', upstream: '127.0.0.1:{node}', "
                "protocol: redis, health: off, tls: {cert: cert.pem, key: key.pem}}\n")
            start_cacheport(procs, tmp / "map.yaml")
            wait_port(plain, procs=procs)
            wait_port(tls, procs=procs)
            time.sleep(0.5)
            with_tls = ("--tls", "--cacert", str(tmp / "ca.pem"))
            targets = {"direct": (node, ()), "direct TLS (redis-server)": (node_tls, with_tls),
                       "cacheport": (plain, ()), "cacheport TLS": (tls, with_tls)}
            runs = {"GET 3 B": ("get", 3), "SET 4 KB": ("set", 4096)}
            results: dict[tuple[str, str], list[float]] = {}
            for _rep in range(args.reps):
                for column, (test, size) in runs.items():
                    for name, (port, extra) in targets.items():
                        results.setdefault((name, column), []).append(
                            redis_rps(port, test, args.requests, 1, size, extra))
            print(header(f"redis-benchmark, 50 clients, {args.requests} requests", args.reps))
            print()
            print(table(results, list(targets), list(runs)))
        finally:
            stop_all(procs)
    return 0
