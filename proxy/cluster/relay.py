"""The relay variant for cluster listeners: every chunk goes through a rewriter.

::

    client --read--> [scratch] --copy--> rewriter.feed_request --write--> upstream
    client <--write-- rewriter.feed_reply <--copy-- [scratch] <--read-- upstream
                        |  -MOVED/-ASK, CLUSTER SLOTS/SHARDS/NODES, config get cluster:
                        +- node addresses -> announce:mapped-port; the rest unchanged

Plain ``tcp`` listeners keep ``proxy.relay``'s path, which never copies a chunk. Here
each chunk is copied once out of the shared scratch buffer (the rewriters keep
references to what they are given, and hold back incomplete frames), and usually the
same ``bytes`` object goes on to the transport. Backpressure is the plain relay's:
when the other transport cannot take a chunk at once, this side stops reading until
that transport has drained, so a direction holds at most one chunk plus the one
incomplete frame the rewriter is holding (only frames that may need rewriting are held:
errors, CLUSTER replies, auto-discovery blocks).

A peer that breaks the protocol (bytes the framer cannot parse) gets a clean close of
both sides and a counter, never a traceback.

``NativeFraming`` is the other way to serve a Redis Cluster node: the native engine
frames the connection in C (proxy/relay/resp_framer.c) and hands Python only the rare
frames that list nodes and the redirects its node map cannot answer. ``NativeMcFraming``
does the same for a Memcached cluster's listeners (proxy/relay/mc_framer.c): Python sees
only the auto-discovery replies.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

from .. import closes
from ..protocols.memcache import AutoDiscoveryNode, AutoDiscoveryRewriter, NodeMapper
from ..protocols.redis_cluster import ASK_REDIRECT, Remapper, rewrite_asked
from ..relay.buffered import BufferPool, Relay, Side

log = logging.getLogger("cacheport.cluster")

Feed = Callable[[bytes], "bytes | bytearray"]


class Rewriter(Protocol):
    """What ``ClusterRewriter`` and ``AutoDiscoveryRewriter`` have in common."""

    def feed_request(self, data: bytes) -> bytes | bytearray: ...

    def feed_reply(self, data: bytes) -> bytes | bytearray: ...


class RewritingSide(Side):
    """A ``Side`` that hands each chunk to ``feed`` and writes what comes back."""

    __slots__ = ("blocked", "feed")

    def __init__(self, relay: Relay, pool: BufferPool, feed: Feed) -> None:
        super().__init__(relay, pool)
        self.feed = feed
        self.blocked = False  # reading paused until the peer transport drains

    def buffer_updated(self, nbytes: int) -> None:
        self.nbytes += nbytes
        peer = self.peer.transport  # type: ignore[union-attr]
        if peer is None or not self.relay.started:
            self._keep_early(nbytes)
            return
        chunk = bytes(self.pool.scratch[:nbytes])
        try:
            out = self.feed(chunk)
        except ValueError as exc:  # ProtocolError, McProtocolError
            relay = self.relay
            assert isinstance(relay, RewritingRelay)
            relay.protocol_error(self, exc)
            return
        if out:
            peer.write(out)
            if peer.get_write_buffer_size():
                self.blocked = True
                self.transport.pause_reading()  # type: ignore[union-attr]

    def unhold(self) -> bool:
        """Rewritten output is written whole (no scratch buffer to hold): only the flag."""
        if not self.blocked:
            return False
        self.blocked = False
        return True

    def pass_on(self, nbytes: int) -> None:
        """The drain's chunk from this failed side: through the rewriter, to the peer."""
        self.nbytes += nbytes
        try:
            out = self.feed(bytes(self.pool.scratch[:nbytes]))
        except ValueError as exc:
            relay = self.relay
            assert isinstance(relay, RewritingRelay)
            relay.protocol_error(self, exc)
            return
        if out:
            self.peer.transport.write(out)  # type: ignore[union-attr]


