"""One bound port: accept a client, dial its upstream, hand both to a Relay.

::

    client --accept--> Listener --connect (connect_timeout)--> upstream
                           |
                           +--> Relay(client, upstream)   tracked until it closes

The listener owns its listening socket, the connections it started and the
counters that later become metrics. It reads ``self.config`` for every new
connection, so a reload can retarget it without touching live relays.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import resource
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import closes, preread
from .config import Address, ListenerConfig
from .health.state import State, choose_upstream
from .logs import CONNECTIONS
from .metrics import UpstreamBook
from .protocols import proxy_header, tls_hello
from .relay import tls_layer
from .relay.buffered import BufferPool, Relay
from .relay.choose import RelayKind, relay_order, serving_relay
from .relay.engine import (
    AnyRelay,
    NativeRelay,
    choose_native,
    native_available,
    native_tls_available,
    tls_spec,
)
from .relay.pipes import splice_supported
from .relay.splice import SpliceRelay, choose_hub
from .resolver import ResolveError, Resolver
from .tls import LEG_CLIENT, LEG_UPSTREAM, ListenerTls, record_certificate_expiry

log = logging.getLogger("cacheport.listener")

RelayFactory = Callable[[BufferPool, Callable[[Relay], None], str], Relay]
"""Builds the relay for each new connection: ``(pool, on_close, source) -> Relay``.

