"""``python -m bench protocols``: how many MB/s one core frames and forwards (sans-IO rewriters).

A pipelined SET/GET conversation with no redirect (the rewriting listener's common case)
is cut into relay-sized chunks and fed through ``ClusterRewriter``; the same for
``AutoDiscoveryRewriter`` on memcached get replies. No sockets: this is the CPU cost the
rewriting path adds on top of the plain relay.

    python -m bench protocols [--value-size 100] [--pairs 20000] [--chunk 65536]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from proxy.protocols.memcache import AutoDiscoveryRewriter
from proxy.protocols.redis_cluster import ClusterRewriter
from proxy.protocols.resp import Framer


def _cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench protocols",
                                 description="How many MB/s one core frames and forwards "
                                             "through the sans-IO rewriters.")
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=20000, help="SET+GET pairs")
    ap.add_argument("--chunk", type=int, default=65536, help="bytes per feed call")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)

    value = b"v" * a.value_size
    requests = b"".join(_cmd(b"SET", b"key:%d" % i, value) + _cmd(b"GET", b"key:%d" % i)
                        for i in range(a.pairs))
    replies = (b"+OK\r\n" + b"$%d\r\n%s\r\n" % (len(value), value)) * a.pairs
    req_chunks, rep_chunks = _chunks(requests, a.chunk), _chunks(replies, a.chunk)
    frames = 2 * a.pairs

    def mapper(host: str, port: int) -> tuple[str, int] | None:
        return ("nat.example.com", port)

    def redis_requests() -> None:
        rw = ClusterRewriter(mapper, ("10.0.0.5", 6379))
        for c in req_chunks:
            rw.feed_request(c)

    prepared: list[ClusterRewriter] = []

    def prepare() -> None:
        rw = ClusterRewriter(mapper, ("10.0.0.5", 6379))
        for c in req_chunks:
            rw.feed_request(c)
        prepared.append(rw)

    def redis_replies() -> None:
        rw = prepared.pop()
        for c in rep_chunks:
            out = rw.feed_reply(c)
            assert out is c

    def framer_only() -> None:
        f = Framer()
        for c in rep_chunks:
            f.feed(c)

    mc_replies = b"".join(b"VALUE key:%d 0 %d\r\n%s\r\nEND\r\n" % (i, len(value), value)
                          for i in range(a.pairs))
    mc_chunks = _chunks(mc_replies, a.chunk)

    def memcache_replies() -> None:
        rw = AutoDiscoveryRewriter(lambda n: None)
        for c in mc_chunks:
            rw.feed_reply(c)  # a line cut by the chunk end is held, so not always `c`

    t_req = _best(redis_requests, a.repeat)
    times = []
    for _ in range(a.repeat):
        prepare()
        times.append(_best(redis_replies, 1))
    t_rep = min(times)
    t_frame = _best(framer_only, a.repeat)
    t_mc = _best(memcache_replies, a.repeat)

    print(f"python {sys.version.split()[0]}, value {a.value_size} B, {a.pairs} SET+GET pairs, "
          f"{a.chunk} B chunks, best of {a.repeat}")
    rows = [
        ("ClusterRewriter.feed_reply", len(replies), frames, t_rep),
        ("ClusterRewriter.feed_request", len(requests), frames, t_req),
        ("resp.Framer (replies, no matching)", len(replies), frames, t_frame),
        ("AutoDiscoveryRewriter.feed_reply", len(mc_replies), a.pairs, t_mc),
    ]
    print(f"{'path':38} {'MB/s':>8} {'k frames/s':>11}")
    for name, size, count, t in rows:
        print(f"{name:38} {size / t / 1e6:8.1f} {count / t / 1e3:11.0f}")
    return 0
