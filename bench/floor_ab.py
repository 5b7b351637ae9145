"""How far cacheport is from the floor of its architecture: the smallest uvloop forwarder.

    python -m bench.floor_ab [--reps 8] [--requests 5000]

The floor is ``forward()`` below: accept, connect, and on each socket's
readiness one ``recv_into`` a shared buffer and one ``send`` -- no health
checks, limits, counters, half-close or error handling. Whatever cacheport adds
per request beyond it is cacheport's own code; what both add over a C proxy is
CPython and uvloop. Measured side by side, interleaved, medians of ``--reps``:
one-connection ping-pong latency (the bench's C client, alternating SET/GET of
100 B) and proxy CPU per request for 50 connections pipelined 16 deep, against
one redis-server on loopback. Everything it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.ab import free_port, start_redis, stop_all, wait_port
from bench.clients import build_c_client
from bench.procs import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent


def forward(listen_port: int, upstream_port: int) -> None:
    """The floor: a forwarder with nothing but the two syscalls per readiness event."""
    import uvloop

    buf = memoryview(bytearray(1 << 16))

    def pump(loop: asyncio.AbstractEventLoop, src: socket.socket,
             dst: socket.socket) -> Callable[[], None]:
        def readable() -> None:
            try:
                n = src.recv_into(buf)
            except BlockingIOError:
                return
            if n == 0:
                loop.remove_reader(src.fileno())
                return
            dst.send(buf[:n])
        return readable

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", listen_port))
        lsock.listen(128)
        lsock.setblocking(False)
        while True:
            client, _ = await loop.sock_accept(lsock)
            upstream = socket.socket()
            upstream.setblocking(False)
            await loop.sock_connect(upstream, ("127.0.0.1", upstream_port))
            for s in (client, upstream):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            loop.add_reader(client.fileno(), pump(loop, client, upstream))
            loop.add_reader(upstream.fileno(), pump(loop, upstream, client))

    uvloop.run(serve())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--forward", nargs=2, type=int, metavar=("LISTEN", "UPSTREAM"),
                        help=argparse.SUPPRESS)  # the floor's own process
    args = parser.parse_args()
    if args.forward:
        forward(*args.forward)
        return 0
    client, why = build_c_client()
    if client is None:
        raise SystemExit(f"floor_ab needs the bench's C client: {why}")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        node = start_redis(procs)
        ports = {"direct": node}
        pids: dict[str, int] = {}
        port = free_port()
        path = Path(tempfile.mkdtemp(prefix="cacheport-floor-")) / "map.yaml"
        path.write_text(f"admin: off\nlisteners:\n  - {{name: r, listen: '127.0.0.1:{port}', "
                        f"upstream: '127.0.0.1:{node}', protocol: redis, health: off}}\n")
        procs.append(subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(path),
                                       "--log-level", "warning"], cwd=ROOT))
        wait_port(port)
        ports["cacheport"], pids["cacheport"] = port, procs[-1].pid
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.floor_ab", "--forward",
                                       str(port), str(node)], cwd=ROOT))
        wait_port(port)
        ports["floor"], pids["floor"] = port, procs[-1].pid
        p50: dict[str, list[float]] = {n: [] for n in ports}
        p99: dict[str, list[float]] = {n: [] for n in ports}
        cpu: dict[str, list[float]] = {n: [] for n in pids}
        names = list(ports)
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                with tempfile.NamedTemporaryFile() as out:
                    subprocess.run([str(client), "-m", "lat", "-H", "127.0.0.1", "-p",
                                    str(ports[name]), "-P", "redis", "-x", "mix", "-s", "100",
                                    "-n", str(args.requests), "-t", "30", "-o", out.name],
                                   check=True, capture_output=True, timeout=60)
                    samples = sorted(array.array("I", Path(out.name).read_bytes()))
                p50[name].append(samples[len(samples) // 2] / 1000)
                p99[name].append(samples[int(len(samples) * 0.99)] / 1000)
            for name in order:
                if name not in pids:
                    continue
                before = cpu_seconds([pids[name]])
                result = subprocess.run(
                    [str(client), "-m", "pipe", "-H", "127.0.0.1", "-p", str(ports[name]), "-P",
                     "redis", "-x", "get", "-s", "100", "-c", "50", "-d", "16", "-n", "200000",
                     "-t", "30"], check=True, capture_output=True, text=True, timeout=60)
                done = json.loads(result.stdout.strip().splitlines()[-1])["requests"]
                cpu[name].append((cpu_seconds([pids[name]]) - before) * 1e6 / done)
        print(f"redis, loopback, medians of {args.reps}; added = minus direct in the same rep\n")
        print("| target | p50 µs | added p50 | p99 µs | added p99 | CPU µs/req, 50 conns x 16 |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in names:
            added50 = statistics.median(a - b for a, b in zip(p50[name], p50["direct"],
                                                              strict=True))
            added99 = statistics.median(a - b for a, b in zip(p99[name], p99["direct"],
                                                              strict=True))
            cpu_cell = f"{statistics.median(cpu[name]):.2f}" if name in cpu else "-"
            print(f"| {name} | {statistics.median(p50[name]):.1f} | +{added50:.1f} | "
                  f"{statistics.median(p99[name]):.1f} | +{added99:.1f} | {cpu_cell} |")
    finally:
        stop_all(procs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