A cluster's factory may also have ``native(hub, bufsize, on_close, source) ->
NativeRelay``: the engine can frame its protocol (``relay: native``; relay/choose.py)."""

_ACCEPT_BATCH = 64
_FD_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_BACKOFF = 0.5
_WARN_INTERVAL = 10.0
# The spec asks receivers to wait "at least 3 seconds to cover a TCP retransmit".
PROXY_HEADER_TIMEOUT = 3.0
# sni_routes: how long a client may take to send its whole ClientHello.
CLIENT_HELLO_TIMEOUT = 5.0


class _FdReserve:
    """One spare descriptor per process, so a listener out of descriptors can still take
    a client off the backlog and close it (a clean FIN and a count) instead of leaving it
    to hang there; the pause alone would leave the kernel completing its handshake."""

    fd = -1

    @classmethod
    def keep(cls) -> None:
        if cls.fd < 0:
            try:
                cls.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                cls.fd = -1

    @classmethod
    def spend(cls, sock: socket.socket) -> bool | None:
        """Free the spare, accept one client and close it: True if one was closed, None if
        none was waiting (Linux reports EMFILE before it looks at the backlog), False if
        there is no spare or the accept failed otherwise."""
        if cls.fd < 0:
            return False
        os.close(cls.fd)
        cls.fd = -1
        try:
            client, _peer = sock.accept()
            client.close()
            return True
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return False
        finally:
            cls.keep()


class BindError(Exception):
    """A listener could not bind its address."""


def relays_here(tls: bool = False) -> frozenset[RelayKind]:
    """The relays this install can run: the engine only where it was built (for ``tls``
    listeners, built with libssl), splice only where the kernel has splice(2); buffered
    everywhere."""
    here = {RelayKind.BUFFERED}
    if native_tls_available() if tls else native_available():
        here.add(RelayKind.ENGINE)
    if splice_supported():
        here.add(RelayKind.SPLICE)
    return frozenset(here)


@dataclass
class ListenerStats:
    """Plain integers, bumped outside the hot loop; relays fold their bytes in on close."""

    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    closed_bytes_upstream: int = 0  # client -> upstream, from relays that have closed
    closed_bytes_downstream: int = 0  # upstream -> client
    closed: dict[str, int] = field(default_factory=dict)  # relayed connections, by reason

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def close(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1

    @property
    def idle_closed(self) -> int:
        return self.closed.get(closes.IDLE_TIMEOUT, 0)


class _RateLimitedLog:
    """Logs the first event at once and then at most one summary per interval."""

    def __init__(self, interval: float = _WARN_INTERVAL) -> None:
        self.interval = interval
        self.last = -interval
        self.suppressed = 0

    def warning(self, message: str, *args: object, **fields: object) -> None:
        """``fields`` (listener, client, reason...) go on the record: JSON lines carry them."""
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        if self.suppressed:
            message += f" (and {self.suppressed} more since the last report)"
        self.suppressed = 0
        self.last = now
        log.warning(message, *args, extra=fields)


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "handshake timed out"
    return str(exc) or type(exc).__name__


def _client(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def bind_socket(address: Address, backlog: int = 1024, reuse_port: bool = False) -> socket.socket:
    """Bind and listen; ``[::]`` is IPv6 only, as nginx does, so ``0.0.0.0`` can be bound too."""
    family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """Accepts clients on one address and relays each to the configured upstream."""

    def __init__(
        self,
        config: ListenerConfig,
        loop: asyncio.AbstractEventLoop,
        pool: BufferPool,
        resolver: Resolver,
        on_idle: Callable[[], None] | None = None,
        *,
        reuse_port: bool = False,
    ) -> None:
        self.reuse_port = reuse_port
        self.config = config
        self.on_idle = on_idle  # called whenever the last connection ends
        self.loop = loop
        self.pool = pool
        self.resolver = resolver
        self.sock: socket.socket | None = None
        self.bound: Address | None = None
        self.relays: set[AnyRelay] = set()
        self.connecting: set[asyncio.Task[None]] = set()
        self.stats = ListenerStats()
        self.accepting = False
        self._connect_warn = _RateLimitedLog()
        self._accept_warn = _RateLimitedLog()
        self._resume_handle: asyncio.TimerHandle | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_seen: dict[AnyRelay, tuple[int, float]] = {}
        self._limit_warn = _RateLimitedLog()
        self._tls_warn = _RateLimitedLog()
        self._proxy_warn = _RateLimitedLog()
        self.tls = ListenerTls(config)
        # notAfter of the certificate the peers showed the engine at their last handshake,
        # per leg ("upstream", "client"): the certificate expiry gauge reads it.
        self.tls_peer_expiry: dict[str, float] = {}
        self._per_client: dict[str, int] = {}  # live connections per source IP
        self._not_allowed_seen: dict[str, float] = {}
        # log_connections: when each relay's connection began (wall, monotonic) and the
        # client's port; only while its listener logs connections.
        self._began: dict[AnyRelay, tuple[float, float, int]] = {}
        # Which upstream each relay uses, and per-upstream totals.
        self.book: UpstreamBook[AnyRelay] = UpstreamBook()
        # Cluster listeners set a factory of rewriting relays (proxy.cluster.relay); the
        # default keeps the plain relay. Anything but Relay here must not be spliced.
        self.relay_factory: RelayFactory = Relay

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def active(self) -> int:
        return len(self.relays) + len(self.connecting)

    @property
    def rewriting(self) -> bool:
        """A cluster listener: its relay factory rewrites replies, so it never splices."""
        return self.relay_factory is not Relay

    @property
    def framed(self) -> bool:
        """A cluster listener whose protocol the engine can frame (Redis Cluster)."""
        return getattr(self.relay_factory, "native", None) is not None

    @property
    def relay(self) -> RelayKind:
        """Which relay serves this listener's connections on this install (``/status``)."""
        return serving_relay(self.config, relays_here(tls=not self.config.may_splice),
                             rewriting=self.rewriting, framed=self.framed)

    @property
    def engine_missing(self) -> bool:
        """The native engine would serve this listener, but it was not built here."""
        return (RelayKind.ENGINE in relay_order(self.config, rewriting=self.rewriting,
                                                framed=self.framed)
                and not native_available())

    def bind(self) -> None:
        try:
            self.sock = bind_socket(self.config.listen, reuse_port=self.reuse_port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                reason = "address already in use (another process, or another listener, has it)"
            elif exc.errno == errno.EACCES:
                reason = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            elif exc.errno == errno.EADDRNOTAVAIL:
                reason = "address not available on this host"
            raise BindError(
                f"listener {self.name!r}: cannot listen on {self.config.listen}: {reason}"
            ) from None
        self._note_bound()

    def _note_bound(self) -> None:
        assert self.sock is not None
        host, port = self.sock.getsockname()[:2]
        self.bound = Address(host, port)

    def adopt(self, sock: socket.socket) -> None:
        """Take over a listening socket from a listener a reload removes (same address)."""
        self.sock = sock
        self._note_bound()

    def unbind(self) -> None:
        """Undo ``bind`` before ``start`` (a reload or start that failed elsewhere)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def release_socket(self) -> None:
        """Stop accepting but leave the socket open: another listener has adopted it."""
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock = None
        self.accepting = False
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        log.info("listener %s %s handed its socket over", self.name, self.bound)

    async def wait_idle(self) -> None:
        """Wait for every connection of this listener to end (callers bound the wait)."""
        if not self.active:
            return
        idle = asyncio.Event()
        previous = self.on_idle

        def notify() -> None:
            idle.set()
            if previous is not None:
                previous()

        self.on_idle = notify
        try:
            await idle.wait()
        finally:
            self.on_idle = previous

    def start(self) -> None:
        assert self.sock is not None, "bind() first"
        self.accepting = True
        _FdReserve.keep()
        self.loop.add_reader(self.sock.fileno(), self._on_acceptable)
        missing = " (the native engine is not built on this install)" \
            if self.engine_missing else ""
        log.info(
            "listener %s %s -> %s (%s) started; relay %s%s",
            self.name, self.bound, self.config.upstream, self.config.protocol,
            self.relay.value, missing,
        )
        upstream_tls = self.config.upstream_tls
        if upstream_tls is not None and not upstream_tls.verify:
            log.warning("listener %s: upstream_tls verify: false -- the node's certificate is "
                        "not checked, so anyone on the path can pose as it", self.name)
        if self.config.allows_everyone:
            log.warning("listener %s: allow list admits every address; narrow it to your "
                        "clients' CIDRs unless this port is firewalled elsewhere", self.name)

    def stop_accepting(self) -> None:
        """Close the listening socket; live connections are left alone."""
        if self.sock is None:
            return
        self.accepting = False
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        log.info("listener %s %s stopped", self.name, self.bound)

    def close_connections(self, reason: str = closes.CUT_AT_STOP) -> None:
        """Cut every live and connecting connection (used once draining is over);
        ``reason``: cut_at_stop, or drained for a listener a reload removed."""
        for task in list(self.connecting):
            task.cancel()
        for relay in list(self.relays):
            relay.why = reason
            relay.abort()
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def reconfigure(self, config: ListenerConfig, pool: BufferPool | None = None,
                    tls: ListenerTls | None = None) -> None:
        """Send new connections per ``config``; live ones keep their upstream and socket."""
        old = self.config
        self.config = config
        self.tls = tls if tls is not None else ListenerTls(config)
        if pool is not None:
            self.pool = pool
        if old.upstream != config.upstream:
            log.info("listener %s: new connections now go to %s (was %s)",
                     self.name, config.upstream, old.upstream)
        if old.idle_timeout != config.idle_timeout:
            if self._idle_handle is not None:
                self._idle_handle.cancel()
                self._idle_handle = None
            self._schedule_idle_sweep()

    # -- accepting -----------------------------------------------------------

    def _on_acceptable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(_ACCEPT_BATCH):
            try:
                client, _peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _FD_EXHAUSTED:
                    spent = _FdReserve.spend(sock)
                    if spent is None:
                        return
                    self._fd_exhausted(exc)
                    if spent:
                        self.stats.refuse(closes.FD_LIMIT)
                        continue
                    self._pause_accepting()
                else:
                    self._accept_warn.warning(
                        "listener %s: accept failed: %s", self.name, exc.strerror or exc
                    )
                return
            # One string per client address, shared by its connections (and the per-client
            # count), rather than a fresh one held by every relay.
            source = sys.intern(_peer[0])
            if self.config.proxy_protocol != "off":
                self._accept_proxied(client, source, _peer[1])
                continue
            refusal = self._admit(source)
            if refusal is not None:
                self._refuse(refusal, source, _peer[1])
                client.close()
                continue
            self.stats.accepted += 1
            self._per_client[source] = self._per_client.get(source, 0) + 1
            task = self.loop.create_task(self._connect(client, source, _peer[1]))
            self.connecting.add(task)
            task.add_done_callback(self._connect_done)

    # -- PROXY protocol ------------------------------------------------------------

    def _accept_proxied(self, client: socket.socket, peer: str, port: int) -> None:
        """A load balancer's connection: read its header before admitting the client."""
        config = self.config
        trusted = config.proxy_protocol_from or ()
        if not any(ipaddress.ip_address(peer) in net for net in trusted):
            self._refuse_proxied(client, peer, port, closes.PROXY_UNTRUSTED,
                                 "not in proxy_protocol_from")
            return
        task = self.loop.create_task(self._read_header_then_connect(client, peer, port))
        self.connecting.add(task)
        task.add_done_callback(self._connect_done)

    def _refuse_proxied(self, client: socket.socket, peer: str, port: int, reason: str,
                        detail: str) -> None:
        self._refuse(reason, peer, port)
        self._proxy_warn.warning("listener %s: closed a connection from %s: %s: %s",
                                 self.name, peer, reason, detail, listener=self.name,
                                 client=peer, reason=reason)
        client.close()

    async def _read_header_then_connect(self, client: socket.socket, peer: str,
                                        port: int) -> None:
        """Consume exactly the header's bytes, admit by its address, then connect.

        Peeking leaves the stream untouched until the header is complete, so whatever
        the client sent after it stays in the kernel for the relay (native, splice, TLS).
        """
        config = self.config
        client.setblocking(False)
        try:
            header = await self._read_header(client, config.proxy_protocol)
        except proxy_header.HeaderError as exc:
            self._refuse_proxied(client, peer, port, closes.PROXY_MALFORMED, str(exc))
            return
        except TimeoutError:
            self._refuse_proxied(client, peer, port, closes.PROXY_TIMEOUT,
                                 f"none complete within {PROXY_HEADER_TIMEOUT:g}s")
            return
        except (EOFError, OSError) as exc:  # a reset or a close before the whole header
            self._refuse_proxied(client, peer, port, closes.PROXY_MISSING,
                                 f"connection ended first ({exc})")
            return
        except asyncio.CancelledError:
            client.close()
            raise
        if header.source is not None:
            source, port = sys.intern(header.source[0]), int(header.source[1])
        else:
            source = peer
        # This task is already counted in ``active``; max_connections must not count it.
        refusal = self._admit(source, pending=1)
        if refusal is not None:
            self._refuse(refusal, source, port)
            client.close()
            return
        self.stats.accepted += 1
        self._per_client[source] = self._per_client.get(source, 0) + 1
        await self._connect(client, source, port)

    async def _read_header(self, client: socket.socket,
                           mode: proxy_header.Mode) -> proxy_header.Header:
        """Peek until a whole header is there (bounded in time and size), then recv it."""
        header = await preread.peek(self.loop, client,
                                    lambda data: proxy_header.parse(data, mode),
                                    proxy_header.MAX_HEADER, PROXY_HEADER_TIMEOUT)
        # The bytes are in the kernel's buffer already: one recv takes exactly them.
        taken = client.recv(header.length)
        if len(taken) != header.length:
            raise EOFError("header shrank between peek and read")
        return header

    async def _route_by_sni(self, client: socket.socket, source: str,
                            config: ListenerConfig) -> Address | None:
        """sni_routes: the upstream for the server name in the client's ClientHello, which
        stays in the stream for it; None (counted, logged) refuses the client."""
        reason = detail = ""
        try:
            hello = await preread.peek(self.loop, client, tls_hello.parse,
                                       tls_hello.MAX_HELLO, CLIENT_HELLO_TIMEOUT)
        except tls_hello.HelloError as exc:
            reason, detail = exc.reason, str(exc)
        except TimeoutError:
            reason, detail = closes.CLIENT_HELLO_TIMEOUT, f"none within {CLIENT_HELLO_TIMEOUT:g}s"
        except (EOFError, OSError) as exc:
            reason, detail = closes.CLIENT_HELLO_INCOMPLETE, f"connection ended first ({exc})"
        else:
            name = hello.server_name
            target = config.sni_target(name) if name is not None else None
            if target is not None:
                return target
            reason, detail = (closes.SNI_NO_MATCH, f"no route for {name!r}") if name is not None \
                else (closes.SNI_MISSING, "the ClientHello names no server")
        self.stats.refuse(reason)
        self._tls_warn.warning("listener %s: closed a connection from %s: %s", self.name,
                               source, detail)
        return None

    def _admit(self, source: str, pending: int = 0) -> str | None:
        """Why a new client from ``source`` is refused at accept, or None to admit it."""
        config = self.config
        if config.allow is not None:
            ip = ipaddress.ip_address(source)
            if not any(ip in net for net in config.allow):
                self._log_not_allowed(source)
                return closes.NOT_ALLOWED
        limit = config.max_connections
        if limit is not None and self.active - pending >= limit:
            self._limit_warn.warning(
                "listener %s: max_connections %d reached; new clients are closed",
                self.name, limit, listener=self.name, reason=closes.MAX_CONNECTIONS)
            return closes.MAX_CONNECTIONS
        limit = config.max_connections_per_client
        if limit is not None and self._per_client.get(source, 0) >= limit:
            self._limit_warn.warning(
                "listener %s: client %s reached max_connections_per_client %d",
                self.name, source, limit, listener=self.name, client=source,
                reason=closes.MAX_CONNECTIONS_PER_CLIENT)
            return closes.MAX_CONNECTIONS_PER_CLIENT
        return None

    def _log_not_allowed(self, source: str) -> None:
        """At most one line per source per minute, and a bounded memory of sources."""
        now = time.monotonic()
        last = self._not_allowed_seen.get(source)
        if last is not None and now - last < 60:
            return
        if len(self._not_allowed_seen) >= 4096:
            self._not_allowed_seen = {
                s: t for s, t in self._not_allowed_seen.items() if now - t < 60}
        self._not_allowed_seen[source] = now
        log.warning("listener %s: refused %s, not in its allow list", self.name, source,
                    extra={"listener": self.name, "client": source,
                           "reason": closes.NOT_ALLOWED})

    def top_clients(self, limit: int = 20) -> dict[str, int]:
        """The client addresses with the most live connections (the header's, behind a
        load balancer that sends PROXY headers), for /status."""
        top = sorted(self._per_client.items(), key=lambda item: (-item[1], item[0]))
        return dict(top[:limit])

    def _release(self, source: str) -> None:
        count = self._per_client.get(source, 0) - 1
        if count > 0:
            self._per_client[source] = count
        else:
            self._per_client.pop(source, None)

    def _fd_exhausted(self, exc: OSError) -> None:
        self._accept_warn.warning(
            "listener %s: out of file descriptors (%s; RLIMIT_NOFILE %d): new clients are "
            "closed, live connections go on", self.name, exc.strerror or exc,
            resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    def _pause_accepting(self) -> None:
        """No spare descriptor either: stop polling the socket for a while, not spin."""
        assert self.sock is not None
        self.loop.remove_reader(self.sock.fileno())
        self._resume_handle = self.loop.call_later(_ACCEPT_BACKOFF, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume_handle = None
        _FdReserve.keep()
        if self.sock is not None and self.accepting:
            self.loop.add_reader(self.sock.fileno(), self._on_acceptable)

    # -- connecting ----------------------------------------------------------

    async def _connect(self, client: socket.socket, source: str, port: int = 0) -> None:
        """Wrap the client (TLS handshake first, if any), dial the upstream, start a relay.

        The per-client count goes with the relay once there is one.
        """
        config = self.config
        tls = self.tls
        upstream: socket.socket | None = None
        relay: AnyRelay | None = None
        target = self._choose_upstream(config)
        began = (time.time(), time.monotonic(), port) if config.log_connections else None
        try:
            if target is None:
                # Every upstream is DOWN: close now rather than make the client wait out
                # connect_timeout against a node the checks already know is gone.
                self._refuse(closes.UPSTREAM_DOWN, source, port, None, began)
                client.close()
                return
            client.setblocking(False)
            if config.sni_routes:
                target = await self._route_by_sni(client, source, config)
                if target is None:
                    client.close()
                    return
            _tune(client)
            # Who moves the bytes (relay/choose.py): the native engine or a splice relay
            # takes the raw sockets; the buffered Relay wraps them in transports. Each
            # choose_* says whether its relay can serve here and now.
            order = relay_order(config, rewriting=self.rewriting, framed=self.framed)
            native = choose_native(self.loop, config, order) if RelayKind.ENGINE in order \
                else None
            hub = (choose_hub(self.loop, config)
                   if native is None and RelayKind.SPLICE in order else None)
            if native is not None and self.rewriting:
                relay = self.relay_factory.native(  # type: ignore[attr-defined]
                    native, config.buffer_size, self._upstream_relay_closed, source)
            elif native is not None:
                relay = NativeRelay(
                    native, config.buffer_size, self._upstream_relay_closed, source,
                    config.copy, tls=tls_spec(tls.server, tls.client,
                                              self._upstream_name(config, target)),
                    on_tls_failure=lambda side, why: self._tls_failed(side, why, source,
                                                                      target, config),
                    on_tls_peer=self._tls_peer,
                    handshake_timeout=config.connect_timeout)
            elif hub is not None:
                relay = SpliceRelay(hub, self.pool, self._upstream_relay_closed, source,
                                    adaptive=config.copy == "auto")
            else:
                relay = self.relay_factory(self.pool, self._upstream_relay_closed, source)
            self.relays.add(relay)
            if began is not None:
                self._began[relay] = began
            self._schedule_idle_sweep()
            if tls.server is not None and isinstance(relay, Relay) and \
                    not await self._client_handshake(relay, client, source, config):
                self._refuse(closes.TLS_HANDSHAKE_FAILED, source, port, None, began)
                return
            started = time.perf_counter()  # uvloop's loop.time() has millisecond steps
            dialled = await self._dial(config, target)
            if isinstance(dialled, str):
                self._refuse(dialled, source, port, target, began)
                self._discard(relay, client, None)
                return
            upstream = dialled
            if relay.closed:
                self._discard(relay, client, upstream)
                return
            self.book.opened(relay, target, time.perf_counter() - started)
            _tune(upstream)
            if isinstance(relay, SpliceRelay | NativeRelay):
                relay.attach(self.loop, client, upstream)
            else:
                client_side, upstream_side = relay.client, relay.upstream
                if tls.server is None:
                    await self.loop.connect_accepted_socket(lambda: client_side, client)
                if tls.client is None:
                    await self.loop.create_connection(lambda: upstream_side, sock=upstream)
                elif not await self._upstream_handshake(relay, upstream, config, target):
                    self._refuse(closes.UPSTREAM_TLS_FAILED, source, port, target, began)
                    self._discard(relay, client, upstream)
                    return
        except asyncio.CancelledError:
            self._discard(relay, client, upstream)
            raise
        except OSError as exc:
            if exc.errno in _FD_EXHAUSTED:  # no descriptor left for the upstream socket
                self._fd_exhausted(exc)
                self.stats.refuse(closes.FD_LIMIT)
                self._discard(relay, client, upstream)
                return
            # The client vanished while we dialled (or the socket options failed).
            log.debug("listener %s: client setup failed: %s", self.name, exc)
            self._refuse(closes.CLIENT_ERROR, source, port, target, began)
            self._discard(relay, client, upstream)
            return
        finally:
            if relay is None:
                self._release(source)
        if relay.closed:
            # A side ended (or a stop cut the relay) while the other transport was being
            # made; that transport is open and belongs to no live relay: end it.
            relay.abort()
            return
        relay.start()

    async def _client_handshake(self, relay: Relay, client: socket.socket, source: str,
                                config: ListenerConfig) -> bool:
        side, context = relay.client, self.tls.server
        assert context is not None
        try:
            layer = await tls_layer.wrap(self.loop, side, client, context, server_side=True,
                                         handshake_timeout=config.connect_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            self._tls_warn.warning("listener %s: TLS handshake with client %s failed: %s",
                                   self.name, source, _tls_reason(exc), listener=self.name,
                                   client=source, reason=closes.TLS_HANDSHAKE_FAILED)
            self._discard(relay, client, None)
            return False
        self.tls.client_seen(layer.sslobj)  # the expiry gauge
        return True

    def _upstream_name(self, config: ListenerConfig, target: Address | None) -> str | None:
        """SNI and the name the node's certificate must carry; a backup is another node:
        without an explicit server_name it is named by its host."""
        name = self.tls.server_name
        if target is not None and target != config.upstream and \
                config.upstream_tls is not None and config.upstream_tls.server_name is None:
            name = target.host
        return name

    def _tls_failed(self, side: int, reason: str, source: str, target: Address | None,
                    config: ListenerConfig) -> None:
        """A handshake the native engine ran failed: counted and logged as the Python
        relay's are."""
        if side == 0:
            self.stats.refuse(closes.TLS_HANDSHAKE_FAILED)
            self._tls_warn.warning("listener %s: TLS handshake with client %s failed: %s",
                                   self.name, source, reason)
        else:
            self.stats.refuse(closes.UPSTREAM_TLS_FAILED)
            self._tls_warn.warning("listener %s: TLS handshake with upstream %s (name %s) "
                                   "failed: %s; client closed", self.name, target,
                                   self._upstream_name(config, target), reason)

    def _tls_peer(self, side: int, not_after: float) -> None:
        """The notAfter of the certificate a peer showed the engine at a handshake: the
        node's (side 1), or a client's under mutual TLS (side 0)."""
        leg = LEG_CLIENT if side == 0 else LEG_UPSTREAM
        self.tls_peer_expiry[leg] = not_after
        record_certificate_expiry(self.name, leg, not_after)

    async def _upstream_handshake(self, relay: Relay, upstream: socket.socket,
                                  config: ListenerConfig, target: Address) -> bool:
        side = relay.upstream
        name = self._upstream_name(config, target)
        context = self.tls.client
        assert context is not None
        try:
            layer = await tls_layer.wrap(self.loop, side, upstream, context, server_side=False,
                                         server_hostname=name,
                                         handshake_timeout=config.connect_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            self._tls_warn.warning("listener %s: TLS handshake with upstream %s (name %s) "
                                   "failed: %s; client closed", self.name, target,
                                   name, _tls_reason(exc), listener=self.name,
                                   upstream=str(target), reason=closes.UPSTREAM_TLS_FAILED)
            return False
        self.tls.upstream_seen(layer.sslobj)  # the expiry gauge
        return True

    def _discard(self, relay: AnyRelay | None, client: socket.socket,
                 upstream: socket.socket | None) -> None:
        """Undo a half-made connection: whatever is wrapped in a transport goes with the relay."""
        if relay is not None:
            relay.abort()
        client.close()
        if upstream is not None:
            upstream.close()

    async def _dial(self, config: ListenerConfig, target: Address) -> socket.socket | str:
        """Connect to ``target``, trying each address; the refusal reason (logged) when
        none answers."""
        deadline = self.loop.time() + config.connect_timeout
        try:
            async with asyncio.timeout(config.connect_timeout):
                addresses = await self.resolver.resolve(target, config.dns_ttl)
        except (TimeoutError, ResolveError) as exc:
            reason = "DNS lookup timed out" if isinstance(exc, TimeoutError) else str(exc)
            self._connect_warn.warning(
                "listener %s: cannot reach upstream %s: %s; client closed",
                self.name, target, reason, listener=self.name, upstream=str(target),
                reason=closes.DNS_FAILED)
            return closes.DNS_FAILED
        last_error = "no address"
        for family, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                async with asyncio.timeout_at(deadline):
                    await self.loop.sock_connect(sock, sockaddr)
            except TimeoutError:
                sock.close()
                last_error = f"no answer within connect_timeout {config.connect_timeout:g}s"
                break
            except OSError as exc:
                sock.close()
                last_error = exc.strerror or str(exc)
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        if not target.is_ip:
            self.resolver.forget(target)
        self._connect_warn.warning(
            "listener %s: cannot connect to upstream %s: %s; client closed",
            self.name, target, last_error, listener=self.name, upstream=str(target),
            reason=closes.UPSTREAM_CONNECT_FAILED)
        return closes.UPSTREAM_CONNECT_FAILED

    # -- upstream choice and health ---------------------------------------------

    # Set by the server when health checks run: ``state(listener, upstream)``,
    # ``None`` for an upstream that is not checked.
    health: Callable[[str, Address], State | None] | None = None
    # Set by a cluster on a role listener (reader_port) whose candidates change at run
    # time: ``chooser(config)`` then replaces the upstream-then-backups order.
    chooser: Callable[[ListenerConfig], Address | None] | None = None

    def _choose_upstream(self, config: ListenerConfig) -> Address | None:
        """The upstream for a new connection: the first of upstream, backups not DOWN."""
        if self.chooser is not None:
            return self.chooser(config)
        health = self.health
        if health is None:
            return config.upstream
        name = config.name
        return choose_upstream((addr, health(name, addr)) for addr in config.upstreams)

    def _upstream_relay_closed(self, relay: AnyRelay) -> None:
        upstream = self.book.relays.get(relay)
        self._relay_closed(relay)
        self.book.closed(relay)
        began = self._began.pop(relay, None) if self._began else None
        if upstream is None:
            return  # never reached its upstream: counted (and logged) as refused
        reason = relay.why or closes.UNKNOWN
        # A handshake the engine ran that failed is a refusal (counted by _tls_failed), as
        # on the Python relay, where no relay starts before both handshakes.
        refused = reason in (closes.TLS_HANDSHAKE_FAILED, closes.UPSTREAM_TLS_FAILED)
        if not refused:
            self.stats.close(reason)
        if began is not None:
            wall, mono, port = began
            CONNECTIONS.put(wall, time.monotonic() - mono, self.name,
                            _client(relay.source, port), str(upstream),
                            relay.bytes_upstream, relay.bytes_downstream, reason, refused)

    def _refuse(self, reason: str, source: str, port: int, upstream: Address | None = None,
                began: tuple[float, float, int] | None = None) -> None:
        """Count a connection that never reached an upstream; log it when the listener
        logs connections."""
        self.stats.refuse(reason)
        if self.config.log_connections:
            wall, mono = (time.time(), time.monotonic()) if began is None else began[:2]
            CONNECTIONS.put(wall, time.monotonic() - mono, self.name, _client(source, port),
                            None if upstream is None else str(upstream), 0, 0, reason, True)

    def close_upstream_connections(self, upstream: Address) -> int:
        """``on_down: close``: end the live connections to ``upstream`` so clients reconnect."""
        relays = self.book.live(upstream)
        self.book.of(upstream).closed_on_down += len(relays)
        for relay in relays:
            relay.why = closes.UPSTREAM_DOWN
            relay.close()
        if relays:
            log.info("listener %s: closed %d connection(s) to upstream %s, which is DOWN",
                     self.name, len(relays), upstream)
        return len(relays)

    def _connect_done(self, task: asyncio.Task[None]) -> None:
        self.connecting.discard(task)
        if self.on_idle is not None and not self.active:
            self.on_idle()

    def _relay_closed(self, relay: AnyRelay) -> None:
        self.relays.discard(relay)
        self._release(relay.source)
        if self.on_idle is not None and not self.active:
            self.on_idle()
        self._idle_seen.pop(relay, None)
        self.stats.closed_bytes_upstream += relay.bytes_upstream
        self.stats.closed_bytes_downstream += relay.bytes_downstream

    # -- idle timeout --------------------------------------------------------

    def _schedule_idle_sweep(self) -> None:
        # Only while there are connections: thousands of idle listeners keep no timers.
        idle = self.config.idle_timeout
        if idle is not None and self._idle_handle is None and self.relays:
            self._idle_handle = self.loop.call_later(max(idle / 4, 0.05), self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close relays whose byte counts have not moved for ``idle_timeout``.

        Comparing counters on a timer keeps clock reads out of the hot loop.
        """
        self._idle_handle = None
        idle = self.config.idle_timeout
        if idle is None:
            return
        now = self.loop.time()
        seen = self._idle_seen
        for relay in list(self.relays):
            total = relay.bytes_total
            last = seen.get(relay)
            if last is None or last[0] != total:
                seen[relay] = (total, now)
            elif now - last[1] >= idle:
                log.debug("listener %s: closing a connection idle for %.1fs", self.name, idle)
                relay.why = closes.IDLE_TIMEOUT
                relay.close()
        self._schedule_idle_sweep()
