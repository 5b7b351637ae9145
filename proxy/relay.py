"""The hot path: a two-way byte pump between a client and its upstream.

::

    client --recv_into--> [scratch] --send--> upstream      (Pump "upstream")
    client <--send-- [scratch] <--recv_into-- upstream      (Pump "downstream")

Each direction is driven by the event loop's readiness callbacks on raw
non-blocking sockets. A chunk is received into a scratch buffer shared by the
whole process and sent on at once; only when the destination cannot take it
all does the direction keep that buffer (a fresh one takes its place in the
pool), stop reading its source and wait for the destination to drain. So a
direction holds at most one buffer of ``buffer_size`` bytes, an idle
connection holds none, and no chunk is ever copied in Python.

Half-close: EOF from one side becomes ``shutdown(SHUT_WR)`` on the other once
every byte before it has been sent; the relay closes when both directions are
done. A reset or error on either side aborts both (with an RST to the peer).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

_LINGER_RST = struct.pack("ii", 1, 0)
_AGAIN = (BlockingIOError, InterruptedError)


class BufferPool:
    """Scratch buffers for one event loop (one thread), reused across connections."""

    __slots__ = ("keep", "scratch", "size", "spare")

    def __init__(self, size: int, keep: int = 64) -> None:
        self.size = size
        self.keep = keep
        self.scratch = memoryview(bytearray(size))
        self.spare: list[memoryview] = []

    def take_scratch(self) -> memoryview:
        """Hand the current scratch buffer to a stalled direction; install a new one."""
        taken = self.scratch
        self.scratch = self.spare.pop() if self.spare else memoryview(bytearray(self.size))
        return taken

    def give_back(self, buf: memoryview) -> None:
        if len(self.spare) < self.keep:
            self.spare.append(buf)

    @property
    def held_bytes(self) -> int:
        return self.size * (len(self.spare) + 1)


class Pump:
    """One direction of a relay: ``src`` -> ``dst``."""

    __slots__ = (
        "dst",
        "dstfd",
        "eof",
        "loop",
        "nbytes",
        "pending",
        "pool",
        "pos",
        "relay",
        "src",
        "srcfd",
        "stop",
    )

    def __init__(
        self,
        relay: Relay,
        loop: asyncio.AbstractEventLoop,
        pool: BufferPool,
        src: socket.socket,
        dst: socket.socket,
    ) -> None:
        self.relay = relay
        self.loop = loop
        self.pool = pool
        self.src = src
        self.dst = dst
        self.srcfd = src.fileno()
        self.dstfd = dst.fileno()
        self.nbytes = 0  # bytes received from src (and so sent, or pending, to dst)
        self.pending: memoryview | None = None  # unsent bytes: pending[pos:stop]
        self.pos = 0
        self.stop = 0
        self.eof = False

    @property
    def pending_bytes(self) -> int:
        return self.stop - self.pos if self.pending is not None else 0

    def start(self) -> None:
        self.loop.add_reader(self.srcfd, self.on_readable)

    def on_readable(self) -> None:
        buf = self.pool.scratch
        try:
            n = self.src.recv_into(buf)
        except _AGAIN:
            return
        except OSError:
            self.relay.abort(self)
            return
        if not n:
            self.loop.remove_reader(self.srcfd)
            self.eof = True
            self.relay.half_close(self)
            return
        self.nbytes += n
        try:
            sent = self.dst.send(buf[:n])
        except _AGAIN:
            sent = 0
        except OSError:
            self.relay.abort(self)
            return
        if sent != n:
            # The destination is full: keep this chunk, stop reading, wait for it.
            self.pending = self.pool.take_scratch()
            self.pos = sent
            self.stop = n
            self.loop.remove_reader(self.srcfd)
            self.loop.add_writer(self.dstfd, self.on_writable)

    def on_writable(self) -> None:
        pending = self.pending
        assert pending is not None
        try:
            sent = self.dst.send(pending[self.pos : self.stop])
        except _AGAIN:
            return
        except OSError:
            self.relay.abort(self)
            return
        self.pos += sent
        if self.pos == self.stop:
            self.loop.remove_writer(self.dstfd)
            self.pending = None
            self.pool.give_back(pending)
            self.loop.add_reader(self.srcfd, self.on_readable)

    def detach(self) -> None:
        """Stop watching both sockets and return any held buffer."""
        self.loop.remove_reader(self.srcfd)
        self.loop.remove_writer(self.dstfd)
        if self.pending is not None:
            self.pool.give_back(self.pending)
            self.pending = None


class Relay:
    """A client connection spliced to its upstream connection; owns both sockets."""

    __slots__ = (
        "client",
        "closed",
        "downstream",
        "half_closed",
        "on_close",
        "upstream",
        "upstream_sock",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: BufferPool,
        client: socket.socket,
        upstream: socket.socket,
        on_close: Callable[[Relay], None],
    ) -> None:
        self.client = client
        self.upstream_sock = upstream
        self.upstream = Pump(self, loop, pool, client, upstream)  # client -> upstream
        self.downstream = Pump(self, loop, pool, upstream, client)  # upstream -> client
        self.on_close = on_close
        self.half_closed = 0
        self.closed = False

    @property
    def bytes_total(self) -> int:
        return self.upstream.nbytes + self.downstream.nbytes

    def start(self) -> None:
        self.upstream.start()
        self.downstream.start()

    def half_close(self, pump: Pump) -> None:
        """``pump``'s source sent EOF; pass it on once nothing is pending (it never is here)."""
        try:
            pump.dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort(pump)
            return
        self.half_closed += 1
        if self.half_closed == 2:
            self.close()

    def abort(self, pump: Pump | None = None) -> None:
        """Tear down both sides at once; the side that did not fail gets an RST."""
        if self.closed:
            return
        for sock in (self.client, self.upstream_sock):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.upstream.detach()
        self.downstream.detach()
        self.client.close()
        self.upstream_sock.close()
        self.on_close(self)
