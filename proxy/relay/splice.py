"""The Python zero-copy relay: socket -> pipe -> socket with splice(2), on Linux.

::

    client --splice--> [pipe] --splice--> upstream      (direction "upstream")
    client <--splice-- [pipe] <--splice-- upstream      (direction "downstream")

Three modules, one job each:

- here, ``SpliceRelay``: one connection's state machine -- what each direction
  watches, half-close, a failed side's drain and reset, teardown;
- ``splice_way.Way``: one direction's hot path, the splice(2) calls (or the buffer
  copy of small reads) and integer counters;
- ``splice_hub.SpliceHub``: per event loop, the pipe pool, parking idle relays on one
  epoll set, and uvloop's watchdog (its docstring says why raw callbacks need one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from .. import closes
from ..config import ListenerConfig
from .buffered import _LINGER_RST, DRAIN_GRACE, SETTLE_TICK, BufferPool, _unsent
from .choose import RelayKind, relay_order
from .pipes import splice_supported
from .splice_hub import _IN, _OUT, SpliceHub, hub_for
from .splice_way import Way

log = logging.getLogger("cacheport.splice")

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
        self.up = Way(self, hub.pipes, bufpool, adaptive)  # client -> upstream
        self.down = Way(self, hub.pipes, bufpool, adaptive)  # upstream -> client
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
        self.dying: Way | None = None  # after a side failed: the way out of it (lost())
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

    def _watch(self, fd: int, old: int, new: int, reader: Way, writer: Way) -> None:
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

    def half_close(self, way: Way) -> None:
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

    def lost(self, out: Way) -> None:
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

