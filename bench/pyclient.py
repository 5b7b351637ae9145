"""Fallback for bench/client.c when there is no C compiler: same command line, same output.

Python adds tens of microseconds of its own to every round trip, so latency
figures from this client are much coarser; the bench says so in its report.
Run as ``python -m bench.pyclient -m lat -H 127.0.0.1 -p 6379 -P redis ...``.
"""

from __future__ import annotations

import argparse
import array
import json
import selectors
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Exchange:
    """A request and the exact response it must get."""

    req: bytes
    resp: bytes


def build(redis: bool, key: str, size: int, is_set: bool) -> Exchange:
    value = bytes(ord("a") + i % 26 for i in range(size))
    k = key.encode()
    if redis and is_set:
        return Exchange(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, size, value),
                        b"+OK\r\n")
    if redis:
        return Exchange(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k),
                        b"$%d\r\n%s\r\n" % (size, value))
    if is_set:
        return Exchange(b"set %s 0 0 %d\r\n%s\r\n" % (k, size, value), b"STORED\r\n")
    return Exchange(b"get %s\r\n" % k, b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (k, size, value))


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _expect(sock: socket.socket, ex: Exchange, buf: bytearray) -> None:
    view = memoryview(buf)
    got = 0
    want = len(ex.resp)
    while got < want:
        n = sock.recv_into(view[got:want])
        if not n:
            raise SystemExit("pyclient: connection closed by peer mid-response")
        got += n
    if view[:want] != ex.resp:
        raise SystemExit(f"pyclient: unexpected response: {bytes(view[:60])!r}")


def _sock(obj: object) -> socket.socket:
    assert isinstance(obj, socket.socket)
    return obj


def _result(args: argparse.Namespace, done: int, elapsed: float, bin_: int, bout: int) -> None:
    print(json.dumps({"mode": args.m, "requests": done, "elapsed_s": elapsed, "bytes_in": bin_,
                      "bytes_out": bout, "errors": 0, "connections": args.c}), flush=True)


def run_lat(args: argparse.Namespace, redis: bool) -> None:
    get = build(redis, args.k, args.s, False)
    set_ = build(redis, args.k, args.s, True)
    buf = bytearray(max(len(get.resp), len(set_.resp)))
    sock = _connect(args.H, args.p)
    sock.sendall(set_.req)
    _expect(sock, set_, buf)

    def pick(i: int) -> Exchange:
        if args.x == "mix":
            return set_ if i % 2 == 0 else get
        return set_ if args.x == "set" else get

    for i in range(args.w):
        ex = pick(i)
        sock.sendall(ex.req)
        _expect(sock, ex, buf)
    lat = array.array("I")
    bin_ = bout = 0
    clock = time.perf_counter_ns
    start = time.monotonic()
    deadline = start + args.t
    done = 0
    while done < args.n:
        ex = pick(done)
        t0 = clock()
        sock.sendall(ex.req)
        _expect(sock, ex, buf)
        lat.append(min(clock() - t0, 0xFFFFFFFF))
        bin_ += len(ex.resp)
        bout += len(ex.req)
        done += 1
        if done % 64 == 0 and time.monotonic() > deadline:
            break
    elapsed = time.monotonic() - start
    sock.close()
    if args.o:
        with open(args.o, "wb") as f:
            lat.tofile(f)
    _result(args, done, elapsed, bin_, bout)


