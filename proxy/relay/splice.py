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
means a pending fatal error) and of all live relays when the loop reports an
``OSError`` without context, which is how other uvloop versions surface it.

A relay that moved nothing for a tick parks: its sockets leave the loop's
watchers (~560 bytes each under uvloop) for one epoll set of the hub's, which
the loop watches as a single descriptor, and the first event wakes it
(``SpliceHub``; docs/hot-loop.md has the figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import select
import socket
import weakref
from collections.abc import Callable
from typing import Any

from .. import closes
from ..config import ListenerConfig
from .buffered import _LINGER_RST, DRAIN_GRACE, SETTLE_TICK, BufferPool, _unsent
from .choose import RelayKind, relay_order
from .pipes import (
    BULK_READ,
    IDLE_TRIM,
    SMALL_READS,
    PipePool,
    _close_pipe,
    splice_supported,
)

log = logging.getLogger("cacheport.splice")

PARK_TICK = 0.25  # how often live relays are looked at: idle ones park, busy ones are probed
TRIM_PARKS = 64  # a tick that parks this many relays hands the freed heap back to the OS...
TRIM_EVERY = 0.5  # ...at most this often (seconds); one trailing trim covers the parks between

_POLL_DEAD = select.POLLERR | select.POLLNVAL
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


_splice: Callable[..., int] = getattr(os, "splice", None) or (lambda *a: 0)
_unsupported_logged = False


def choose_hub(loop: asyncio.AbstractEventLoop, config: ListenerConfig) -> SpliceHub | None:
    """The loop's hub when this listener's new connections splice; None to buffer."""
    global _unsupported_logged
    if RelayKind.SPLICE not in relay_order(config):
        return None
    if not splice_supported():
        if config.copy == "splice" and not _unsupported_logged:
            _unsupported_logged = True
            log.warning("listener %s: copy: splice needs Linux splice(2); copying through "
                        "a buffer instead (logged once)", config.name)
        return None
    return hub_for(loop)




class SpliceHub:
    """Per event loop: the pipe pool, the live relays' watchdog, and the parked relays.

    ::

        live relay:    event loop --(a watcher per socket)--> _Way.readable/.writable
        parked relay:  event loop --(hub's epoll fd)--> SpliceHub.dispatch --> wake, then the same

    A live relay's sockets have event-loop watchers: the shortest path from the
    kernel to the callback. A watcher costs ~560 bytes per socket under uvloop
    (poll handle, callback handle, context copy, two dict entries), so a relay that
    moved nothing for a whole tick is *parked*: its sockets move to one epoll set
    the loop watches as a single descriptor, at one dict entry each, and the
    first event wakes it back onto watchers (docs/hot-loop.md has the figures:
    an idle connection drops from ~2.7 KB to ~1.5-1.7 KB). The same tick is uvloop's
    watchdog: sockets of live relays that moved bytes are polled for a pending
    error (see the module docstring); parked sockets need none, epoll reports
    EPOLLERR/EPOLLHUP itself.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, pipes: PipePool | None = None,
                 *, watchdog: bool | None = None) -> None:
        self._loop = weakref.ref(loop)  # loops are weakly keyed in _HUBS: never hold them
        self.pipes = pipes or PipePool()
        self.live: set[SpliceRelay] = set()  # started, not parked, not closed
        self.count = 0  # started and not closed: live + parked
        self.epoll = select.epoll()
        # Socket fd -> the direction that reads it, for every parked relay; the direction
        # that writes it is ``.other``.
        self.parked: dict[int, _Way] = {}
        self.parks = 0  # times a relay was parked (test seam; integer only)
        self.watchdog = _is_uvloop(loop) if watchdog is None else watchdog
        self.watchdog_aborts = 0  # relays cut because a socket had a pending error
        self.loop_reports = 0  # fatal poll errors the loop reported to its exception handler
        # Flags, not timer handles: a handle refers to its loop, and the hub must not.
        self._armed = False
        self._ticking = False
        self._trimming = False
        self._heap_trimmed = 0.0  # loop time of the last heap trim
        self._heap_due = False  # a trailing heap trim is scheduled
        self.heap_trims = 0  # test seam; integer only
        self._prev_handler: Any = None
        # The epoll set and pooled pipes are closed with the loop, whoever forgets the hub.
        weakref.finalize(loop, _close_all, self.pipes.free, self.epoll)
        if self.watchdog:
            self._prev_handler = loop.get_exception_handler()
            loop.set_exception_handler(self._on_loop_exception)

    def started(self, relay: SpliceRelay) -> None:
        self.count += 1
        self.woken(relay)

    def woken(self, relay: SpliceRelay) -> None:
        """``relay`` is live (new, or woken from parking): the tick must look at it."""
        self.live.add(relay)
        if not self._ticking:
            self._ticking = self._later(PARK_TICK, self._tick)

    def finished(self, relay: SpliceRelay) -> None:
        """A started relay closed: forget it; trim the pipes once none is left."""
        self.live.discard(relay)
        self._unpark(relay)
        self.count -= 1
        if not self.count and self.pipes.free and not self._trimming:
            self._trimming = self._later(IDLE_TRIM, self._idle_trim)

    def _unpark(self, relay: SpliceRelay) -> None:
        for fd in (relay.cfd, relay.ufd):
            way = self.parked.get(fd)
            if way is not None and way.relay is relay:
                del self.parked[fd]

    def _later(self, delay: float, callback: Callable[[], None]) -> bool:
        loop = self._loop()
        if loop is None or loop.is_closed():
            return False
        loop.call_later(delay, callback)
        return True

    def _idle_trim(self) -> None:
        """No relay for a while: close pooled pipes (the next burst makes new ones)."""
        self._trimming = False
        if not self.count:
            self.pipes.trim()

    # -- parking -------------------------------------------------------------------

    def park(self, relay: SpliceRelay) -> None:
        """Move a live relay's sockets from loop watchers to the epoll set."""
        if not self._armed:
            loop = self._loop()
            if loop is None or loop.is_closed():
                return
            loop.add_reader(self.epoll.fileno(), self.dispatch)
            self._armed = True
        self.live.discard(relay)
        self.parked[relay.cfd] = relay.up
        self.parked[relay.ufd] = relay.down
        self.parks += 1
        relay.move(parked=True)

    def dispatch(self) -> None:
        """The epoll set is readable: wake the parked relays it names, run their event."""
        try:
            events = self.epoll.poll(0, _BATCH)
        except OSError:  # EINTR; the loop calls again while events are pending
            return
        parked = self.parked
        for fd, ev in events:
            way = parked.get(fd)
            if way is None:  # woken or closed earlier in this batch
                continue
            relay = way.relay
            self._unpark(relay)
            self.woken(relay)
            relay.move(parked=False)
            # Run the event now rather than on the watchers' first round: a reset that
            # waits there would meet uvloop's run-once error path (module docstring).
            if ev & _OUT_EV and way.other.stalled and not relay.closed:
                way.other.writable()
            if ev & _IN_EV and way.watching and not relay.closed:
                way.readable()

    # -- the tick: park idle relays; on uvloop, probe busy ones ------------------------

    def _tick(self) -> None:
        """Park the live relays that moved nothing since the last tick; probe the rest."""
        self._ticking = False
        idle = []
        busy = []
        for relay in self.live:
            total = relay.up.nbytes + relay.down.nbytes
            if total == relay.probed:
                idle.append(relay)
            else:
                relay.probed = total
                busy.append(relay)
        for relay in idle:
            if not relay.closed and relay.dying is None:
                self.park(relay)
        if len(idle) >= TRIM_PARKS:
            self._trim_heap()
        if self.watchdog and busy:
            self._probe(busy)
        if self.live:
            self._ticking = self._later(PARK_TICK, self._tick)

    def _trim_heap(self) -> None:
        """Return the heap that parking just freed to the OS.

        A live relay's watchers live in the C heap (uvloop's poll handles); parking a
        burst of relays frees them, but malloc keeps the pages. Measured with the bench's
        connections workload on a machine that opened 5,000 connections in 0.9 s, each
        with one request: 2.06-2.09 KB PSS per idle connection without the trim,
        1.70-1.77 with it. malloc_trim took ~3 ms on a 64 MB heap, hence the rate limit.
        """
        loop = self._loop()
        if _MALLOC_TRIM is None or loop is None or loop.is_closed():
            return
        wait = self._heap_trimmed + TRIM_EVERY - loop.time()
        if wait <= 0:
            self._heap_trimmed = loop.time()
            self.heap_trims += 1
            _MALLOC_TRIM(0)
        elif not self._heap_due:
            self._heap_due = self._later(wait, self._trailing_trim)

    def _trailing_trim(self) -> None:
        self._heap_due = False
        self._trim_heap()

    def probe(self) -> int:
        """Cut live relays whose sockets have a pending error; the number cut."""
        return self._probe(list(self.live))

    def _probe(self, relays: list[SpliceRelay]) -> int:
        """One poll(2) with no events requested: the kernel still reports POLLERR,
        without consuming the error (getsockopt SO_ERROR would)."""
        poller = select.poll()
        owners: dict[int, SpliceRelay] = {}
        for relay in relays:
            if relay.closed:
                continue
            for fd in relay.fds:
                owners[fd] = relay
                poller.register(fd, 0)
        if not owners:
            return 0
        cut = 0
        for fd, events in poller.poll(0):
            relay = owners[fd]
            if events & _POLL_DEAD and not relay.closed and relay.dying is None:
                cut += 1
                relay.lost(relay.up if fd == relay.cfd else relay.down)
        self.watchdog_aborts += cut
        return cut

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop,
                           context: dict[str, Any]) -> None:
        """A bare ``{'exception': OSError}`` is uvloop's report of a poll handle it closed."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and set(context) == {"exception"}:
            self.loop_reports += 1
            self.probe()
            if exc.errno == errno.EBADF:
                log.debug("splice: the loop closed a watcher after a socket error; probed")
                return
        if self._prev_handler is not None:
            self._prev_handler(loop, context)
        else:
            loop.default_exception_handler(context)


_BATCH = 64  # events taken from the epoll set per dispatch
# getattr: the module imports where there is no epoll (and so no splicing), e.g. macOS.
_IN = getattr(select, "EPOLLIN", 0x001)
_OUT = getattr(select, "EPOLLOUT", 0x004)
_ERR_HUP = getattr(select, "EPOLLERR", 0x008) | getattr(select, "EPOLLHUP", 0x010)
_IN_EV = _IN | _ERR_HUP  # wakes the reading direction
_OUT_EV = _OUT | _ERR_HUP  # ...and the writing one


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _malloc_trim()
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


def _close_all(free: list[tuple[int, int]], epoll: select.epoll) -> None:
    epoll.close()
    while free:
        _close_pipe(free.pop())


class _Way:
    """One direction of a splice relay: ``src`` -> leased pipe (or buffer) -> ``dst``."""

    __slots__ = ("adaptive", "buffered", "bufpool", "bulk", "bulk_at", "dst", "dst_sock", "eof",
                 "free", "held", "held_at", "nbytes", "other", "pending", "pipe", "pool",
                 "relay", "size", "small", "spliced", "src", "src_sock", "stalled", "watching")

    def __init__(self, relay: SpliceRelay, hub: SpliceHub, bufpool: BufferPool,
                 adaptive: bool) -> None:
        self.relay = relay
        self.pool = hub.pipes
        self.free = hub.pipes.free
        self.size = hub.pipes.size
        self.bufpool = bufpool
        self.other: _Way = self  # the opposite direction, set by the relay
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


class SpliceRelay:
    """A client connection spliced to its upstream on raw sockets; owns both sockets.

    Same face as ``relay.Relay`` for the listener: byte counters, ``closed``,
    ``abort``, ``close``, ``source``; ``attach`` then ``start`` instead of transports.
    What each direction waits for lives in its flags (``watching``, ``stalled``);
    ``rewatch`` applies them to loop watchers while live, to the hub's epoll set
    while parked.
    """

    __slots__ = ("__weakref__", "cfd", "client_sock", "closed", "cmask", "down", "dying", "grace",
                 "hub", "loop", "on_close", "parked", "probed", "source", "started", "ufd",
                 "umask", "up", "upstream_sock", "why")

    def __init__(self, hub: SpliceHub, bufpool: BufferPool,
                 on_close: Callable[[SpliceRelay], None], source: str = "",
                 *, adaptive: bool = False) -> None:
        self.hub = hub
        self.source = source
        self.on_close = on_close
        self.up = _Way(self, hub, bufpool, adaptive)  # client -> upstream
        self.down = _Way(self, hub, bufpool, adaptive)  # upstream -> client
        self.up.other, self.down.other = self.down, self.up
        self.client_sock: socket.socket | None = None
        self.upstream_sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cfd = self.ufd = -1  # each number is one int object, shared with the ways
        self.cmask = self.umask = 0  # what is watched on each socket now: _IN | _OUT
        self.parked = False
        self.closed = False
        self.started = False
        self.probed = 0  # bytes_total when the hub's tick last looked
        self.dying: _Way | None = None  # after a side failed: the way out of it (lost())
        self.grace: asyncio.TimerHandle | None = None
        self.why: str | None = None  # why it ended (proxy/closes.py): the first to know says

    @property
    def fds(self) -> tuple[int, int]:
        """(client, upstream) socket numbers."""
        return self.cfd, self.ufd

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
        self.cfd, self.ufd = client.fileno(), upstream.fileno()
        self.up.attach(client, upstream, self.cfd, self.ufd)
        self.down.attach(upstream, client, self.ufd, self.cfd)

    def start(self) -> None:
        """Start relaying: whatever arrived during set-up waits in the kernel till now."""
        assert self.loop is not None, "attach() first"
        self.started = True
        self.hub.started(self)
        self.up.watching = self.down.watching = True
        self.rewatch()

    def _masks(self) -> tuple[int, int]:
        up, down = self.up, self.down
        return ((_IN if up.watching else 0) | (_OUT if down.stalled else 0),
                (_IN if down.watching else 0) | (_OUT if up.stalled else 0))

    def rewatch(self) -> None:
        """Bring the watchers (or, parked, the epoll set) in line with the flags."""
        if self.closed:
            return
        cmask, umask = self._masks()
        try:
            if cmask != self.cmask:
                self._watch(self.cfd, self.cmask, cmask, self.up, self.down)
                self.cmask = cmask
        except (RuntimeError, OSError, ValueError):
            # uvloop: the poll handle of this socket was closed after an error.
            self.lost(self.up)
            return
        try:
            if umask != self.umask:
                self._watch(self.ufd, self.umask, umask, self.down, self.up)
                self.umask = umask
        except (RuntimeError, OSError, ValueError):
            self.lost(self.down)

    def _watch(self, fd: int, old: int, new: int, reader: _Way, writer: _Way) -> None:
        if self.parked:
            epoll = self.hub.epoll
            if new == 0:
                epoll.unregister(fd)
            elif old == 0:
                epoll.register(fd, new)
            else:
                epoll.modify(fd, new)
            return
        loop = self.loop
        assert loop is not None
        change = old ^ new
        if change & _IN:
            if new & _IN:
                loop.add_reader(fd, reader.readable)
            else:
                loop.remove_reader(fd)
        if change & _OUT:
            if new & _OUT:
                loop.add_writer(fd, writer.writable)
            else:
                loop.remove_writer(fd)

    def move(self, parked: bool) -> None:
        """Hand both sockets from loop watchers to the hub's epoll set, or back.

        Nothing is watched after ``_unwatch``, so ``rewatch`` registers what the flags
        say on the new side.
        """
        self._unwatch()
        self.parked = parked
        self.rewatch()

    def _unwatch(self) -> None:
        """Take both sockets off whatever watches them; errors are beside the point."""
        if self.parked:
            for fd, mask in ((self.cfd, self.cmask), (self.ufd, self.umask)):
                if mask:
                    try:
                        self.hub.epoll.unregister(fd)
                    except (OSError, ValueError):
                        pass
        else:
            loop = self.loop
            if loop is not None and not loop.is_closed():
                # Always both: a poll handle uvloop closed after an error stays registered
                # under this number and would meet the next socket that gets it.
                for fd in (self.cfd, self.ufd):
                    if fd < 0:
                        continue
                    for remove in (loop.remove_reader, loop.remove_writer):
                        try:
                            remove(fd)
                        except (RuntimeError, OSError, ValueError):
                            pass
        self.cmask = self.umask = 0

    def half_close(self, way: _Way) -> None:
        """``way`` read EOF with nothing pending: pass the FIN on, keep the other way."""
        if self.why is None:
            self.why = closes.CLIENT_CLOSED if way is self.up else closes.UPSTREAM_CLOSED
        way.eof = True
        way.watching = False
        self.rewatch()
        if self.closed:
            return
        try:
            way.dst_sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
        except OSError:  # ENOTCONN: dst was reset
            self.lost(way.other)
            return
        if self.up.eof and self.down.eof:
            self.close()

    def lost(self, out: _Way) -> None:
        """``out``'s source socket failed (an RST, or a write to it erred).

        Nothing more reaches it, so the way into it is cut. What it sent before is still
        in its socket, and a direct peer would read it: ``out`` delivers it, then
        ``settle`` resets the other side -- within ``DRAIN_GRACE`` whatever happens. A
        second failure resets at once.
        """
        if self.closed:
            return
        if self.why is None:
            self.why = closes.CLIENT_RESET if out is self.up else closes.UPSTREAM_RESET
        if self.dying is not None or self.loop is None:
            if self.dying is not out:  # the same failure seen twice is not a second one
                self.abort()
            return
        self.dying = out
        cut = out.other
        cut.release(reset=True)
        cut.eof = True
        out.watching = False
        # The failed socket is read without a watcher from now on.
        self._forget(out.src)
        self.grace = self.loop.call_later(DRAIN_GRACE, self.abort)
        self.rewatch()
        if not out.stalled:
            out.drain()

    def _forget(self, fd: int) -> None:
        """Stop watching ``fd``, whatever watches it now; errors are beside the point."""
        if self.parked:
            with contextlib.suppress(OSError, ValueError):
                self.hub.epoll.unregister(fd)
        elif self.loop is not None and not self.loop.is_closed():
            for remove in (self.loop.remove_reader, self.loop.remove_writer):
                with contextlib.suppress(RuntimeError, OSError, ValueError):
                    remove(fd)
        if fd == self.cfd:
            self.cmask = 0
        else:
            self.umask = 0

    def settle(self) -> None:
        """The failed side's last byte is handed to the kernel: reset the other side once
        its send queue is empty (an RST drops what is still queued); look again soon."""
        out = self.dying
        if self.closed or out is None or self.loop is None:
            return
        if out.pending == 0 and _unsent(out.dst) == 0:
            self.abort()
        else:
            self.loop.call_later(SETTLE_TICK, self.settle)

    def abort(self) -> None:
        """Tear down both sides at once; both peers get an RST."""
        self._shut(reset=True)

    def close(self) -> None:
        """Close both sides; bytes still in a pipe would be lost, so then reset instead.

        A FIN after a cut stream would look like a complete reply to the peer.
        """
        self._shut(reset=bool(self.up.pending or self.down.pending or self.dying))

    def _shut(self, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        self._unwatch()  # before closing: the numbers may go to other sockets at once
        for sock in (self.client_sock, self.upstream_sock):
            if sock is None:
                continue
            if reset:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
            sock.close()
        self.up.release(reset)
        self.down.release(reset)
        if self.started:
            self.hub.finished(self)
        self.on_close(self)

