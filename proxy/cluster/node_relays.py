"""The relay factories a cluster's node listeners are given: one per engine.

::

    listener --accept--> RedisRelays / McRelays --called--> RewritingRelay (buffered, rewrites)
                                                --.native--> NativeRelay (the engine frames)

A factory holds the manager's callbacks (map lookups, refresh requests, counters), not
the manager: what a connection may reach of the cluster is exactly what is passed here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..protocols.memcache import AutoDiscoveryNode, AutoDiscoveryRewriter, NodeMapper
from ..protocols.redis_cluster import ClusterRewriter, IdMapper, Mapper
from ..relay.buffered import BufferPool, Relay
from ..relay.engine import NativeHub, NativeRelay
from .relay import Feed, NativeFraming, NativeMcFraming, RewritingRelay


class _NodeRelays:
    """Called, a buffered rewriting relay; ``native``, the maker of a connection the
    engine frames, None where the engine is not built (no node map)."""

    __slots__ = ()
    nodemap: Any

    @property
    def native(self) -> Callable[..., NativeRelay] | None:
        return self._native if self.nodemap is not None else None

    def _native(self, hub: NativeHub, bufsize: int, on_close: Callable[[NativeRelay], None],
                source: str) -> NativeRelay:
        raise NotImplementedError


class RedisRelays(_NodeRelays):
    """A Redis Cluster node listener's relays: called, the buffered rewriting relay;
    ``native``, a connection the engine frames (``relay: native``; relay/choose.py)."""

    __slots__ = ("_framing", "by_id", "map_redis", "nodemap", "on_protocol_error",
                 "on_redirects", "on_unmapped", "upstream")

    def __init__(self, upstream: tuple[str, int], *, map_redis: Mapper, by_id: IdMapper,
                 nodemap: Any, on_unmapped: Callable[[str, int], None],
                 on_redirects: Callable[[int], None],
                 on_protocol_error: Callable[[str], None]) -> None:
        self.upstream = upstream
        self.map_redis = map_redis
        self.by_id = by_id
        self.nodemap = nodemap  # the manager's NodeMap; None: the engine is not built
        self.on_unmapped = on_unmapped
        self.on_redirects = on_redirects  # MOVED/ASK replies rewritten: count, refresh
        self.on_protocol_error = on_protocol_error
        self._framing: NativeFraming | None = None

    def _rewriter(self) -> ClusterRewriter:
        return ClusterRewriter(self.map_redis, self.upstream, on_unmapped=self.on_unmapped,
                               unmapped_redirect="tryagain", by_id=self.by_id)

    def __call__(self, pool: BufferPool, on_close: Callable[[Relay], None],
                 source: str) -> Relay:
        rw = self._rewriter()
        return RewritingRelay(pool, on_close, source, rw,
                              feed_reply=_watch_redirects(rw, self.on_redirects),
                              on_upstream=_upstream_setter(rw),
                              on_protocol_error=self.on_protocol_error)

    def _native(self, hub: NativeHub, bufsize: int, on_close: Callable[[NativeRelay], None],
                source: str) -> NativeRelay:
        # One NativeFraming serves the listener's connections: the per-connection state
        # is the engine's, so an idle framed connection costs Python no more than a plain.
        framing = self._framing
        if framing is None:
            framing = self._framing = NativeFraming(
                self.nodemap, self._rewriter().remap, tryagain=True,
                on_redirects=self.on_redirects, on_protocol_error=self.on_protocol_error)
        return NativeRelay(hub, bufsize, on_close, source, "buffer", framing)


def _watch_redirects(rw: ClusterRewriter, on_redirects: Callable[[int], None]) -> Feed:
    """feed_reply, plus ``on_redirects`` when a MOVED/ASK went by (slots moved)."""
    feed = rw.feed_reply

    def feed_reply(data: bytes) -> bytes | bytearray:
        before = rw.redirects_rewritten
        out = feed(data)
        if rw.redirects_rewritten != before:
            on_redirects(rw.redirects_rewritten - before)
        return out

    return feed_reply


def _upstream_setter(rw: ClusterRewriter) -> Callable[[str, int], None]:
    """The address really reached: what an empty-host ``-MOVED 1 :6380`` refers to."""
    def set_upstream(host: str, port: int) -> None:
        rw.remap.upstream = (host, port)
    return set_upstream


class McRelays(_NodeRelays):
    """A Memcached cluster node listener's relays: called, the buffered rewriting relay;
    ``native``, a connection the engine frames (proxy/relay/mc_framer.c), Python seeing
    only the auto-discovery replies."""

    __slots__ = ("_framing", "mapper", "nodemap", "on_protocol_error", "on_unmapped")

    def __init__(self, mapper: NodeMapper, nodemap: Any,
                 on_unmapped: Callable[[AutoDiscoveryNode], None],
                 on_protocol_error: Callable[[str], None]) -> None:
        self.mapper = mapper
        self.nodemap = nodemap  # NodeMap(memcache=True); None: the engine is not built
        self.on_unmapped = on_unmapped
        self.on_protocol_error = on_protocol_error
        self._framing: NativeMcFraming | None = None

    def __call__(self, pool: BufferPool, on_close: Callable[[Relay], None],
                 source: str) -> Relay:
        rw = AutoDiscoveryRewriter(self.mapper, on_unmapped=self.on_unmapped)
        return RewritingRelay(pool, on_close, source, rw,
                              on_protocol_error=self.on_protocol_error)

    def _native(self, hub: NativeHub, bufsize: int, on_close: Callable[[NativeRelay], None],
                source: str) -> NativeRelay:
        if self._framing is None:  # one serves the listener: per-connection state is C's
            self._framing = NativeMcFraming(self.nodemap, self.mapper,
                                            on_unmapped=self.on_unmapped,
                                            on_protocol_error=self.on_protocol_error)
        return NativeRelay(hub, bufsize, on_close, source, "buffer", self._framing)