def run_pipe(args: argparse.Namespace, redis: bool) -> None:
    ex = build(redis, args.k, args.s, args.x == "set")
    set_ = build(redis, args.k, args.s, True)
    with _connect(args.H, args.p) as sock:
        sock.sendall(set_.req)
        _expect(sock, set_, bytearray(len(set_.resp)))
    batch = ex.req * args.d
    expected = ex.resp * args.d
    socks = [_connect(args.H, args.p) for _ in range(args.c)]
    for s in socks:
        s.setblocking(False)
    sel = selectors.DefaultSelector()
    received: dict[socket.socket, bytearray] = {s: bytearray() for s in socks}
    batches_total = -(-args.n // args.d)
    started = finished = 0
    bin_ = 0
    start = time.monotonic()
    deadline = start + args.t

    def launch(s: socket.socket) -> None:
        nonlocal started
        started += 1
        received[s].clear()
        s.setblocking(True)
        s.sendall(batch)  # simple: the batches here are small enough for the socket buffers
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)

    for s in socks:
        if started < batches_total:
            launch(s)
    while sel.get_map():
        if time.monotonic() > deadline + 10:
            raise SystemExit("pyclient: batches still in flight 10 s after the time cap")
        for key, _ in sel.select(1.0):
            s = _sock(key.fileobj)
            try:
                data = s.recv(256 * 1024)
            except BlockingIOError:
                continue
            if not data:
                raise SystemExit("pyclient: connection closed by peer mid-batch")
            buf = received[s]
            buf += data
            bin_ += len(data)
            if len(buf) >= len(expected):
                if buf != expected:
                    raise SystemExit(f"pyclient: unexpected response: {bytes(buf[:60])!r}")
                finished += 1
                sel.unregister(s)
                if started < batches_total and time.monotonic() < deadline:
                    launch(s)
    elapsed = time.monotonic() - start
    for s in socks:
        s.close()
    _result(args, finished * args.d, elapsed, bin_, finished * len(batch))


def run_hold(args: argparse.Namespace, redis: bool) -> None:
    ping = b"PING\r\n" if redis else b"version\r\n"
    socks: list[socket.socket] = []
    start = time.monotonic()
    deadline = start + args.t
    sel = selectors.DefaultSelector()
    pending = 0
    answered = 0
    while answered < args.c:
        while len(socks) < args.c and pending < 256:
            s = socket.socket(socket.AF_INET6 if ":" in args.H else socket.AF_INET)
            s.setblocking(False)
            s.connect_ex((args.H, args.p))
            socks.append(s)
            sel.register(s, selectors.EVENT_WRITE, "connecting")
            pending += 1
        if time.monotonic() > deadline:
            raise SystemExit(f"pyclient: only {answered} of {args.c} connections answered")
        for key, _ in sel.select(0.2):
            s = _sock(key.fileobj)
            if key.data == "connecting":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise SystemExit(f"pyclient: connect failed: errno {err}")
                s.send(ping)
                sel.modify(s, selectors.EVENT_READ, "sent")
            else:
                data = s.recv(256)
                if not data:
                    raise SystemExit("pyclient: connection closed before answering")
                if data.endswith(b"\r\n"):
                    sel.unregister(s)
                    answered += 1
                    pending -= 1
    elapsed = time.monotonic() - start
    print(f"ready {answered} {elapsed:.6f}", flush=True)
    while sys.stdin.buffer.read(64):
        pass
    for s in socks:
        s.close()
    _result(args, answered, elapsed, 0, 0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pyclient", add_help=False)
    p.add_argument("-m", default="lat", choices=("lat", "pipe", "hold"))
    p.add_argument("-H", default="127.0.0.1")
    p.add_argument("-p", type=int, required=True)
    p.add_argument("-P", default="redis", choices=("redis", "memcached"))
    p.add_argument("-x", default="get", choices=("get", "set", "mix"))
    p.add_argument("-s", type=int, default=100)
    p.add_argument("-n", type=int, default=10000)
    p.add_argument("-t", type=float, default=10.0)
    p.add_argument("-w", type=int, default=100)
    p.add_argument("-c", type=int, default=1)
    p.add_argument("-d", type=int, default=1)
    p.add_argument("-o", default=None)
    p.add_argument("-k", default="cacheport:bench")
    args = p.parse_args(argv)
    redis = args.P == "redis"
    {"lat": run_lat, "pipe": run_pipe, "hold": run_hold}[args.m](args, redis)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
