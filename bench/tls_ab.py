"""TLS next to plain: redis-benchmark direct (plain and to redis-server's own TLS port),
through a plain listener, and through a listener that terminates TLS (certificates made
here with trustme).

    python -m bench.tls_ab [--reps 3] [--requests 50000]

Runs are interleaved and the medians reported, as requests/s and as a ratio of
direct, for small GETs and 4 KB SETs. (Not 16 KB: redis-benchmark's TLS client waits
~40 ms per request once a value spans two TLS records, against redis-server's own TLS
port too, which would measure the client rather than the proxy.) Everything it
starts is stopped by PID; traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

from bench.ab import free_port, redis_rps, start_redis, stop_all, table, wait_port

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=50_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cacheport-tls-"))
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        node = start_redis(procs)
        node_tls = free_port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(node_tls), "--save", "",
             "--appendonly", "no", "--tls-cert-file", str(tmp / "cert.pem"),
             "--tls-key-file", str(tmp / "key.pem"), "--tls-ca-cert-file", str(tmp / "ca.pem"),
             "--tls-auth-clients", "no"], stdout=subprocess.DEVNULL))
        wait_port(node_tls)
        plain, tls = free_port(), free_port()
        (tmp / "map.yaml").write_text(
            "admin: off\nlisteners:\n"
            f"  - {{name: plain, listen: '127.0.0.1:{plain}', upstream: '127.0.0.1:{node}', "
            "protocol: redis, health: off}\n"
            f"  - {{name: tls, listen: '127.0.0.1:{tls}', upstream: '127.0.0.1:{node}', "
            "protocol: redis, health: off, tls: {cert: cert.pem, key: key.pem}}\n")
        procs.append(subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c",
                                       str(tmp / "map.yaml"), "--log-level", "warning"],
                                      cwd=ROOT))
        wait_port(plain)
        wait_port(tls)
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
        print(f"redis-benchmark, 50 clients, {args.requests} requests, median of {args.reps}\n")
        print(table(results, list(targets), list(runs)))
    finally:
        stop_all(procs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
