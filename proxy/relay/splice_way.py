"""One direction of a splice relay: the splice(2) calls and the buffer copy they fall back on.

::

    src socket --splice--> [leased pipe] --splice--> dst socket     (bulk)
    src socket --recv_into--> [loop's scratch buffer] --send--> dst socket   (small reads)

The payload never enters Python: each readiness callback makes one ``splice``
from the readable socket into a pipe and one from the pipe into the other
socket, and adds the count to an integer. A pipe is leased from a per-loop
``PipePool`` only while a direction has bytes in flight and given back the
moment it is empty, so idle connections hold no pipes and a few pipes serve
thousands of connections. While a pipe holds unsent bytes the direction stops
watching its source and watches its destination instead: backpressure is the
pipe itself (at most ``PipePool.size`` bytes per stalled direction, in kernel
pages, not in the process).

Under ``copy: auto`` (the default) the size of a direction's last read picks the
next one's path: reads under ``BULK_READ`` (16 KiB) copy through the loop's
scratch buffer -- as cheap as splicing for request/response traffic, and it
leaves the pipe budget alone -- and a full read switches the direction to
pipes until a small read switches it back (docs/hot-loop.md has the figures).

When the kernel refuses a pipe (descriptor limit) or its size (an unprivileged
user past ``fs.pipe-user-pages-soft`` gets EPERM from F_SETPIPE_SZ and tiny
pipes), the connection copies through a buffer instead -- ``recv_into`` a
scratch buffer shared by the loop, ``send`` from it, the same one-buffer bound
as the transport relay -- logged once per loop, never an error to the client.

Every callback makes its syscall and hands any error to its relay (``lost``): on
uvloop a callback may be the last one a failed socket gets (relay/splice_hub.py).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Protocol

from .buffered import BufferPool
from .pipes import BULK_READ, SMALL_READS, PipePool

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_splice: Callable[..., int] = getattr(os, "splice", None) or (lambda *a: 0)


class SpliceConnection(Protocol):
    """What a direction and the hub see of the relay they serve (``splice.SpliceRelay``)."""

    up: Way  # client -> upstream
    down: Way  # upstream -> client
    cfd: int
    ufd: int
    closed: bool
    dying: Way | None
    probed: int

    @property
    def fds(self) -> tuple[int, int]: ...

    def rewatch(self) -> None: ...

    def move(self, parked: bool) -> None: ...

    def half_close(self, way: Way) -> None: ...

    def lost(self, out: Way) -> None: ...

    def settle(self) -> None: ...

    def abort(self) -> None: ...


class Way:
    """One direction of a splice relay: ``src`` -> leased pipe (or buffer) -> ``dst``."""

    __slots__ = ("adaptive", "buffered", "bufpool", "bulk", "bulk_at", "dst", "dst_sock", "eof",
                 "free", "held", "held_at", "nbytes", "other", "pending", "pipe", "pool",
                 "relay", "size", "small", "spliced", "src", "src_sock", "stalled", "watching")

    def __init__(self, relay: SpliceConnection, pipes: PipePool, bufpool: BufferPool,
                 adaptive: bool) -> None:
        self.relay = relay
        self.pool = pipes
        self.free = pipes.free
        self.size = pipes.size
        self.bufpool = bufpool
        self.other: Way = self  # the opposite direction, set by the relay
        self.src = self.dst = -1
        self.src_sock: socket.socket | None = None
        self.dst_sock: socket.socket | None = None
        self.pipe: tuple[int, int] | None = None
        self.held: memoryview | None = None  # buffer-copy fallback: unsent bytes
        self.held_at = 0
        self.pending = 0  # bytes read from src and not yet taken by dst
        self.nbytes = 0  # bytes read from src (the listener's counters)
        self.spliced = 0  # pipe leases taken from the free list (test seam; integer only)
        self.buffered = 0  # bytes that went through the buffer fallback
        self.eof = False
        self.watching = False  # waiting for src to be readable
        self.stalled = False  # bytes wait for dst: waiting for it to be writable
        # copy: auto -- the size of the last read picks the next one's path: small
        # request/response traffic copies (and leaves the pipe budget alone), bulk splices.
        self.adaptive = adaptive
        self.bulk = not adaptive
        self.bulk_at = min(BULK_READ, bufpool.size)
        self.small = 0  # small spliced reads in a row (copy: auto)

    def attach(self, src: socket.socket, dst: socket.socket, src_fd: int, dst_fd: int) -> None:
        self.src_sock, self.dst_sock = src, dst
        self.src, self.dst = src_fd, dst_fd

    # -- the hot path: one splice in, one splice out, integers ------------------------

    def readable(self) -> None:
        if not self.bulk:
            self._copy_buffered()
            return
        pipe = self.pipe
        if pipe is None:
            if self.free:
                pipe = self.free.pop()
                self.spliced += 1
            else:
                pipe = self.pool.create()
                if pipe is None:
                    self._copy_buffered()
                    return
            self.pipe = pipe
        try:
            n = _splice(self.src, pipe[1], self.size, None, None, _FLAGS)
        except BlockingIOError:
            self.free.append(pipe)  # spurious wake-up: the pipe is still empty
            self.pipe = None
            return
        except OSError:  # src failed (reset): nothing of it is left to read
            self.free.append(pipe)
            self.pipe = None
            self.relay.lost(self)
            return
        if n == 0:
            self.free.append(pipe)
            self.pipe = None
            self.relay.half_close(self)
            return
        self.nbytes += n
        if n < self.bulk_at and self.adaptive:
            # Not at the first small read: that is usually the tail of one large reply,
            # and the next reply would then start with a copy (docs/hot-loop.md).
            self.small += 1
            if self.small >= SMALL_READS:
                self.bulk = False  # the bulk is over
        else:
            self.small = 0
        try:
            m = _splice(pipe[0], self.dst, n, None, None, _FLAGS)
        except BlockingIOError:
            m = 0
        except OSError:
            self.pending = n
            self.relay.lost(self.other)
            return
        if m == n:
            self.free.append(pipe)
            self.pipe = None
            return
        self.pending = n - m
        self._stall()

    def writable(self) -> None:
        pipe = self.pipe
        if pipe is None:
            self._flush_held()
            return
        try:
            m = _splice(pipe[0], self.dst, self.pending, None, None, _FLAGS)
        except BlockingIOError:
            return
        except OSError:
            self.relay.lost(self.other)
            return
        self.pending -= m
        if self.pending:
            return
        self.free.append(pipe)
        self.pipe = None
        self._resume()

    # -- through the buffer: small reads under copy: auto, or no pipe to be had ---------

    def _copy_buffered(self) -> None:
        buf = self.bufpool.scratch
        try:
            n = self.src_sock.recv_into(buf)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.relay.lost(self)
            return
        if n == 0:
            self.relay.half_close(self)
            return
        self.nbytes += n
        self.buffered += n
        if n >= self.bulk_at and self.adaptive:
            self.bulk = True  # a full read: more is waiting, splice it
            self.small = 0
        try:
            m = self.dst_sock.send(buf[:n])  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            m = 0
        except OSError:
            self.relay.lost(self.other)
            return
        if m < n:
            # Keep the unsent tail in this very buffer; the pool installs a fresh scratch.
            self.held = self.bufpool.take_scratch()
            self.held_at = m
            self.pending = n - m
            self._stall()

    def _flush_held(self) -> None:
        held = self.held
        if held is None:  # nothing to send: a stale wake-up
            self._resume()
            return
        start = self.held_at
        try:
            m = self.dst_sock.send(held[start:start + self.pending])  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.relay.lost(self.other)
            return
        self.held_at += m
        self.pending -= m
        if self.pending:
            return
        self.held = None
        self.bufpool.give_back(held)
        self._resume()

    # -- watching: source while empty, destination while bytes wait ---------------------

    def _stall(self) -> None:
        """Bytes wait for ``dst``: stop reading ``src`` (backpressure), watch ``dst``."""
        self.watching = False
        self.stalled = True
        self.relay.rewatch()

    def _resume(self) -> None:
        self.stalled = False
        if self.relay.dying is self:
            self.relay.rewatch()
            self.drain()
            return
        self.watching = not self.eof and not self.relay.closed
        self.relay.rewatch()

    # -- after src failed: what is left in its socket, then the reset ------------------

    def drain(self) -> None:
        """``src`` failed, so its socket's receive queue is final: read it to the end
        without a watcher (uvloop may have closed it after EPOLLERR) and send it on;
        stall on ``dst`` when it is full. Rare, so always through the buffer."""
        relay = self.relay
        buf = self.bufpool.scratch
        while not relay.closed:
            try:
                n = self.src_sock.recv_into(buf)  # type: ignore[union-attr]
            except OSError:  # the reset itself, after the last byte (or EAGAIN: nothing)
                n = 0
            if n == 0:
                relay.settle()
                return
            self.nbytes += n
            self.buffered += n
            try:
                m = self.dst_sock.send(buf[:n])  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                m = 0
            except OSError:
                relay.abort()
                return
            if m < n:
                self.held = self.bufpool.take_scratch()
                self.held_at = m
                self.pending = n - m
                self.stalled = True
                relay.rewatch()
                return

    def release(self, reset: bool) -> None:
        """The relay is closing: return or close the pipe, give back any buffer."""
        self.watching = self.stalled = False
        pipe = self.pipe
        if pipe is not None:
            self.pipe = None
            if self.pending or reset:
                self.pool.recycle(pipe, self.bufpool.scratch)  # may hold bytes: empty it
            else:
                self.free.append(pipe)
        if self.held is not None:
            self.bufpool.give_back(self.held)
            self.held = None
        self.pending = 0

