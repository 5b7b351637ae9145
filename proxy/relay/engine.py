"""The native relay: plain TCP connections handed to a compiled epoll thread.

::

    listener --accept, dial--> NativeRelay.start --Engine.add(fds)--> engine thread (1..N)
                                                                       | relays, half-closes,
    listener <--on_close-- NativeHub._reap <--eventfd, Engine.reap()--+ resets, closes

Python still accepts, dials, checks health and keeps the books; a request on a
live connection never reaches it. The engine (proxy/relay/engine*.c) applies the
same copy rules as the splice relay (relay/pipes.py, relay/splice_way.py) -- small
reads through a buffer, bulk through pooled 1 MiB pipes under ``copy: auto`` -- with
no interpreter in the loop, which is what the per-request gap to HAProxy and nginx was made of
(docs/hot-loop.md has the figures). Where the extension was not built (no C
compiler at install time, not Linux) listeners use the Python relays.

TLS legs (``relay: native`` on a listener with ``tls`` or ``upstream_tls``) are relayed
by the same thread: it handshakes without blocking and runs OpenSSL's record layer on
the SSL_CTX of the listener's ``ssl.SSLContext`` (proxy/relay/tls_engine.c). That needs
the build linked with libssl (``_engine_tls``) and the very libssl CPython's ``_ssl``
uses; else TLS listeners stay on the Python relay.
"""

from __future__ import annotations

import _ssl
import asyncio
import logging
import os
import socket
import ssl
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from .. import closes
from ..config import DEFAULT_BUSY_POLL_US, ListenerConfig
from ..process import worker_count
from .buffered import _LINGER_RST, DRAIN_GRACE, Relay
from .choose import RelayKind, relay_order
from .hubs import per_loop

# The engine applies the splice relay's copy rules, with its measured constants.
from .pipes import BULK_READ, IDLE_TRIM, MAX_PIPES, PIPE_SIZE, REFUSED_RETRY, SMALL_READS
from .splice import SpliceRelay

log = logging.getLogger("cacheport.native")

try:
    from . import _engine  # type: ignore[attr-defined]
except ImportError:  # not built here: the Python relays serve
    _engine = None


def _tls_engine() -> Any:
    """The engine built with TLS, if it was and may share SSL_CTXs with ``ssl``: both
    resolve libssl to the same library, and a context's settings read back the same."""
    if _engine is None:
        return None
    try:
        from . import _engine_tls  # type: ignore[attr-defined]
    except ImportError:
        return None
    try:
        if not _engine_tls.same_libssl(_ssl.__file__):
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        strict = ssl.create_default_context()
        if _engine_tls.ctx_probe(ctx) != (0, 0x0304) or _engine_tls.ctx_probe(strict)[0] == 0:
            return None
    except (AttributeError, TypeError, ValueError, OSError):
        return None
    return _engine_tls


if (_with_tls := _tls_engine()) is not None:
    _engine = _with_tls

TlsSpec = tuple[ssl.SSLContext | None, ssl.SSLContext | None, str | None, str | None]
"""What the engine needs for a TLS connection: the context terminating the client's leg,
the one originating the upstream's, the name the node's certificate must carry (None:
unchecked) and the SNI name."""

_MODES = {"auto": 0, "splice": 1, "buffer": 2}
_unavailable_logged = False
_tls_unavailable_logged = False


def native_available() -> bool:
    """Whether the engine was built and loads here."""
    return _engine is not None


def native_tls_available() -> bool:
    """Whether the engine can relay TLS legs here (tls_engine.c)."""
    return _engine is not None and getattr(_engine, "TLS", 0) == 1


def tls_spec(server: ssl.SSLContext | None, client: ssl.SSLContext | None,
             name: str | None) -> TlsSpec | None:
    """The engine's view of a listener's TLS: None for a plain one. ``name``: what the
    upstream leg sends as SNI and, if its context checks host names, verifies."""
    if server is None and client is None:
        return None
    verify = name if client is not None and client.check_hostname else None
    return (server, client, verify, name if client is not None else None)


