"""The hot path: a two-way byte pump between a client and its upstream.

::

    client --read--> [scratch] --write--> upstream       (direction "upstream")
    client <--write-- [scratch] <--read-- upstream       (direction "downstream")

Each socket is an event-loop transport whose protocol is one ``Side``. A chunk
is read straight into a scratch buffer shared by the whole event loop
(``BufferedProtocol``) and written to the other side's transport at once,
which sends it without copying when the socket can take it. Only when the
other side cannot take it all does the transport keep a view of the scratch
buffer: the buffer is then handed over for good (a fresh one takes its place
in the pool) and this side stops reading until the other transport has
drained. So a direction holds at most one ``buffer_size`` chunk, an idle
connection holds none, and no chunk is ever copied in Python.

Transports rather than raw readiness callbacks: when the kernel reports
EPOLLERR (an RST) on a socket, uvloop runs a readiness watcher's callbacks
once more and then closes it for good -- and that last call may read bytes
queued before the reset rather than the error, so a plain reader never learns
of it. Its transports turn every error into ``connection_lost``. (The splice
path in proxy/relay/splice_way.py watches raw sockets anyway, with a watchdog for this.)

TLS runs in the relay (relay/tls_layer.py: an ``ssl.SSLObject`` over a plain
transport), so a TLS side is a ``Side`` on a ``TlsTransport`` like any other.

Half-close: EOF from one side becomes ``write_eof()`` (shutdown after the last
pending byte; over TLS close_notify first) on the other; the relay closes once both
directions are done.

A reset or error on one side (``connection_lost`` with an exception) cuts the way
into it; what it sent before is still in its socket (and, over TLS, in its TLS
layer), and ``Relay.lost`` reads it -- through a duplicate descriptor, since the loop
closes the transport's own right after ``connection_lost``, decrypting on a TLS side
-- and delivers it, then resets the other side once its send queue is empty, within
``DRAIN_GRACE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import termios
from collections.abc import Callable
from typing import Protocol, cast

from .. import closes
from .tls_layer import TlsTransport

_LINGER_RST = struct.pack("ii", 1, 0)
# After one side fails, how long the bytes it sent before may take to reach the other
# side before that side is reset anyway: a peer that stops reading must not keep a dead
# connection (docs/hot-loop.md, "When a side fails").
DRAIN_GRACE = 2.0
SETTLE_TICK = 0.01  # how often a drained connection looks whether its send queue is empty


def _unsent(fd: int) -> int:
    """Bytes in a socket's send queue not yet acknowledged (SIOCOUTQ); 0 if unknown."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return 0


class DrainSource(Protocol):
    """What a failed side still holds, read after its transport is gone."""

    def drain_into(self, buf: memoryview) -> int:
        """The next bytes into ``buf``; 0 at the end."""

    def end_drain(self) -> None: ...


