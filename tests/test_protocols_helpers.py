"""Helpers shared by the protocol tests (no tests here): raw sockets, stream splitting."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Sequence

from proxy.protocols.resp import Framer


def splits(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, clamped, duplicates allowed)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def feed_all(feed: Callable[[bytes], bytes | bytearray], chunks: Sequence[bytes]) -> bytes:
    return b"".join(bytes(feed(c)) for c in chunks)


class RawConnection:
    """A plain TCP connection that sends bytes and collects reply frames with a deadline."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.received = bytearray()
        self.sent = bytearray()
        self._framer = Framer()
        self.frames: list[tuple[int, int]] = []

    def send(self, data: bytes) -> None:
        self.sent += data
        self.sock.sendall(data)

    def read_frames(self, count: int) -> list[bytes]:
        """Read until ``count`` more RESP frames have arrived; return them."""
        want = len(self.frames) + count
        deadline = time.monotonic() + self.timeout
        while len(self.frames) < want:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {count} frames")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("server closed the connection")
            self.received += chunk
            self.frames += self._framer.feed(chunk)
        return [bytes(self.received[s:e]) for s, e in self.frames[want - count : want]]

    def call(self, data: bytes, replies: int = 1) -> list[bytes]:
        self.send(data)
        return self.read_frames(replies)

    def read_until(self, predicate: Callable[[bytes], bool]) -> bytes:
        """Read raw bytes (any protocol) until ``predicate(all received)`` holds."""
        deadline = time.monotonic() + self.timeout
        while not predicate(bytes(self.received)):
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the reply")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("server closed the connection")
            self.received += chunk
        return bytes(self.received)

    def close(self) -> None:
        self.sock.close()


def command(*args: bytes | str | int) -> bytes:
    """A RESP multibulk command."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)