def new_node_map(memcache: bool = False) -> Any:
    """A node map for framed (cluster) connections (swap() it after each refresh), or None
    where the engine is not built. ``memcache``: a Memcached cluster's, which stays empty
    and makes the engine frame Memcached (proxy/relay/mc_framer.c)."""
    return None if _engine is None else _engine.NodeMap(memcache=memcache)


class Framing(Protocol):
    """What a framed connection (a cluster node's) needs from Python: the node map its
    redirects are rewritten from, and answers to what the framer hands over
    (proxy/cluster/relay.py NativeFraming, NativeMcFraming)."""

    @property
    def nodemap(self) -> Any: ...

    def attached(self, upstream: socket.socket) -> None: ...

    def answer(self, kind: int, frame: bytes, spec: bytes) -> bytes: ...

    def redirects(self, count: int) -> None: ...

    def broken(self) -> None: ...


_TELL_REDIRECTS = 0
_TELL_BROKEN = 4


def choose_native(loop: asyncio.AbstractEventLoop, config: ListenerConfig,
                  order: tuple[RelayKind, ...] | None = None) -> NativeHub | None:
    """The loop's native hub when this listener's connections go to the engine; else None."""
    global _unavailable_logged, _tls_unavailable_logged
    if RelayKind.ENGINE not in (relay_order(config) if order is None else order):
        return None
    if _engine is not None and not config.may_splice and not native_tls_available():
        if config.relay == "native" and not _tls_unavailable_logged:
            _tls_unavailable_logged = True
            log.warning("listener %s: relay: native with TLS needs the engine built with "
                        "libssl (libssl-dev at install time) and the libssl Python's ssl "
                        "uses; using the Python relay (logged once)", config.name)
        return None
    if _engine is None:
        if config.relay == "native" and not _unavailable_logged:
            _unavailable_logged = True
            log.warning("listener %s: relay: native is not built on this machine (no C "
                        "compiler at install time, or not Linux); using the Python relays "
                        "(logged once)", config.name)
        return None
    hub = hub_for(loop)
    if not hub.lanes:
        # The first engine starts at the first accept, before the dial: at the descriptor
        # limit a dial takes the last ones, and the engine would have none left to start.
        try:
            hub.pick()
        except (OSError, MemoryError) as exc:
            log.debug("native: no engine to be had yet (%s); this connection is Python's", exc)
            return None
    return hub


class _Lane:
    """One engine (one thread) and the live relays it holds, by engine slot."""

    __slots__ = ("engine", "relays")

    def __init__(self, max_pipes: int, busy_poll_us: float) -> None:
        assert _engine is not None
        self.engine: Any = _engine.Engine(pipe_size=PIPE_SIZE, max_pipes=max_pipes,
                                          small_reads=SMALL_READS, refused_retry=REFUSED_RETRY,
                                          busy_poll_us=busy_poll_us, drain_grace=DRAIN_GRACE)
        self.relays: dict[int, NativeRelay] = {}


