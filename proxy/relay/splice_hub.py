"""Per event loop, the splice relays' hub: the pipe pool, parking, and uvloop's watchdog.

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
watchers for one epoll set of the hub's, and the first event wakes it (``SpliceHub``).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import select
import weakref
from collections.abc import Callable
from typing import Any

from .hubs import per_loop
from .pipes import IDLE_TRIM, PipePool, _close_pipe
from .splice_way import SpliceConnection, Way

log = logging.getLogger("cacheport.splice")

PARK_TICK = 0.25  # how often live relays are looked at: idle ones park, busy ones are probed
TRIM_PARKS = 64  # a tick that parks this many relays hands the freed heap back to the OS...
TRIM_EVERY = 0.5  # ...at most this often (seconds); one trailing trim covers the parks between

_POLL_DEAD = select.POLLERR | select.POLLNVAL


class SpliceHub:
    """Per event loop: the pipe pool, the live relays' watchdog, and the parked relays.

    ::

        live relay:    event loop --(a watcher per socket)--> Way.readable/.writable
        parked relay:  event loop --(hub's epoll fd)--> SpliceHub.dispatch --> wake, then the same

    A live relay's sockets have event-loop watchers: the shortest path from the
    kernel to the callback. A watcher costs ~560 bytes per socket under uvloop
    (poll handle, callback handle, context copy, two dict entries), so a relay that
    moved nothing for a whole tick is *parked*: its sockets move to one epoll set
    the loop watches as a single descriptor, at one dict entry each, and the
    first event wakes it back onto watchers (docs/hot-loop.md has the figures:
    an idle connection drops from ~2.7 KB to ~1.5-1.7 KB). The same tick is uvloop's
    watchdog: sockets of live relays that moved bytes are polled for a pending
    error (the module docstring says why); parked sockets need none, epoll reports
    EPOLLERR/EPOLLHUP itself.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, pipes: PipePool | None = None,
                 *, watchdog: bool | None = None) -> None:
        self._loop = weakref.ref(loop)  # hub_for keys loops weakly: never hold them
        self.pipes = pipes or PipePool()
        self.live: set[SpliceConnection] = set()  # started, not parked, not closed
        self.count = 0  # started and not closed: live + parked
        self.epoll = select.epoll()
        # Socket fd -> the direction that reads it, for every parked relay; the direction
        # that writes it is ``.other``.
        self.parked: dict[int, Way] = {}
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

    def started(self, relay: SpliceConnection) -> None:
        self.count += 1
        self.woken(relay)

    def woken(self, relay: SpliceConnection) -> None:
        """``relay`` is live (new, or woken from parking): the tick must look at it."""
        self.live.add(relay)
        if not self._ticking:
            self._ticking = self._later(PARK_TICK, self._tick)

    def finished(self, relay: SpliceConnection) -> None:
        """A started relay closed: forget it; trim the pipes once none is left."""
        self.live.discard(relay)
        self._unpark(relay)
        self.count -= 1
        if not self.count and self.pipes.free and not self._trimming:
            self._trimming = self._later(IDLE_TRIM, self._idle_trim)

    def _unpark(self, relay: SpliceConnection) -> None:
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

    def park(self, relay: SpliceConnection) -> None:
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

    def _probe(self, relays: list[SpliceConnection]) -> int:
        """One poll(2) with no events requested: the kernel still reports POLLERR,
        without consuming the error (getsockopt SO_ERROR would)."""
        poller = select.poll()
        owners: dict[int, SpliceConnection] = {}
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
hub_for = per_loop(SpliceHub)  # the loop's hub, made on first use


def _is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")


def _close_all(free: list[tuple[int, int]], epoll: select.epoll) -> None:
    epoll.close()
    while free:
        _close_pipe(free.pop())

