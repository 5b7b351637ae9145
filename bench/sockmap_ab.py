"""What forwarding in the kernel (BPF sockmap) would buy, and why it is not the hot path.

    sudo python -m bench.sockmap_ab [--reps 5] [--requests 5000]

A *probe*, not a cacheport feature: ``forward()`` below pairs each client
socket with its upstream in a BPF ``SOCKHASH`` whose ``sk_skb`` verdict program
redirects every chunk to the other socket, so no byte wakes this process.
The program is 20 instructions loaded with raw ``bpf(2)`` through ctypes (no
compiler, no libbpf); it needs CAP_BPF and CAP_NET_ADMIN. Measured side by
side with direct, cacheport (``copy: auto``) and nginx's stream module (when
installed), interleaved, medians of ``--reps``, against one redis-server on
loopback: ping-pong latency (the bench's C client, 100 B SET/GET), pipelined
GETs (50 connections x 16) and 16 KB GETs as ratios of direct -- and the
reason it is a probe: ``backlog`` is how many bytes each target took from a
client in 1 s while the server read nothing. The kernel's redirect has no
backpressure (upstream: cilium/cilium#6431); cacheport's is bounded by its
buffers. Everything it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import ctypes
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.ab import free_port, start_redis, stop_all, wait_port
from bench.clients import build_c_client

ROOT = Path(__file__).resolve().parent.parent
STALL_CAP = 256 << 20  # stop feeding a stalled target here: the point is made, memory spared
_NR_BPF = {"x86_64": 321, "aarch64": 280}


def _bpf(cmd: int, attr: bytearray) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    ret = int(libc.syscall(_NR_BPF[platform.machine()], cmd, buf, len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


class Sockmap:
    """A cookie -> peer-cookie hash, a SOCKHASH of sockets, and the verdict on it."""

    def __init__(self) -> None:
        self.peers = self._map(1, 8, 8, b"probe_peers")  # BPF_MAP_TYPE_HASH
        self.socks = self._map(18, 8, 4, b"probe_socks")  # BPF_MAP_TYPE_SOCKHASH
        ld_peers = _insn(0x18, 1, 1, 0, self.peers) + _insn(0)  # ld_imm64 map fd
        ld_socks = _insn(0x18, 2, 1, 0, self.socks) + _insn(0)
        code = b"".join([
            _insn(0xBF, 6, 1),  # r6 = skb
            _insn(0x85, imm=46),  # r0 = get_socket_cookie(skb)
            _insn(0x7B, 10, 0, -8),  # fp[-8] = cookie
            ld_peers, _insn(0xBF, 2, 10), _insn(0x07, 2, imm=-8),
            _insn(0x85, imm=1),  # r0 = map_lookup_elem(peers, &cookie)
            _insn(0x15, 0, off=10, imm=0),  # if !r0 goto pass
            _insn(0x79, 1, 0, 0), _insn(0x7B, 10, 1, -16),  # fp[-16] = peer cookie
            _insn(0xBF, 1, 6), ld_socks, _insn(0xBF, 3, 10), _insn(0x07, 3, imm=-16),
            _insn(0xB7, 4, imm=0),
            _insn(0x85, imm=72),  # return sk_redirect_hash(skb, socks, &peer, 0)
            _insn(0x95),
            _insn(0xB7, 0, imm=1), _insn(0x95),  # pass: return SK_PASS
        ])
        insns = ctypes.create_string_buffer(code, len(code))
        gpl = ctypes.create_string_buffer(b"GPL")
        attr = bytearray(128)
        struct.pack_into("<IIQQ", attr, 0, 14, len(code) // 8, ctypes.addressof(insns),
                         ctypes.addressof(gpl))  # BPF_PROG_TYPE_SK_SKB
        prog = _bpf(5, attr)
        attr = bytearray(16)
        struct.pack_into("<IIII", attr, 0, self.socks, prog, 38, 0)  # BPF_SK_SKB_VERDICT
        _bpf(8, attr)

    @staticmethod
    def _map(kind: int, key: int, value: int, name: bytes) -> int:
        attr = bytearray(72)
        struct.pack_into("<IIIII", attr, 0, kind, key, value, 8192, 1 if kind == 1 else 0)
        attr[28:28 + len(name)] = name
        return _bpf(0, attr)

    def _update(self, fd: int, key: bytes, value: bytes) -> None:
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value, len(value))
        attr = bytearray(32)
        struct.pack_into("<IIQQQ", attr, 0, fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0)
        _bpf(2, attr)

    def pair(self, a: socket.socket, b: socket.socket) -> None:
        ca, cb = (s.getsockopt(socket.SOL_SOCKET, 57, 8) for s in (a, b))  # SO_COOKIE
        self._update(self.peers, ca, cb)
        self._update(self.peers, cb, ca)
        for s, c in ((b, cb), (a, ca)):
            self._update(self.socks, c, struct.pack("<I", s.fileno()))
            # SO_RCVLOWAT runs TCP's data-ready hook, now the verdict: what arrived
            # before the socket was in the map goes first.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def forward(listen_port: int, upstream_port: int) -> None:
    """The probe: pair in the kernel, then only watch for EOF (the kernel moves the bytes)."""
    import uvloop

    kernel = Sockmap()

    async def pump(loop: asyncio.AbstractEventLoop, client: socket.socket) -> None:
        upstream = socket.socket()
        upstream.setblocking(False)
        try:
            await loop.sock_connect(upstream, ("127.0.0.1", upstream_port))
        except OSError:
            client.close()
            upstream.close()
            return
        try:
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            kernel.pair(client, upstream)
        except OSError:  # the client left first (the kernel pairs only established sockets)
            client.close()
            upstream.close()
            return
        ended = asyncio.Event()
        open_ways = [2]

        def eof(src: socket.socket, dst: socket.socket) -> None:
            try:
                data = src.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:  # passed, not redirected (raced the pairing): forward it by hand
                dst.send(data)
                return
            loop.remove_reader(src.fileno())
            try:
                dst.shutdown(socket.SHUT_WR)  # no drain check: a probe, see the docstring
            except OSError:
                pass
            open_ways[0] -= 1
            if not open_ways[0]:
                ended.set()

        loop.add_reader(client.fileno(), eof, client, upstream)
        loop.add_reader(upstream.fileno(), eof, upstream, client)
        await ended.wait()
        client.close()
        upstream.close()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", listen_port))
        lsock.listen(128)
        lsock.setblocking(False)
        tasks = set()
        while True:
            client, _ = await loop.sock_accept(lsock)
            client.setblocking(False)
            task = asyncio.ensure_future(pump(loop, client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    uvloop.run(serve())


def start_nginx(procs: list[subprocess.Popen[bytes]], node: int) -> int | None:
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                    else None)
    module = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
    if exe is None:
        return None
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="cacheport-smab-nginx-"))
    load = f"load_module {module};\n" if module.exists() else ""
    (work / "nginx.conf").write_text(
        f"{load}worker_processes 1; daemon off; pid {work}/nginx.pid; "
        f"error_log {work}/error.log;\nevents {{ worker_connections 4096; }}\n"
        f"stream {{ server {{ listen 127.0.0.1:{port}; tcp_nodelay on; "
        f"proxy_buffer_size 64k; proxy_pass 127.0.0.1:{node}; }} }}\n")
    procs.append(subprocess.Popen([exe, "-c", str(work / "nginx.conf"), "-p", str(work)],
                                  stderr=subprocess.DEVNULL))
    try:
        wait_port(port, 5.0)
    except SystemExit:  # no stream module: leave nginx out
        return None
    return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--forward", nargs=2, type=int, metavar=("LISTEN", "UPSTREAM"),
                        help=argparse.SUPPRESS)  # the probe's own process
    args = parser.parse_args()
    if args.forward:
        forward(*args.forward)
        return 0
    client, why = build_c_client()
    if client is None:
        raise SystemExit(f"sockmap_ab needs the bench's C client: {why}")
    try:
        Sockmap()
    except OSError as exc:
        raise SystemExit(f"sockmap_ab: the kernel refused the BPF program ({exc}); "
                         "it needs CAP_BPF and CAP_NET_ADMIN (run as root)") from None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        return _run(args, client, procs)
    finally:
        stop_all(procs)


def _start_proxies(procs: list[subprocess.Popen[bytes]], node: int) -> dict[str, int]:
    ports = {"direct": node}
    port = free_port()
    path = Path(tempfile.mkdtemp(prefix="cacheport-smab-")) / f"map-{node}.yaml"
    path.write_text(f"admin: off\nlisteners:\n  - {{name: r, listen: '127.0.0.1:{port}', "
                    f"upstream: '127.0.0.1:{node}', health: off}}\n")
    procs.append(subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(path),
                                   "--log-level", "warning"], cwd=ROOT))
    wait_port(port)
    ports["cacheport"] = port
    nginx = start_nginx(procs, node)
    if nginx is not None:
        ports["nginx"] = nginx
    port = free_port()
    procs.append(subprocess.Popen([sys.executable, "-m", "bench.sockmap_ab", "--forward",
                                   str(port), str(node)], cwd=ROOT))
    wait_port(port)
    ports["sockmap"] = port
    return ports


def _stalled_backlog(ports: dict[str, int]) -> dict[str, int]:
    """Per proxy: bytes one client got in within 1 s while the server read nothing."""
    out: dict[str, int] = {}
    chunk = b"x" * 65536
    for name, port in ports.items():
        if name == "direct":
            continue
        client = socket.create_connection(("127.0.0.1", port))
        client.setblocking(False)
        sent, until = 0, time.monotonic() + 1.0
        while time.monotonic() < until and sent < STALL_CAP:
            try:
                sent += client.send(chunk)
            except BlockingIOError:
                time.sleep(0.005)
        out[name] = sent
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    return out


def _run(args: argparse.Namespace, client: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    node = start_redis(procs)
    ports = _start_proxies(procs, node)
    names = list(ports)
    p50: dict[str, list[float]] = {n: [] for n in names}
    p99: dict[str, list[float]] = {n: [] for n in names}
    pipe: dict[str, list[float]] = {n: [] for n in names}
    bulk: dict[str, list[float]] = {n: [] for n in names}

    def c_client(*argv: str) -> dict[str, float]:
        result = subprocess.run([str(client), *argv], check=True, capture_output=True,
                                text=True, timeout=90)
        parsed: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
        return parsed

    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            port = str(ports[name])
            with tempfile.NamedTemporaryFile() as out:
                c_client("-m", "lat", "-H", "127.0.0.1", "-p", port, "-P", "redis", "-x", "mix",
                         "-s", "100", "-n", str(args.requests), "-t", "30", "-o", out.name)
                samples = sorted(array.array("I", Path(out.name).read_bytes()))
            p50[name].append(samples[len(samples) // 2] / 1000)
            p99[name].append(samples[int(len(samples) * 0.99)] / 1000)
            run = c_client("-m", "pipe", "-H", "127.0.0.1", "-p", port, "-P", "redis", "-x",
                           "get", "-s", "100", "-c", "50", "-d", "16",
                           "-n", str(args.requests * 40), "-t", "30")
            pipe[name].append(run["requests"] / run["elapsed_s"])
            run = c_client("-m", "lat", "-H", "127.0.0.1", "-p", port, "-P", "redis", "-x",
                           "get", "-s", "16384", "-n", str(max(args.requests // 2, 100)),
                           "-t", "30", "-w", "50")
            bulk[name].append(run["bytes_in"] / run["elapsed_s"] / 1e6)

    stall = socket.socket()
    stall.bind(("127.0.0.1", 0))
    stall.listen(64)  # accepts in the kernel, never reads
    stalled_ports = _start_proxies(procs, stall.getsockname()[1])
    taken = _stalled_backlog(stalled_ports)
    stall.close()

    def added(series: dict[str, list[float]], name: str) -> float:
        return statistics.median(a - b for a, b in zip(series[name], series["direct"],
                                                       strict=True))

    def ratio(series: dict[str, list[float]], name: str) -> float:
        return statistics.median(a / b for a, b in zip(series[name], series["direct"],
                                                       strict=True))

    def cap(n: int) -> str:
        return " (the cap: it would take more)" if n >= STALL_CAP else ""

    print(f"redis, loopback, medians of {args.reps}; added/ratio paired with direct per rep\n")
    print("| target | added p50 µs | added p99 µs | pipelined (x direct) | "
          "16 KB GETs (x direct) | taken in 1 s, server not reading |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        if name == "direct":
            print(f"| direct | {statistics.median(p50[name]):.1f} (p50) | "
                  f"{statistics.median(p99[name]):.1f} (p99) | 1.00 | 1.00 | - |")
            continue
        print(f"| {name} | +{added(p50, name):.1f} | +{added(p99, name):.1f} | "
              f"{ratio(pipe, name):.2f} | {ratio(bulk, name):.2f} | "
              f"{taken.get(name, 0) / 1e6:.1f} MB{cap(taken.get(name, 0))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