class NativeHub:
    """Per event loop: up to ``threads`` engines, each its own thread and epoll set.

    A connection stays on the engine it was handed to; a new one goes to the engine
    holding the fewest, so load spreads the way HAProxy's threads share it. Engines are
    made as connections need them: a proxy with one connection runs one thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int = 1) -> None:
        assert _engine is not None
        self._loop = weakref.ref(loop)  # hub_for keys loops weakly: never hold them
        self.threads = threads  # how many engines new connections may use (reload: any)
        self._busy_poll_us = DEFAULT_BUSY_POLL_US
        self.lanes: list[_Lane] = []
        self._trimming = False

    @property
    def busy_poll_us(self) -> float:
        return self._busy_poll_us

    @busy_poll_us.setter
    def busy_poll_us(self, us: float) -> None:
        """Live engines take a new value at their next batch (a reload)."""
        self._busy_poll_us = us
        for lane in self.lanes:
            if not lane.engine.closed:
                lane.engine.busy_poll_us = us

    @property
    def engines(self) -> list[Any]:
        return [lane.engine for lane in self.lanes]

    def stats(self) -> dict[str, int]:
        """The engines' counters summed (``pipe_errno``: the last one any engine saw)."""
        total: dict[str, int] = {}
        for lane in self.lanes:
            for key, value in lane.engine.stats().items():
                if key in ("pipe_errno", "pipe_size"):
                    total[key] = value or total.get(key, 0)
                else:
                    total[key] = total.get(key, 0) + value
        total["engines"] = len(self.lanes)
        return total

    def pick(self) -> _Lane:
        """The engine a new connection goes to, started if there is room for one more."""
        usable = self.lanes[:self.threads]
        least = min(usable, key=lambda lane: len(lane.relays), default=None)
        if least is not None and (not least.relays or len(usable) >= self.threads):
            return least
        # Every usable engine is busy and there is room for one more: start it. The
        # pipe budget (MAX_PIPES per loop) is shared out so the kernel's total is kept.
        try:
            lane = _Lane(-(-MAX_PIPES // max(self.threads, 1)), self._busy_poll_us)
        except (OSError, MemoryError):  # out of descriptors (EMFILE) or memory: make do
            if least is not None:
                return least
            raise
        loop = self._loop()
        if loop is not None and not loop.is_closed():
            weakref.finalize(loop, lane.engine.stop)
            loop.add_reader(lane.engine.notify_fd, self._reap, lane)
        self.lanes.append(lane)
        return lane

    def add(self, relay: NativeRelay, cfd: int, ufd: int, mode: int,
            bufsize: int, nodemap: Any = None, tls: TlsSpec | None = None) -> tuple[_Lane, int]:
        """Hand both descriptors to an engine (it owns them even when this raises)."""
        lane = self.pick()
        slot: int = lane.engine.add(cfd, ufd, mode, bufsize, BULK_READ, nodemap, tls)
        lane.relays[slot] = relay
        return lane, slot

    def take(self, lane: _Lane, slot: int, reset: bool) -> tuple[int, int]:
        """End a live connection now; its final byte counts ((0, 0) if the engine has
        stopped already, which reset it)."""
        lane.relays.pop(slot, None)
        try:
            up, down, _ = lane.engine.close(slot, reset)
        except (KeyError, RuntimeError):
            up = down = 0
        self._idle()
        return up, down

    def _reap(self, lane: _Lane) -> None:
        """The engine ended connections (EOF both ways, a reset, an error), or a framed
        connection needs Python (a frame to rewrite, redirects to count)."""
        for slot, kind, frame, spec in lane.engine.asks():
            self._ask(lane, slot, kind, frame, spec)
        ended: list[tuple[NativeRelay, int, int, int]] = []
        gone: dict[int, NativeRelay] = {}
        for slot, up, down, _reset, first in lane.engine.reap():
            relay = lane.relays.pop(slot, None)
            if relay is not None:
                ended.append((relay, up, down, first))
                gone[slot] = relay
        # Taken after reap(): a failure is noted with its connection's end, so one seen
        # here belongs to a relay just reaped or still live, never to a reused slot.
        for slot, side, reason, not_after in lane.engine.tls_events():
            told = gone.get(slot) or lane.relays.get(slot)
            if told is None:
                continue
            if reason is not None:
                told.tls_failed(side, reason)
            elif told.on_tls_peer is not None:
                told.on_tls_peer(side, not_after)
        for relay, up, down, first in ended:
            relay.ended(up, down, first)
        self._idle()

    def _ask(self, lane: _Lane, slot: int, kind: int, frame: Any, spec: Any) -> None:
        relay = lane.relays.get(slot)
        framing = relay.framing if relay is not None else None
        if kind == _TELL_REDIRECTS:
            if framing is not None:
                framing.redirects(frame)
        elif kind == _TELL_BROKEN:
            if relay is not None:
                relay.why = closes.PROTOCOL_ERROR
            if framing is not None:
                framing.broken()
        else:
            try:
                data = frame if framing is None else framing.answer(kind, frame, spec)
            except ValueError as exc:  # a frame Python cannot parse: the node broke RESP
                log.debug("closing a connection: the upstream broke the protocol: %s", exc)
                if framing is not None:
                    framing.broken()
                if relay is not None:
                    relay.why = closes.PROTOCOL_ERROR
                    relay.abort()
                return
            lane.engine.answer(slot, data)

    def _idle(self) -> None:
        if not self._trimming and any(not lane.relays for lane in self.lanes):
            loop = self._loop()
            if loop is not None and not loop.is_closed():
                self._trimming = True
                loop.call_later(IDLE_TRIM, self._idle_trim)

    def _idle_trim(self) -> None:
        """Idle engines give their pooled pipes back; ones a reload left unused stop."""
        self._trimming = False
        loop = self._loop()
        for i, lane in reversed(list(enumerate(self.lanes))):
            if lane.relays or lane.engine.closed:
                continue
            if i >= self.threads:
                if loop is not None and not loop.is_closed():
                    loop.remove_reader(lane.engine.notify_fd)
                lane.engine.stop()
                del self.lanes[i]
            else:
                lane.engine.trim_pipes()


hub_for = per_loop(NativeHub)  # the loop's hub, made on first use


def engine_threads(configured: int | None) -> int:
    """``engine_threads: auto`` is the usable CPUs shared out among the worker processes,
    like HAProxy's default nbthread: one engine thread per CPU in one process."""
    if configured is not None:
        return configured
    try:
        cpus = len(os.sched_getaffinity(0))  # a container's cpuset, not the host's
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(cpus // worker_count(), 1)


def configure_engines(loop: asyncio.AbstractEventLoop, threads: int | None,
                      busy_poll_us: float) -> None:
    """How many engine threads this loop's new connections may spread over, and how long
    each polls before it sleeps (start, reload)."""
    if _engine is not None:
        hub = hub_for(loop)
        hub.threads = engine_threads(threads)
        hub.busy_poll_us = busy_poll_us


class NativeRelay:
    """A client connection relayed by the engine; same face as ``splice.SpliceRelay``.

    Until ``start`` the two sockets are Python's; from then on the engine owns the
    descriptors and this object keeps the slot and, once ended, the final counts.
    """

    __slots__ = ("__weakref__", "bufsize", "client_sock", "closed", "final", "framing",
                 "handshake_timeout", "hub", "lane", "mode", "on_close", "on_tls_failure",
                 "on_tls_peer", "slot", "source", "tls", "upstream_sock", "why")

    def __init__(self, hub: NativeHub, bufsize: int, on_close: Callable[[NativeRelay], None],
                 source: str = "", copy: str = "auto", framing: Framing | None = None, *,
                 tls: TlsSpec | None = None,
                 on_tls_failure: Callable[[int, str], None] | None = None,
                 on_tls_peer: Callable[[int, float], None] | None = None,
                 handshake_timeout: float = 10.0) -> None:
        self.hub = hub
        self.framing = framing  # a Redis Cluster connection: the engine frames it
        self.tls = tls  # TLS on a leg or both: the engine handshakes, then relays
        self.on_tls_failure = on_tls_failure  # (side 0 client / 1 upstream, reason)
        # (side, notAfter): the certificate a leg's peer showed (the expiry gauge)
        self.on_tls_peer = on_tls_peer
        self.handshake_timeout = handshake_timeout
        self.bufsize = bufsize
        self.on_close = on_close
        self.source = source
        self.mode = _MODES[copy]
        self.client_sock: socket.socket | None = None
        self.upstream_sock: socket.socket | None = None
        self.lane: _Lane | None = None
        self.slot = -1
        self.closed = False
        self.final = (0, 0)
        self.why: str | None = None  # why it ended (proxy/closes.py), once known

    def attach(self, loop: asyncio.AbstractEventLoop, client: socket.socket,
               upstream: socket.socket) -> None:
        """Take both connected, non-blocking sockets (the loop is the hub's)."""
        self.client_sock, self.upstream_sock = client, upstream
        if self.framing is not None:
            self.framing.attached(upstream)

    def start(self) -> None:
        """Hand the sockets to the engine; whatever arrived meanwhile waits in the kernel."""
        client, upstream = self.client_sock, self.upstream_sock
        assert client is not None and upstream is not None, "attach() first"
        self.client_sock = self.upstream_sock = None
        cfd, ufd = client.detach(), upstream.detach()
        try:
            self.lane, self.slot = self.hub.add(
                self, cfd, ufd, self.mode, self.bufsize,
                self.framing.nodemap if self.framing is not None else None, self.tls)
        except (OSError, RuntimeError, ValueError, MemoryError, TypeError) as exc:
            log.debug("native: the engine refused a connection: %s", exc)
            self._closed()
            return
        if self.tls is not None:
            loop = self.hub._loop()
            if loop is not None and not loop.is_closed():
                loop.call_later(self.handshake_timeout, self._handshake_deadline)

    def _handshake_deadline(self) -> None:
        """A handshake gets connect_timeout, as on the Python relay; then the connection
        is reset and counted as a failed handshake."""
        if self.closed or self.lane is None:
            return
        try:
            busy = self.lane.engine.handshaking(self.slot)
        except (KeyError, RuntimeError):
            return
        if busy:
            self.tls_failed(0 if self.tls is not None and self.tls[0] is not None else 1,
                            "handshake timed out")
            self.abort()

    def tls_failed(self, side: int, reason: str) -> None:
        """A TLS leg's handshake failed (the engine ends the connection)."""
        self.why = closes.TLS_HANDSHAKE_FAILED if side == 0 else closes.UPSTREAM_TLS_FAILED
        if self.on_tls_failure is not None:
            self.on_tls_failure(side, reason)

    @property
    def started(self) -> bool:
        return self.lane is not None

    def _counts(self) -> tuple[int, int, int]:
        if self.closed or self.lane is None:
            return self.final[0], self.final[1], 0
        try:
            counts: tuple[int, int, int] = self.lane.engine.counts(self.slot)
        except KeyError:  # the engine stopped under us (interpreter exit)
            return self.final[0], self.final[1], 0
        return counts

    @property
    def bytes_upstream(self) -> int:
        """Client -> upstream bytes so far."""
        return self._counts()[0]

    @property
    def bytes_downstream(self) -> int:
        """Upstream -> client bytes so far."""
        return self._counts()[1]

    @property
    def bytes_total(self) -> int:
        up, down, _ = self._counts()
        return up + down

    @property
    def pending_downstream(self) -> int:
        """Bytes read from the upstream not yet handed to the client's socket."""
        return self._counts()[2]

    def detail(self) -> dict[str, int]:
        """The engine's view of this connection (tests: pipe leases, descriptors)."""
        if self.closed or self.lane is None:
            raise KeyError("not live")
        detail: dict[str, int] = self.lane.engine.detail(self.slot)
        return detail

    def abort(self) -> None:
        """Tear down both sides at once; both peers get an RST."""
        self._end(reset=True)

    def close(self) -> None:
        """Close both sides (the engine resets instead when bytes are still in flight)."""
        self._end(reset=False)

    def _end(self, reset: bool) -> None:
        if self.closed:
            return
        if self.lane is not None:
            self.final = self.hub.take(self.lane, self.slot, reset)
        else:  # not started: the sockets are still Python's
            for sock in (self.client_sock, self.upstream_sock):
                if sock is not None:
                    if reset:
                        try:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                        except OSError:
                            pass
                    sock.close()
        self._closed()

    def ended(self, up: int, down: int, first: int = 0) -> None:
        """The engine ended this connection (called by the hub); ``first`` says who
        ended first (engine_loop.c)."""
        if not self.closed:
            self.final = (up, down)
            if self.why is None:
                self.why = closes.from_engine(first)
            self._closed()

    def _closed(self) -> None:
        self.closed = True
        self.on_close(self)


AnyRelay = Relay | SpliceRelay | NativeRelay  # what a listener tracks: any path, one face
