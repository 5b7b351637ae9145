"""The zero-copy hot path: socket -> pipe -> socket with splice(2), on Linux.

::

    client --splice--> [pipe] --splice--> upstream      (direction "upstream")
    client <--splice-- [pipe] <--splice-- upstream      (direction "downstream")

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

Raw readiness callbacks need care on uvloop: when the kernel reports EPOLLERR
(an RST, a keepalive timeout), libuv stops the poll handle and uvloop runs the
registered callbacks once, then closes the handle and leaves it registered. A
callback that only sees data (bytes that arrived before the RST are still
readable) never hears of the error, and re-arming that descriptor raises
RuntimeError. So: every callback makes its syscall and aborts on any error;
re-arming failures abort; descriptors are always unregistered before they are
closed; and a watchdog polls the sockets of relays that moved bytes (POLLERR
means a pending fatal error) and of all relays when the loop reports an
``OSError`` without context, which is how other uvloop versions surface it.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

from .config import ListenerConfig
from .relay import BufferPool, Relay

log = logging.getLogger("cacheport.splice")

PIPE_SIZE = 1 << 20  # measured: 1 MiB pipes move bulk with ~12 syscalls/MiB; 64 KiB is worst
MAX_PIPES = 64  # per loop; beyond this a burst copies through the buffer instead
REFUSED_RETRY = 5.0  # seconds before asking the kernel again after it refused a pipe
IDLE_TRIM = 2.0  # an idle loop closes its pooled pipes: kernel memory and the per-user budget
BULK_READ = 16 << 10  # copy: auto -- reads below this copy through the buffer, at or above splice
WATCHDOG_INTERVAL = 0.25  # uvloop only: how often sockets of busy relays are polled
WATCHDOG_FULL_EVERY = 20  # ...and every this many rounds, all of them

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_LINGER_RST = struct.pack("ii", 1, 0)
_POLL_DEAD = select.POLLERR | select.POLLNVAL


def splice_supported() -> bool:
    """Whether this platform has splice(2) and F_SETPIPE_SZ (Linux, Python >= 3.10)."""
    return (sys.platform.startswith("linux") and hasattr(os, "splice")
            and hasattr(fcntl, "F_SETPIPE_SZ"))


_splice: Callable[..., int] = getattr(os, "splice", None) or (lambda *a: 0)
_unsupported_logged = False


def choose_hub(loop: asyncio.AbstractEventLoop, config: ListenerConfig) -> SpliceHub | None:
    """The loop's hub when this listener's new connections splice; None to buffer."""
    global _unsupported_logged
    if config.copy == "buffer" or not config.may_splice:
        return None
    if not splice_supported():
        if config.copy == "splice" and not _unsupported_logged:
            _unsupported_logged = True
            log.warning("listener %s: copy: splice needs Linux splice(2); copying through "
                        "a buffer instead (logged once)", config.name)
        return None
    return hub_for(loop)


class PipePool:
    """Pipes for one event loop, leased to a direction only while it has bytes in flight.

    Created lazily and sized with F_SETPIPE_SZ. ``free`` holds empty pipes as
    ``(read_fd, write_fd)`` tuples; a relay pops and appends them directly.
    """

    __slots__ = ("busy", "created", "failures", "free", "limit", "live", "opener", "refused",
                 "refused_at", "size", "warned")

    def __init__(self, size: int | None = None, limit: int | None = None,
                 opener: Callable[[int], tuple[int, int]] | None = None) -> None:
        self.size = size or PIPE_SIZE
        self.limit = MAX_PIPES if limit is None else limit
        self.free: list[tuple[int, int]] = []
        self.live = 0  # pipes open: leased plus free
        self.created = 0  # pipes ever made (reuse shows as leases far above this)
        self.failures = 0  # times the kernel refused a pipe or its size
        self.busy = 0  # bursts that found every pipe (``limit``) leased
        self.refused: str | None = None  # why the last attempt failed, until REFUSED_RETRY
        self.refused_at = 0.0
        self.warned = False
        self.opener = opener or open_pipe

    def create(self) -> tuple[int, int] | None:
        """A new pipe, or None (the caller copies through a buffer) when none may be had."""
        if self.live >= self.limit:
            self.busy += 1
            return None
        if self.refused is not None:
            if time.monotonic() - self.refused_at < REFUSED_RETRY:
                return None
            self.refused = None
        try:
            pipe = self.opener(self.size)
        except OSError as exc:
            self._refused(exc)
            return None
        self.live += 1
        self.created += 1
        return pipe

    def _refused(self, exc: OSError) -> None:
        self.failures += 1
        self.refused = exc.strerror or str(exc)
        self.refused_at = time.monotonic()
        if not self.warned:
            self.warned = True
            hint = ""
            if exc.errno == errno.EPERM:
                hint = (" (an unprivileged user past fs.pipe-user-pages-soft or "
                        "fs.pipe-max-size gets no large pipes)")
            log.warning("splice: the kernel refused a %d KiB pipe: %s%s; connections copy "
                        "through a buffer until pipes are available again (logged once)",
                        self.size >> 10, self.refused, hint)

    def recycle(self, pipe: tuple[int, int], scratch: memoryview) -> None:
        """Empty a pipe whose relay was cut with bytes in it, and pool it again.

        Reading it out through the scratch buffer costs a few syscalls on a rare path
        and keeps the pool (and the process's descriptor count) steady.
        """
        try:
            for _ in range(self.size // max(len(scratch), 1) + 2):
                if os.readv(pipe[0], [scratch]) < len(scratch):
                    break
            else:
                raise OSError(errno.EIO, "pipe did not drain")
        except BlockingIOError:
            pass  # empty
        except OSError:
            self.discard(pipe)
            return
        self.free.append(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        """Close a pipe for good."""
        self.live -= 1
        _close_pipe(pipe)

    def trim(self) -> None:
        """Close every pooled (empty) pipe."""
        while self.free:
            self.live -= 1
            _close_pipe(self.free.pop())


def open_pipe(size: int) -> tuple[int, int]:
    """A non-blocking pipe of exactly ``size`` bytes, or OSError."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        got = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        _close_pipe((r, w))
        raise
    if got < size:  # never happens on Linux (it rounds up), but a small pipe is the worst case
        _close_pipe((r, w))
        raise OSError(errno.EPERM, f"pipe size {got} below {size}")
    return r, w


def _close_pipe(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        try:
            os.close(fd)
        except OSError:
            pass


class SpliceHub:
    """Per event loop: the pipe pool, the live splice relays and the uvloop watchdog."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pipes: PipePool | None = None,
                 *, watchdog: bool | None = None) -> None:
        self._loop = weakref.ref(loop)  # loops are weakly keyed in _HUBS: never hold them
        self.pipes = pipes or PipePool()
        self.relays: set[SpliceRelay] = set()
        self.watchdog = _is_uvloop(loop) if watchdog is None else watchdog
        self.watchdog_aborts = 0  # relays cut because a socket had a pending error
        self.loop_reports = 0  # fatal poll errors the loop reported to its exception handler
        self._rounds = 0
        # Flags, not timer handles: a handle refers to its loop, and the hub must not.
        self._ticking = False
        self._trimming = False
        self._prev_handler: Any = None
        # Pooled pipes are closed with the loop, whoever forgets the hub.
        weakref.finalize(loop, _close_all, self.pipes.free)
        if self.watchdog:
            self._prev_handler = loop.get_exception_handler()
            loop.set_exception_handler(self._on_loop_exception)

    def add(self, relay: SpliceRelay) -> None:
        self.relays.add(relay)
        if self.watchdog and not self._ticking:
            self._ticking = self._later(WATCHDOG_INTERVAL, self._tick)

    def discard(self, relay: SpliceRelay) -> None:
        self.relays.discard(relay)
        if not self.relays and self.pipes.free and not self._trimming:
            self._trimming = self._later(IDLE_TRIM, self._idle_trim)

    def _later(self, delay: float, callback: Callable[[], None]) -> bool:
        loop = self._loop()
        if loop is None or loop.is_closed():
            return False
        loop.call_later(delay, callback)
        return True

    def _idle_trim(self) -> None:
        """No relay for a while: close pooled pipes (the next burst makes new ones)."""
        self._trimming = False
        if not self.relays:
            self.pipes.trim()

    # -- the uvloop watchdog -----------------------------------------------------

    def _tick(self) -> None:
        self._rounds += 1
        self.probe(full=self._rounds % WATCHDOG_FULL_EVERY == 0)
        self._ticking = bool(self.relays) and self._later(WATCHDOG_INTERVAL, self._tick)

    def probe(self, full: bool = True) -> int:
        """Cut relays whose sockets have a pending error; only busy ones unless ``full``.

        One poll(2) with no events requested: the kernel still reports POLLERR,
        without consuming the error (getsockopt SO_ERROR would). Returns the number cut.
        """
        poller = select.poll()
        owners: dict[int, SpliceRelay] = {}
        for relay in self.relays:
            total = relay.up.nbytes + relay.down.nbytes
            if not full and total == relay.probed:
                continue
            relay.probed = total
            for fd in relay.fds:
                if fd >= 0:
                    owners[fd] = relay
                    poller.register(fd, 0)
        if not owners:
            return 0
        cut = 0
        for fd, events in poller.poll(0):
            relay = owners[fd]
            if events & _POLL_DEAD and not relay.closed:
                cut += 1
                relay.abort()
        self.watchdog_aborts += cut
        return cut

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop,
                           context: dict[str, Any]) -> None:
        """A bare ``{'exception': OSError}`` is uvloop's report of a poll handle it closed."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and set(context) == {"exception"}:
            self.loop_reports += 1
            self.probe(full=True)
            if exc.errno == errno.EBADF:
                log.debug("splice: the loop closed a watcher after a socket error; probed")
                return
        if self._prev_handler is not None:
            self._prev_handler(loop, context)
        else:
            loop.default_exception_handler(context)


_HUBS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SpliceHub] = (
    weakref.WeakKeyDictionary())


def hub_for(loop: asyncio.AbstractEventLoop) -> SpliceHub:
    """The loop's hub, made on first use."""
    hub = _HUBS.get(loop)
    if hub is None:
        hub = _HUBS[loop] = SpliceHub(loop)
    return hub


def _is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")


def _close_all(free: list[tuple[int, int]]) -> None:
    while free:
        _close_pipe(free.pop())


class _Way:
    """One direction of a splice relay: ``src`` -> leased pipe (or buffer) -> ``dst``."""

    __slots__ = ("adaptive", "buffered", "bufpool", "bulk", "bulk_at", "dst", "dst_sock", "eof",
                 "free", "held", "held_at", "loop", "nbytes", "pending", "pipe", "pool",
                 "readable", "relay", "size", "spliced", "src", "src_sock", "writable")

    def __init__(self, relay: SpliceRelay, hub: SpliceHub, bufpool: BufferPool,
                 adaptive: bool) -> None:
        self.relay = relay
        self.pool = hub.pipes
        self.free = hub.pipes.free
        self.size = hub.pipes.size
        self.bufpool = bufpool
        self.loop: asyncio.AbstractEventLoop | None = None
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
        # copy: auto -- the size of the last read picks the next one's path: small
        # request/response traffic copies (and leaves the pipe budget alone), bulk splices.
        self.adaptive = adaptive
        self.bulk = not adaptive
        self.bulk_at = min(BULK_READ, bufpool.size)
        self.readable = self._readable  # bound once: re-arming allocates nothing more
        self.writable = self._writable

    def attach(self, loop: asyncio.AbstractEventLoop, src: socket.socket,
               dst: socket.socket) -> None:
        self.loop = loop
        self.src_sock, self.dst_sock = src, dst
        self.src, self.dst = src.fileno(), dst.fileno()

    # -- the hot path: one splice in, one splice out, integers ------------------------

    def _readable(self) -> None:
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
        except OSError:
            self.relay.abort()
            return
        if n == 0:
            self.free.append(pipe)
            self.pipe = None
            self.relay.half_close(self)
            return
        self.nbytes += n
        if n < self.bulk_at and self.adaptive:
            self.bulk = False  # the burst is over
        try:
            m = _splice(pipe[0], self.dst, n, None, None, _FLAGS)
        except BlockingIOError:
            m = 0
        except OSError:
            self.relay.abort()
            return
        if m == n:
            self.free.append(pipe)
            self.pipe = None
            return
        self.pending = n - m
        self._stall()

    def _writable(self) -> None:
        pipe = self.pipe
        if pipe is None:
            self._flush_held()
            return
        try:
            m = _splice(pipe[0], self.dst, self.pending, None, None, _FLAGS)
        except BlockingIOError:
            return
        except OSError:
            self.relay.abort()
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
            self.relay.abort()
            return
        if n == 0:
            self.relay.half_close(self)
            return
        self.nbytes += n
        self.buffered += n
        if n >= self.bulk_at and self.adaptive:
            self.bulk = True  # a full read: more is waiting, splice it
        try:
            m = self.dst_sock.send(buf[:n])  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            m = 0
        except OSError:
            self.relay.abort()
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
            self.relay.abort()
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
        loop = self.loop
        assert loop is not None
        try:
            loop.remove_reader(self.src)
            loop.add_writer(self.dst, self.writable)
        except (RuntimeError, OSError, ValueError):
            # uvloop: the poll handle of this socket was closed after an error.
            self.relay.abort()

    def _resume(self) -> None:
        loop = self.loop
        assert loop is not None
        try:
            loop.remove_writer(self.dst)
            if not self.eof and not self.relay.closed:
                loop.add_reader(self.src, self.readable)
        except (RuntimeError, OSError, ValueError):
            self.relay.abort()

    def release(self, reset: bool) -> None:
        """The relay is closing: return or close the pipe, give back any buffer."""
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


class SpliceRelay:
    """A client connection spliced to its upstream on raw sockets; owns both sockets.

    Same face as ``relay.Relay`` for the listener: byte counters, ``closed``,
    ``abort``, ``close``, ``source``; ``attach`` then ``start`` instead of transports.
    """

    __slots__ = ("__weakref__", "client_sock", "closed", "down", "fds", "hub", "loop",
                 "on_close", "probed", "source", "started", "up", "upstream_sock")

    def __init__(self, hub: SpliceHub, bufpool: BufferPool,
                 on_close: Callable[[SpliceRelay], None], source: str = "",
                 *, adaptive: bool = False) -> None:
        self.hub = hub
        self.source = source
        self.on_close = on_close
        self.up = _Way(self, hub, bufpool, adaptive)  # client -> upstream
        self.down = _Way(self, hub, bufpool, adaptive)  # upstream -> client
        self.client_sock: socket.socket | None = None
        self.upstream_sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fds: tuple[int, int] = (-1, -1)
        self.closed = False
        self.started = False
        self.probed = 0  # bytes_total when the watchdog last looked

    @property
    def bytes_upstream(self) -> int:
        """Client -> upstream bytes so far."""
        return self.up.nbytes

    @property
    def bytes_downstream(self) -> int:
        """Upstream -> client bytes so far."""
        return self.down.nbytes

    @property
    def bytes_total(self) -> int:
        return self.up.nbytes + self.down.nbytes

    @property
    def pending_downstream(self) -> int:
        """Bytes read from the upstream not yet handed to the client's socket."""
        return self.down.pending

    @property
    def pipe_leases(self) -> int:
        """Pipes this relay took from the pool's free list (test seam)."""
        return self.up.spliced + self.down.spliced

    @property
    def bytes_buffered(self) -> int:
        """Bytes copied through the buffer (small reads under auto, or no pipe to be had)."""
        return self.up.buffered + self.down.buffered

    def attach(self, loop: asyncio.AbstractEventLoop, client: socket.socket,
               upstream: socket.socket) -> None:
        """Take ownership of both connected, non-blocking sockets."""
        self.loop = loop
        self.client_sock, self.upstream_sock = client, upstream
        self.fds = (client.fileno(), upstream.fileno())
        self.up.attach(loop, client, upstream)
        self.down.attach(loop, upstream, client)

    def start(self) -> None:
        """Start relaying: whatever arrived during set-up waits in the kernel till now."""
        assert self.loop is not None, "attach() first"
        self.started = True
        self.hub.add(self)
        try:
            self.loop.add_reader(self.up.src, self.up.readable)
            self.loop.add_reader(self.down.src, self.down.readable)
        except (RuntimeError, OSError, ValueError):
            self.abort()

    def half_close(self, way: _Way) -> None:
        """``way`` read EOF with nothing pending: pass the FIN on, keep the other way."""
        way.eof = True
        loop = self.loop
        assert loop is not None
        try:
            loop.remove_reader(way.src)
            way.dst_sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
        except (RuntimeError, OSError, ValueError):
            self.abort()
            return
        if self.up.eof and self.down.eof:
            self.close()

    def abort(self) -> None:
        """Tear down both sides at once; both peers get an RST."""
        self._shut(reset=True)

    def close(self) -> None:
        """Close both sides; bytes still in a pipe would be lost, so then reset instead.

        A FIN after a cut stream would look like a complete reply to the peer.
        """
        self._shut(reset=bool(self.up.pending or self.down.pending))

    def _shut(self, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.loop
        for sock in (self.client_sock, self.upstream_sock):
            if sock is None:
                continue
            fd = sock.fileno()
            if fd >= 0 and loop is not None and not loop.is_closed():
                # Always unregister before closing: a poll handle uvloop closed after an
                # error stays registered under this number and would meet the next socket.
                for remove in (loop.remove_reader, loop.remove_writer):
                    try:
                        remove(fd)
                    except (RuntimeError, OSError, ValueError):
                        pass
            if reset:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
            sock.close()
        self.up.release(reset)
        self.down.release(reset)
        self.hub.discard(self)
        self.on_close(self)


AnyRelay = Relay | SpliceRelay  # what a listener tracks: either path, one face
