"""The TLS bench's own client (``python -m bench tls``): RESP over a socket that may be
wrapped in TLS, reading replies of any size (a value spanning many records is one
reply, unlike redis-benchmark's TLS client, which stalls once it spans two).

Measures one target at a time: per-request latency, sequential GETs of a large value
(with the target's CPU over them), new connections per second (full and resumed TLS
handshakes), and the memory a target holds per idle connection.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence

HOST = "127.0.0.1"


class Conn:
    """One RESP connection; ``ctx`` wraps it in TLS (with ``session`` to resume)."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None = None,
                 session: ssl.SSLSession | None = None, timeout: float = 30) -> None:
        raw = socket.create_connection((HOST, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = raw if ctx is None else ctx.wrap_socket(
            raw, server_hostname="localhost", session=session)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the target closed the connection")
        self.buf += chunk

    def reply(self) -> bytes:
        """One reply: a status/error/integer line or a bulk string, whole. A bulk string is
        read straight into a buffer of its size (a client copying 1 MB through small
        reads would measure itself)."""
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        head = bytes(self.buf[:end])
        if head[:1] != b"$" or head == b"$-1":
            del self.buf[:end + 2]
            return head
        size = int(head[1:])
        out = bytearray(size + 2)
        have = min(len(self.buf) - end - 2, size + 2)
        out[:have] = self.buf[end + 2:end + 2 + have]
        del self.buf[:end + 2 + have]
        view = memoryview(out)
        while have < size + 2:
            n = self.sock.recv_into(view[have:])
            if not n:
                raise ConnectionError("the target closed the connection")
            have += n
        return bytes(view[:size])

    def call(self, *args: bytes) -> bytes:
        self.sock.sendall(b"*%d\r\n" % len(args) +
                          b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
        return self.reply()

    @property
    def session(self) -> ssl.SSLSession | None:
        return self.sock.session if isinstance(self.sock, ssl.SSLSocket) else None

    @property
    def resumed(self) -> bool:
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.session_reused


def latencies(port: int, ctx: ssl.SSLContext | None, count: int) -> list[float]:
    """Seconds per GET of a 3-byte value, one request in flight."""
    conn = Conn(port, ctx)
    try:
        conn.call(b"SET", b"lat", b"abc")
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            conn.call(b"GET", b"lat")
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        conn.close()


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time these processes' threads have run so far (/proc/PID/task/*/schedstat:
    nanoseconds, where /proc/PID/stat counts 10 ms ticks)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def values(port: int, ctx: ssl.SSLContext | None, key: bytes, size: int, count: int,
           pids: Sequence[int]) -> tuple[float, float]:
    """(GETs/s of a ``size``-byte value, the target's CPU ms per MB moved), one at a time."""
    conn = Conn(port, ctx)
    try:
        assert len(conn.call(b"GET", key)) == size
        cpu = cpu_seconds(pids)
        started = time.perf_counter()
        for _ in range(count):
            conn.call(b"GET", key)
        elapsed = time.perf_counter() - started
        used = cpu_seconds(pids) - cpu
        return count / elapsed, used * 1e3 / (count * size / 1e6)
    finally:
        conn.close()


def connects(port: int, ctx: ssl.SSLContext | None, count: int, resume: bool,
             threads: int = 2) -> tuple[float, float]:
    """(new connections/s, share resumed): connect, handshake, PING, close; ``threads``
    clients (the handshake releases the GIL). ``resume``: each client reuses its last
    session."""
    done = [0] * threads
    reused = [0] * threads
    errors: list[BaseException] = []

    def client(k: int) -> None:
        session = None
        if resume and ctx is not None:
            first = Conn(port, ctx)
            first.call(b"PING")  # TLS 1.3 tickets come after the handshake
            session = first.session
            first.close()
        try:
            for _ in range(count // threads):
                conn = Conn(port, ctx, session)
                conn.call(b"PING")
                reused[k] += conn.resumed
                if resume:
                    session = conn.session
                conn.close()
                done[k] += 1
        except (OSError, ConnectionError) as exc:
            errors.append(exc)

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    total = sum(done)
    return total / elapsed, sum(reused) / max(total, 1)


def idle_memory(port: int, ctx: ssl.SSLContext | None, count: int,
                pids: Sequence[int]) -> float:
    """Bytes of RSS the target holds per idle connection (each has done one PING)."""
    before = rss_bytes(pids)
    conns = []
    try:
        for _ in range(count):
            conn = Conn(port, ctx)
            conn.call(b"PING")
            conns.append(conn)
        time.sleep(0.5)
        return (rss_bytes(pids) - before) / count
    finally:
        for conn in conns:
            conn.close()
