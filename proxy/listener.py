"""One bound port: accept a client, admit it, dial its upstream, hand both to a relay.

::

    client --accept--> Listener --admit--> connect: [sni route] --dial--> upstream
                 (port.py)      (admission.py)       (handshake.py)  (dial.py)
                                              |
                                              +--> relay(client, upstream)  tracked until
                                                   (relaypick.py)           it closes (idle.py)

The listener owns its listening socket, the connections it started and the
counters that later become metrics. It reads ``self.config`` for every new
connection, so a reload can retarget it without touching live relays.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import admission, closes
from .admission import AdmissionLog
from .config import Address, ListenerConfig
from .dial import Dialer
from .handshake import Handshakes
from .health.state import State, choose_upstream
from .idle import IdleSweep
from .logs import CONNECTIONS
from .metrics import UpstreamBook
from .port import ACCEPT_BATCH, FD_EXHAUSTED, FdReserve, Port, bind_failure
from .relay.buffered import BufferPool, Relay
from .relay.choose import RelayKind
from .relay.engine import AnyRelay, NativeRelay
from .relay.splice import SpliceRelay
from .relaypick import RelayFactory, engine_missing, new_relay, serving
from .resolver import Resolver
from .tls import ListenerTls

log = logging.getLogger("cacheport.listener")


class BindError(Exception):
    """A listener could not bind its address."""


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


def _client(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class Listener(Port):
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
        super().__init__(config, loop, reuse_port=reuse_port)
        self.on_idle = on_idle  # called whenever the last connection ends
        self.pool = pool
        self.relays: set[AnyRelay] = set()
        self.connecting: set[asyncio.Task[None]] = set()
        self.stats = ListenerStats()
        self._idle = IdleSweep(loop, self.relays, config.name, config.idle_timeout)
        # The parts a new connection goes through (a reload keeps the name they hold).
        self.handshakes = Handshakes(loop, config.name, ListenerTls(config), self.stats.refuse)
        self._admission = AdmissionLog(config.name)
        self._dialer = Dialer(loop, resolver, config.name)
        self._per_client: dict[str, int] = {}  # live connections per source IP
        # log_connections: when each relay's connection began (wall, monotonic) and the
        # client's port; only while its listener logs connections.
        self._began: dict[AnyRelay, tuple[float, float, int]] = {}
        # Which upstream each relay uses, and per-upstream totals.
        self.book: UpstreamBook[AnyRelay] = UpstreamBook()
        # Cluster listeners set a factory of rewriting relays (proxy.cluster.relay); the
        # default keeps the plain relay. Anything but Relay here must not be spliced.
        self.relay_factory: RelayFactory = Relay

    @property
    def active(self) -> int:
        return len(self.relays) + len(self.connecting)

    @property
    def tls(self) -> ListenerTls:
        """The TLS contexts new connections use (rebuilt on every start and reload)."""
        return self.handshakes.tls

    @tls.setter
    def tls(self, tls: ListenerTls) -> None:
        self.handshakes.tls = tls

    @property
    def tls_peer_expiry(self) -> dict[str, float]:
        """notAfter of the certificate each peer showed the engine at its last handshake,
        per leg ("upstream", "client")."""
        return self.handshakes.peer_expiry

    @property
    def relay(self) -> RelayKind:
        """Which relay serves this listener's connections on this install (``/status``)."""
        return serving(self.config, self.relay_factory)

    @property
    def engine_missing(self) -> bool:
        """The native engine would serve this listener, but it was not built here."""
        return engine_missing(self.config, self.relay_factory)

    def bind(self) -> None:
        try:
            super().bind()
        except OSError as exc:
            raise BindError(f"listener {self.name!r}: cannot listen on {self.config.listen}: "
                            f"{bind_failure(exc)}") from None

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
        super().start()
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

    def close_connections(self, reason: str = closes.CUT_AT_STOP) -> None:
        """Cut every live and connecting connection (used once draining is over);
        ``reason``: cut_at_stop, or drained for a listener a reload removed."""
        for task in list(self.connecting):
            task.cancel()
        for relay in list(self.relays):
            relay.why = reason
            relay.abort()
        self._idle.cancel()

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
            self._idle.retime(config.idle_timeout)

    # -- accepting -----------------------------------------------------------

    def _on_acceptable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        config = self.config
        for _ in range(ACCEPT_BATCH):
            try:
                client, _peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in FD_EXHAUSTED:
                    spent = FdReserve.spend(sock)
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
            if config.proxy_protocol != "off":
                self._accept_proxied(client, source, _peer[1])
                continue
            refusal = admission.refusal(config, source, self.active, self._per_client)
            if refusal is not None:
                self._turn_away(refusal, source, _peer[1], client)
                continue
            self.stats.accepted += 1
            self._per_client[source] = self._per_client.get(source, 0) + 1
            task = self.loop.create_task(self._connect(client, source, _peer[1]))
            self.connecting.add(task)
            task.add_done_callback(self._connect_done)

    # -- PROXY protocol ------------------------------------------------------------

    def _accept_proxied(self, client: socket.socket, peer: str, port: int) -> None:
        """A load balancer's connection: read its header before admitting the client."""
        if not admission.trusted_sender(self.config, peer):
            self._refuse_proxied(client, peer, port, closes.PROXY_UNTRUSTED,
                                 "not in proxy_protocol_from")
            return
        task = self.loop.create_task(self._read_header_then_connect(client, peer, port))
        self.connecting.add(task)
        task.add_done_callback(self._connect_done)

    def _refuse_proxied(self, client: socket.socket, peer: str, port: int, reason: str,
                        detail: str) -> None:
        self._refuse(reason, peer, port)
        self._admission.proxied(peer, reason, detail)
        client.close()

    async def _read_header_then_connect(self, client: socket.socket, peer: str,
                                        port: int) -> None:
        """Consume exactly the header's bytes, admit by its address, then connect."""
        client.setblocking(False)
        try:
            found = await admission.proxied_client(self.loop, client, peer, port,
                                                   self.config.proxy_protocol)
        except asyncio.CancelledError:
            client.close()
            raise
        if isinstance(found, admission.Refused):
            self._refuse_proxied(client, peer, port, found.reason, found.detail)
            return
        source, port = found
        # This task is already counted in ``active``; max_connections must not count it.
        refusal = admission.refusal(self.config, source, self.active - 1, self._per_client)
        if refusal is not None:
            self._turn_away(refusal, source, port, client)
            return
        self.stats.accepted += 1
        self._per_client[source] = self._per_client.get(source, 0) + 1
        await self._connect(client, source, port)

    def _turn_away(self, reason: str, source: str, port: int, client: socket.socket) -> None:
        """A client ``admission.refusal`` refused: worded, counted, closed."""
        self._admission.refused(reason, source, self.config)
        self._refuse(reason, source, port)
        client.close()

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

    # -- connecting ----------------------------------------------------------

    async def _connect(self, client: socket.socket, source: str, port: int = 0) -> None:
        """Wrap the client (TLS handshake first, if any), dial the upstream, start a relay.

        The per-client count goes with the relay once there is one.
        """
        config = self.config
        tls = self.handshakes.tls
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
                target = await self.handshakes.sni_route(client, source, config)
                if target is None:
                    client.close()
                    return
            _tune(client)
            relay = new_relay(self.loop, config, self.pool, self.relay_factory,
                              self._upstream_relay_closed, source, target, tls, self.handshakes)
            self.relays.add(relay)
            if began is not None:
                self._began[relay] = began
            self._idle.schedule()
            if tls.server is not None and isinstance(relay, Relay) and \
                    not await self.handshakes.with_client(relay.client, client, source, config):
                self._discard(relay, client, None)
                self._refuse(closes.TLS_HANDSHAKE_FAILED, source, port, None, began)
                return
            started = time.perf_counter()  # uvloop's loop.time() has millisecond steps
            dialled = await self._dialer.dial(config, target)
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
                elif not await self.handshakes.with_upstream(relay.upstream, upstream, config,
                                                             target):
                    self._refuse(closes.UPSTREAM_TLS_FAILED, source, port, target, began)
                    self._discard(relay, client, upstream)
                    return
        except asyncio.CancelledError:
            self._discard(relay, client, upstream)
            raise
        except OSError as exc:
            if exc.errno in FD_EXHAUSTED:  # no descriptor left for the upstream socket
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

    def _discard(self, relay: AnyRelay | None, client: socket.socket,
                 upstream: socket.socket | None) -> None:
        """Undo a half-made connection: whatever is wrapped in a transport goes with the relay."""
        if relay is not None:
            relay.abort()
        client.close()
        if upstream is not None:
            upstream.close()

    # -- upstream choice and health ---------------------------------------------

    # Set by the server when health checks run: ``state(listener, upstream)``,
    # ``None`` for an upstream that is not checked.
    health: Callable[[str, Address], State | None] | None = None
    # Set by a cluster on a role listener (reader_port) whose candidates change at run
    # time: ``chooser(config)`` then replaces the upstream-then-backups order.
    chooser: Callable[[ListenerConfig], Address | None] | None = None
    # With a chooser: the addresses it spreads new connections over now (for /status).
    candidates: Callable[[], list[Address]] | None = None

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
        # A handshake the engine ran that failed is a refusal (counted by engine_failed), as
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
        self._idle.seen.pop(relay, None)
        self.stats.closed_bytes_upstream += relay.bytes_upstream
        self.stats.closed_bytes_downstream += relay.bytes_downstream
