"""Tiny raw-socket upstreams for relay behaviour tests (half-close, reset, bulk pushes).

Each runs in a thread on 127.0.0.1:0, serves one behaviour per connection, and is
closed by its context manager.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Handler = Callable[[socket.socket], None]


@contextmanager
def tcp_upstream(handler: Handler) -> Iterator[int]:
    """Serve ``handler(conn)`` for each connection; yield the port."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    lsock.settimeout(0.2)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve_one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            try:
                handler(conn)
            except OSError:
                pass

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=serve_one, args=(conn,), daemon=True)
            t.start()
            threads.append(t)

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    try:
        yield int(lsock.getsockname()[1])
    finally:
        stop.set()
        acceptor.join(5)
        lsock.close()
        for t in threads:
            t.join(5)


def recv_all(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    """Read until EOF."""
    chunks = []
    total = 0
    while total < limit:
        data = sock.recv(1 << 16)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def echo(conn: socket.socket) -> None:
    conn.settimeout(30)
    while data := conn.recv(1 << 16):
        conn.sendall(data)


def echo_until_eof_then_reply(conn: socket.socket) -> None:
    """Read everything the client sends, then answer with its length and a marker, then FIN."""
    data = recv_all(conn)
    conn.sendall(b"got %d bytes;" % len(data) + data[-16:] + b";bye")
    conn.shutdown(socket.SHUT_WR)


def talk_after_our_eof(conn: socket.socket) -> None:
    """Send a greeting and shut our write side, then keep reading until the client's EOF
    (the test checks the client saw our FIN and could still send after it)."""
    conn.sendall(b"hello-then-fin")
    conn.shutdown(socket.SHUT_WR)
    recv_all(conn)


def reset_immediately(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reset_after_partial_reply(conn: socket.socket) -> None:
    conn.recv(1024)
    conn.sendall(b"partial")
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def pattern(size: int, seed: int = 7) -> bytes:
    """Deterministic non-repeating-ish bytes, so reordering or loss would show."""
    block = bytes((seed * 31 + i * 7 + (i >> 8) * 13) & 0xFF for i in range(65521))
    reps = size // len(block) + 1
    return (block * reps)[:size]


def push(size: int) -> Handler:
    """Send ``size`` bytes of ``pattern`` as fast as the socket takes them, then FIN."""
    payload = memoryview(pattern(size))

    def handler(conn: socket.socket) -> None:
        conn.settimeout(120)
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        recv_all(conn)

    return handler