class _UpstreamSide(RewritingSide):
    """Tells the relay which node address the connection reached (for ``:port`` redirects)."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        relay = self.relay
        assert isinstance(relay, RewritingRelay)
        if relay.on_upstream is not None:
            peer = transport.get_extra_info("peername")
            if peer:
                relay.on_upstream(str(peer[0]), int(peer[1]))


class RewritingRelay(Relay):
    """A relay whose two directions pass through one connection's rewriter."""

    __slots__ = ("on_protocol_error", "on_upstream", "rewriter")

    def __init__(self, pool: BufferPool, on_close: Callable[[Relay], None], source: str,
                 rewriter: Rewriter, *, feed_reply: Feed | None = None,
                 on_upstream: Callable[[str, int], None] | None = None,
                 on_protocol_error: Callable[[str], None] | None = None) -> None:
        super().__init__(pool, on_close, source)
        self.rewriter = rewriter
        self.on_upstream = on_upstream
        self.on_protocol_error = on_protocol_error
        self.client = RewritingSide(self, pool, rewriter.feed_request)
        self.upstream = _UpstreamSide(self, pool, feed_reply or rewriter.feed_reply)
        self.client.peer = self.upstream
        self.upstream.peer = self.client

    def start(self) -> None:
        """Pass what arrived during set-up through the rewriter, requests first."""
        for side in (self.client, self.upstream):
            if side.early is not None:
                assert isinstance(side, RewritingSide)
                try:
                    side.early = bytes(side.feed(side.early))
                except ValueError as exc:
                    self.started = True
                    self.protocol_error(side, exc)
                    return
        super().start()

    def protocol_error(self, side: Side, exc: ValueError) -> None:
        """A peer sent bytes the framer cannot parse: close both sides, count it."""
        who = "client" if side is self.client else "upstream"
        if self.why is None:
            self.why = closes.PROTOCOL_ERROR
        log.debug("closing a connection: the %s broke the protocol: %s", who, exc)
        if self.on_protocol_error is not None:
            self.on_protocol_error(who)
        self.abort()


class NativeFraming:
    """A Redis Cluster connection on the native engine: what its framer asks of Python.

    ::

        engine thread --asks()--> NativeHub._reap --answer()--> rewrite_asked(frame)
                                                  --redirects()/broken()--> counters

    ``nodemap`` is the cluster's ``_engine.NodeMap`` (the manager swaps its table after
    each refresh); the remapper is the one a ``ClusterRewriter`` would use, so a frame
    rewritten here comes out as the Python relay would write it. One serves every
    connection of a node's listener: they all reach the same node.
    """

    __slots__ = ("_nodemap", "on_protocol_error", "on_redirects", "remap", "tryagain")

    def __init__(self, nodemap: Any, remap: Remapper, *, tryagain: bool,
                 on_redirects: Callable[[int], None],
                 on_protocol_error: Callable[[str], None]) -> None:
        self._nodemap = nodemap
        self.remap = remap
        self.tryagain = tryagain
        self.on_redirects = on_redirects
        self.on_protocol_error = on_protocol_error

    @property
    def nodemap(self) -> Any:
        return self._nodemap

    def attached(self, upstream: socket.socket) -> None:
        """The address really reached: what an empty-host ``-MOVED 1 :6380`` refers to."""
        try:
            peer = upstream.getpeername()
        except OSError:
            return
        self.remap.upstream = (str(peer[0]), int(peer[1]))

    def answer(self, kind: int, frame: bytes, spec: bytes) -> bytes:
        new = rewrite_asked(frame, kind, spec, self.remap, self.tryagain)
        if kind == ASK_REDIRECT and new is not None:
            self.on_redirects(1)
        return frame if new is None else new

    def redirects(self, count: int) -> None:
        self.on_redirects(count)

    def broken(self) -> None:
        log.debug("closing a connection: the upstream broke the protocol")
        self.on_protocol_error("upstream")


class NativeMcFraming:
    """A Memcached cluster connection on the native engine (``Framing`` for
    proxy/relay/engine.py): the framer hands over whole ``CONFIG cluster`` / ``VALUE
    AmazonElastiCache:cluster`` units, rewritten here as ``AutoDiscoveryRewriter`` writes
    them. ``nodemap`` is an empty ``NodeMap(memcache=True)``: it tells the engine which
    framer to run. One serves every connection of a listener.
    """

    __slots__ = ("_nodemap", "mapper", "on_protocol_error", "on_unmapped")

    def __init__(self, nodemap: Any, mapper: NodeMapper, *,
                 on_unmapped: Callable[[AutoDiscoveryNode], None],
                 on_protocol_error: Callable[[str], None]) -> None:
        self._nodemap = nodemap
        self.mapper = mapper
        self.on_unmapped = on_unmapped
        self.on_protocol_error = on_protocol_error

    @property
    def nodemap(self) -> Any:
        return self._nodemap

    def attached(self, upstream: socket.socket) -> None:
        """Nothing to note: auto-discovery entries name their hosts."""

    def answer(self, kind: int, frame: bytes, spec: bytes) -> bytes:
        """The unit rewritten (raises McProtocolError, a ValueError, when it is not one)."""
        return bytes(AutoDiscoveryRewriter(self.mapper, self.on_unmapped).feed_reply(frame))

    def redirects(self, count: int) -> None:
        """Memcached has none."""

    def broken(self) -> None:
        log.debug("closing a connection: the upstream broke the protocol")
        self.on_protocol_error("upstream")