class _SocketDrain:
    """A plain socket's final receive queue, through a duplicate descriptor (the loop
    closes the transport's own right after ``connection_lost``)."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def drain_into(self, buf: memoryview) -> int:
        try:
            return self.sock.recv_into(buf)
        except OSError:  # the reset itself, after the last byte
            return 0

    def end_drain(self) -> None:
        self.sock.close()


def _drain_source(transport: asyncio.Transport | None) -> DrainSource | None:
    """How to read what a failed side sent before it failed: its TLS layer (records
    received but not yet decrypted, then its socket's), or its socket."""
    if isinstance(transport, TlsTransport):
        return transport.layer.claim_drain()
    raw = transport.get_extra_info("socket") if transport is not None else None
    if raw is None:
        return None
    try:
        sock = socket.socket(fileno=os.dup(raw.fileno()))
    except (OSError, ValueError):
        return None
    sock.setblocking(False)
    return _SocketDrain(sock)


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


class Side(asyncio.BufferedProtocol):
    """One socket of a relay; what it reads is written to the other side's transport."""

    __slots__ = ("early", "eof", "held", "nbytes", "peer", "pool", "relay", "transport")

    def __init__(self, relay: Relay, pool: BufferPool) -> None:
        self.relay = relay
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.nbytes = 0  # bytes read from this socket (and so written, or pending, to the peer)
        self.held: memoryview | None = None  # a scratch buffer the peer transport still sends
        self.early: bytes | None = None  # read before the peer's transport existed
        self.eof = False

    # -- protocol callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop starts reading right after this returns, whatever we ask here, so a
        # chunk can arrive before the other side exists: buffer_updated keeps it aside.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=0, low=0)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.pool.scratch

    def buffer_updated(self, nbytes: int) -> None:
        self.nbytes += nbytes
        peer = self.peer.transport  # type: ignore[union-attr]
        if peer is None or not self.relay.started:
            self._keep_early(nbytes)
            return
        peer.write(self.pool.scratch[:nbytes])
        if peer.get_write_buffer_size():
            # The peer kept (a view of) the chunk: let it have the buffer; stop reading.
            self.held = self.pool.take_scratch()
            self.transport.pause_reading()  # type: ignore[union-attr]

    def _keep_early(self, nbytes: int) -> None:
        """Set-up only: copy a chunk that has nowhere to go yet, and wait for ``start``."""
        chunk = bytes(self.pool.scratch[:nbytes])
        self.early = chunk if self.early is None else self.early + chunk
        self.transport.pause_reading()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        """Our transport has unsent bytes; the peer side has already paused itself."""

    def resume_writing(self) -> None:
        """Our transport drained: the peer side may read again."""
        peer = self.peer
        relay = self.relay
        if peer is not None and peer.unhold():
            if not peer.eof and not relay.closed and relay.dying is None:
                peer.transport.resume_reading()  # type: ignore[union-attr]
        if relay.dying is not None and relay.dying is peer:
            relay.drain()

    def unhold(self) -> bool:
        """The peer's transport drained: release what this side held back while it sent
        (here, a scratch buffer). True if this side had paused its reading for it."""
        if self.held is None:
            return False
        self.pool.give_back(self.held)
        self.held = None
        return True

    def pass_on(self, nbytes: int) -> None:
        """A chunk the drain read from this (failed) side's socket into the scratch
        buffer: to the peer, as ``buffer_updated`` would, with no reading to pause."""
        self.nbytes += nbytes
        peer = self.peer.transport  # type: ignore[union-attr]
        peer.write(self.pool.scratch[:nbytes])  # type: ignore[union-attr]
        if peer.get_write_buffer_size():  # type: ignore[union-attr]
            self.held = self.pool.take_scratch()

    def eof_received(self) -> bool:
        self.eof = True
        self._closed_first()
        # Keep the transport open: the other direction may still be sending.
        if self.relay.started:
            self.relay.half_close(self)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        relay = self.relay
        if exc is not None:
            relay.lost(self)
        else:
            self._closed_first()  # a TLS peer's FIN without close_notify comes this way
            relay.close()

    def _closed_first(self) -> None:
        """This side's peer closed: the relay's reason, unless another came first."""
        relay = self.relay
        if relay.why is None:
            relay.why = closes.CLIENT_CLOSED if self is relay.client else closes.UPSTREAM_CLOSED


class Relay:
    """A client connection spliced to its upstream connection; owns both transports."""

    __slots__ = ("client", "closed", "drain_src", "dying", "grace", "half_closed", "on_close",
                 "settling", "source", "started", "upstream", "why")

    def __init__(
        self, pool: BufferPool, on_close: Callable[[Relay], None], source: str = ""
    ) -> None:
        self.source = source  # the client's IP, for per-client limits
        self.client = Side(self, pool)
        self.upstream = Side(self, pool)
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        self.on_close = on_close
        self.half_closed = 0
        self.closed = False
        self.started = False
        self.dying: Side | None = None  # the side that failed (lost())
        self.drain_src: DrainSource | None = None  # what is left of it, to drain
        self.grace: asyncio.TimerHandle | None = None
        self.settling = False
        self.why: str | None = None  # why it ended (proxy/closes.py): the first to know says

    @property
    def bytes_upstream(self) -> int:
        """Client -> upstream bytes so far."""
        return self.client.nbytes

    @property
    def bytes_downstream(self) -> int:
        """Upstream -> client bytes so far."""
        return self.upstream.nbytes

    @property
    def bytes_total(self) -> int:
        return self.client.nbytes + self.upstream.nbytes

    @property
    def pending_downstream(self) -> int:
        """Bytes read from the upstream not yet handed to the client's socket."""
        t = self.client.transport
        return t.get_write_buffer_size() if t is not None and not t.is_closing() else 0

    def start(self) -> None:
        """Both transports exist: pass on what arrived during set-up and start relaying."""
        self.started = True
        for side in (self.client, self.upstream):
            peer = side.peer.transport  # type: ignore[union-attr]
            if side.early is not None:
                peer.write(side.early)  # type: ignore[union-attr]
                side.early = None
            if side.eof:
                self.half_close(side)
            elif not self.closed:
                side.transport.resume_reading()  # type: ignore[union-attr]
            if self.closed:
                return

    def half_close(self, side: Side) -> None:
        """``side`` read EOF: shut the peer's write side once its pending bytes are sent."""
        if self.dying is not None:
            return  # the relay ends with the drain
        peer = side.peer.transport  # type: ignore[union-attr]
        if peer is None or peer.is_closing():
            self.close()
            return
        peer.write_eof()
        self.half_closed += 1
        if self.half_closed == 2:
            self.close()

    def lost(self, dead: Side) -> None:
        """``dead``'s connection failed (a reset, a write that erred).

        Nothing more reaches it, so the way into it is cut. Its socket's receive queue is
        final and a direct peer would read it: read it through a duplicate descriptor and
        deliver it (``drain``), then reset the other side (``settle``) -- within
        ``DRAIN_GRACE`` whatever happens. A second failure resets at once.
        """
        if self.closed:
            return
        if self.why is None:
            self.why = closes.CLIENT_RESET if dead is self.client else closes.UPSTREAM_RESET
        survivor = dead.peer
        st = survivor.transport if survivor is not None else None
        if (self.dying is not None or not self.started or survivor is None or st is None
                or st.is_closing()):
            self.abort()
            return
        self.dying = dead
        survivor.held = None  # went down with the failed transport's buffer
        try:
            st.pause_reading()  # what the survivor sends has nowhere to go
            self.grace = asyncio.get_running_loop().call_later(DRAIN_GRACE, self.abort)
        except RuntimeError:
            self.abort()
            return
        self.drain_src = _drain_source(dead.transport)
        self.drain()

    def drain(self) -> None:
        """Move what is left in the failed side's socket to the survivor, a chunk at a
        time while the survivor's transport takes it (its ``resume_writing`` calls again)."""
        dead = self.dying
        if self.closed or dead is None:
            return
        st = dead.peer.transport  # type: ignore[union-attr]
        src = self.drain_src
        while src is not None and not self.closed:
            if st.get_write_buffer_size():  # type: ignore[union-attr]
                return
            n = src.drain_into(dead.pool.scratch)
            if n == 0:
                src.end_drain()
                src = self.drain_src = None
                break
            dead.pass_on(n)
        if not self.settling and not self.closed:
            self.settling = True
            self.settle()

    def settle(self) -> None:
        """Reset the survivor once its transport and its kernel sent everything (an RST
        drops what is still queued); look again every ``SETTLE_TICK`` till the grace."""
        dead = self.dying
        if self.closed or dead is None:
            return
        st = dead.peer.transport  # type: ignore[union-attr]
        raw = st.get_extra_info("socket")  # type: ignore[union-attr]
        if (self.drain_src is None and not st.get_write_buffer_size()  # type: ignore[union-attr]
                and (raw is None or _unsent(raw.fileno()) == 0)):
            self.abort()
            return
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_later(SETTLE_TICK, self.settle)

    def abort(self) -> None:
        """Tear down both sides at once; both peers get an RST.

        Also after the relay has closed: a transport made while the relay was being set
        up (the other side had already gone) is still open, and this ends it.
        """
        finished = self.closed
        self.closed = True
        self._end_drain()
        for side in (self.client, self.upstream):
            t = side.transport
            if t is None or t.is_closing():
                continue
            sock = t.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
            t.abort()
        if not finished:
            self._finish()

    def close(self) -> None:
        """Close both sides after their pending bytes are sent (reset a dying relay:
        a FIN after a cut stream would look like a complete reply)."""
        if self.dying is not None:
            self.abort()
            return
        if self.closed:
            return
        self.closed = True
        self._end_drain()
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.close()
        self._finish()

    def _end_drain(self) -> None:
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        if self.drain_src is not None:
            self.drain_src.end_drain()
            self.drain_src = None

    def _finish(self) -> None:
        for side in (self.client, self.upstream):
            if side.held is not None:
                side.held = None  # the transport may still send it; do not reuse
        self.on_close(self)
