"""The set of listeners: started together, changed by reload, stopped in order.

Start binds every listener (and the admin endpoint) before any accepts, so a
port that is taken leaves nothing half-started; then the listeners accept, the
health monitor starts checking and the admin endpoint serves. A reload is
planned from two validated configs (``reload.plan_reload``), binds what it adds
before changing anything, and then changes only what differs (the health
monitor keeps what its checks saw of unchanged upstreams). Stop is ordered and
idempotent: stop accepting everywhere, give live connections up to
``drain_timeout`` to finish, cut the rest, stop the checks, and close the admin
endpoint last so it answers (``/readyz`` 503) while connections drain.

Clusters (``clusters:``) add listeners of their own at run time: each cluster's
``ClusterManager`` calls ``add_listener`` / ``remove_listener`` as nodes come and go,
outside any file reload. Those listeners are named ``<cluster>:<port>``, which no
port-map listener name can be, so a reload's plan never touches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import closes
from .admin import AdminError, AdminServer
from .cluster.manager import ClusterManager
from .cluster.ports import StateFile
from .config import Address, ClusterConfig, Config, ListenerConfig
from .health.monitor import HealthMonitor, Target
from .health.state import State, Transition
from .listener import BindError, Listener
from .logs import LogCollector
from .relay.buffered import BufferPool
from .relay.engine import configure_engines
from .relaypick import RelayFactory
from .reload import ReloadPlan, plan_reload
from .resolver import Resolver
from .tls import ListenerTls, TlsError

log = logging.getLogger("cacheport.server")


class ServerCollector(Collector):
    """Process-wide counters that belong to no listener: reloads and their failures."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily("cacheport_reloads", "Port map reloads applied")
        reloads.add_metric([], self.server.reloads)
        yield reloads
        failures = CounterMetricFamily(
            "cacheport_reload_failures",
            "Reloads refused (invalid file, port taken); the running map was kept")
        failures.add_metric([], self.server.reload_failures)
        yield failures
        yield from self._cluster_metrics()

    _CLUSTER_HELP: ClassVar[dict[str, str]] = {
        "refreshes": "Cluster topology refreshes that succeeded",
        "refresh_failures": "Cluster topology refreshes that found no node to answer",
        "port_range_full": "Refreshes that found a node with no free port in the range",
        "redirects": "MOVED/ASK replies rewritten to the announced address",
        "unmapped": "Node addresses seen in replies before they had a port",
        "bind_failures": "Per-node listeners that could not bind",
        "protocol_errors": "Connections closed because a peer broke the protocol",
        "listeners_added": "Per-node listeners started",
        "listeners_removed": "Per-node listeners stopped (node left)",
        "failovers": "redis-replication: times the primary moved to another node",
    }

    def _cluster_metrics(self) -> Iterator[Metric]:
        managers = list(self.server.clusters.values())
        if not managers:
            return
        nodes = GaugeMetricFamily("cacheport_cluster_nodes",
                                  "Nodes the cluster reported at the last refresh",
                                  labels=["cluster"])
        for manager in managers:
            nodes.add_metric([manager.name], len(manager.nodes))
        yield nodes
        off = GaugeMetricFamily(
            "cacheport_cluster_ports_off_canonical",
            "Nodes whose port differs from what a host without state would give them "
            "(0: every host behind the load balancer agrees)", labels=["cluster"])
        for manager in managers:
            off.add_metric([manager.name], len(manager.off_canonical))
        yield off
        for field, text in self._CLUSTER_HELP.items():
            family = CounterMetricFamily(f"cacheport_cluster_{field}", text, labels=["cluster"])
            for manager in managers:
                family.add_metric([manager.name], getattr(manager.stats, field))
            yield family


class StartError(Exception):
    """The server could not start; nothing is left listening."""


class ReloadError(Exception):
    """A reload could not be applied; the running port map is unchanged."""


@dataclass(frozen=True)
class StopResult:
    drained: int  # connections that finished by themselves while draining
    cut: int  # connections closed when drain_timeout ran out (or on a second signal)


class Server:
    """Owns the listeners of one port map on one event loop."""

    def __init__(self, config: Config, *, reuse_port: bool = False,
                 private_admin: bool = False) -> None:
        self.config = config
        self.reuse_port = reuse_port  # set for multi-process workers (SO_REUSEPORT)
        # A worker serves its admin endpoint on a loopback port of its own; the supervisor
        # serves the configured address and gathers every worker's (proxy/fleet.py).
        self.private_admin = private_admin
        self.listeners: dict[str, Listener] = {}
        self.draining: set[Listener] = set()  # removed by a reload, finishing their connections
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reloads = 0
        self.reload_failures = 0
        self._resolver: Resolver | None = None
        self._pools: dict[int, BufferPool] = {}
        self._stopping: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._cut_now: asyncio.Event | None = None
        self._drain_tasks: set[asyncio.Task[None]] = set()
        self._stopped = False
        self.draining_since: float | None = None  # monotonic time a stop began (/readyz 503)
        self.monitor: HealthMonitor | None = None
        self.admin: AdminServer | None = None
        # The admin block as the port map gave it: a worker serves a private copy on
        # another port, so a reload compares the map's block, not the one served.
        self.admin_configured = config.admin
        self.clusters: dict[str, ClusterManager] = {}

    # -- start -----------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._cut_now = asyncio.Event()
        self._resolver = Resolver(loop)
        configure_engines(loop, self.config.engine_threads, self.config.busy_poll_us)
        admin = None
        if self.config.admin is not None:
            admin_config = self.config.admin
            if self.private_admin:
                # Only the supervisor asks it, from loopback: its allow list is the
                # public endpoint's business; the token stays (the supervisor passes it on)
                admin_config = dataclasses.replace(
                    admin_config, listen=Address("127.0.0.1", 0), explicit=True, allow=None)
            admin = AdminServer(admin_config, lambda: self.listeners.values(),
                                lambda: self.monitor)
            admin.registry.register(ServerCollector(self))
            admin.registry.register(LogCollector())
            admin.draining = lambda: self.draining_since is not None
            admin.status_extra = lambda: {"reloads": self.reloads,
                                          "reload_failures": self.reload_failures,
                                          "clusters": self.cluster_status()}
        try:
            listeners = [self._make_listener(lc) for lc in self.config.listeners]
            self._bind_all(listeners, {})
        except (BindError, TlsError) as exc:
            raise StartError(str(exc)) from None
        try:
            admin = self._bind_admin(admin) if admin is not None else None
        except AdminError as exc:
            for listener in listeners:
                listener.unbind()
            raise StartError(str(exc)) from None
        monitor = HealthMonitor(on_change=self._on_health_change)
        self.monitor = monitor
        for listener in listeners:
            listener.health = monitor.state
            listener.start()
            self.listeners[listener.name] = listener
        self.listeners_changed()
        monitor.start()
        await self._apply_clusters(self.config)  # a cluster's listeners: it calls back
        if admin is not None:
            await admin.start()
            self.admin = admin
        fallen_back = [lst.name for lst in self.listeners.values() if lst.engine_missing]
        if fallen_back:
            # Each listener's start line names its relay; this says once why it is not
            # the engine (an image or install built without a C compiler, or not Linux).
            log.warning("the native relay engine is not built on this install (no C compiler "
                        "or Python headers at install time, or not Linux): %d listener(s) use "
                        "the Python relays", len(fallen_back))
        log.info("cacheport serving %d listener(s) from %s", len(self.listeners),
                 self.config.path)

    def _make_listener(self, lc: ListenerConfig) -> Listener:
        assert self.loop is not None and self._resolver is not None
        listener = Listener(lc, self.loop, self._pool(lc.buffer_size), self._resolver,
                            self._maybe_idle, reuse_port=self.reuse_port)
        if self.monitor is not None:
            listener.health = self.monitor.state
        return listener

    def _bind_admin(self, admin: AdminServer) -> AdminServer | None:
        """Bind the admin endpoint; a taken default port is a warning, a configured one fatal."""
        try:
            admin.bind()
        except AdminError as exc:
            if admin.config.explicit:
                raise
            log.warning("%s; serving without it (set admin.listen, or admin: off)", exc)
            return None
        return admin

    def _on_health_change(self, target: Target, transition: Transition) -> None:
        """``on_down: close``: cut the live connections to an upstream that went DOWN."""
        if transition.new is not State.DOWN:
            return
        listener = self.listeners.get(target.listener)
        if listener is not None and listener.config.on_down == "close":
            listener.close_upstream_connections(target.upstream)

    # -- listeners at run time (clusters) ---------------------------------------------

    def listeners_changed(self) -> None:
        """Check the upstreams of every listener served now, a cluster's node and role
        listeners included; unchanged (listener, upstream, check) targets keep their
        state and counts."""
        if self.monitor is not None:
            self.monitor.sync([listener.config for listener in self.listeners.values()])

    def add_listener(self, lc: ListenerConfig, relay_factory: RelayFactory | None = None
                     ) -> Listener:
        """Bind and start one more listener now; raises ``BindError`` or ``TlsError``."""
        if lc.name in self.listeners:
            raise BindError(f"listener {lc.name!r} exists already")
        listener = self._make_listener(lc)
        if relay_factory is not None:
            listener.relay_factory = relay_factory
        listener.bind()
        listener.start()
        self.listeners[lc.name] = listener
        return listener

    def remove_listener(self, name: str, drain_timeout: float | None = None) -> None:
        """Stop accepting on ``name`` now; its connections get ``drain_timeout`` to finish."""
        listener = self.listeners.pop(name)
        listener.stop_accepting()
        self._drain_later(listener, self.config.drain_timeout if drain_timeout is None
                          else drain_timeout)

    def _state_file(self, config: Config) -> StateFile | None:
        path = config.state_file
        return StateFile(path) if path is not None else None

    async def _apply_clusters(self, config: Config) -> None:
        """Start, reconfigure or close cluster managers to match ``config.clusters``."""
        wanted: dict[str, ClusterConfig] = {cc.name: cc for cc in config.clusters}
        state = self._state_file(config) if wanted else None
        for name in [n for n in self.clusters if n not in wanted]:
            await self.clusters.pop(name).close()
            log.info("cluster %s removed; its listeners drain", name)
        for name, cc in wanted.items():
            manager = self.clusters.get(name)
            if manager is None:
                manager = ClusterManager(cc, self, state)
                self.clusters[name] = manager
                await manager.start()
            elif manager.config != cc or (manager.state and manager.state.path) != (
                    state and state.path):
                await manager.reconfigure(cc, state)

    def cluster_status(self) -> list[dict[str, Any]]:
        """Every cluster's nodes, roles, slots and ports, for ``/status`` (JSON-ready)."""
        return [manager.status() for manager in self.clusters.values()]

    def _pool(self, size: int) -> BufferPool:
        return self._pools.setdefault(size, BufferPool(size))

    @staticmethod
    def _bind_all(listeners: list[Listener], handoff: dict[str, socket.socket]) -> None:
        """Bind each listener (or give it a socket being handed over); all or nothing."""
        bound: list[Listener] = []
        try:
            for listener in listeners:
                sock = handoff.get(str(listener.config.listen))
                if sock is not None:
                    listener.adopt(sock)
                else:
                    listener.bind()
                    bound.append(listener)
        except BindError:
            for listener in bound:
                listener.unbind()
            for listener in listeners:
                if str(listener.config.listen) in handoff:
                    listener.sock = None  # not ours to close
            raise

    # -- reload ----------------------------------------------------------------

    async def reload(self, config: Config) -> ReloadPlan:
        """Apply a validated config; on failure nothing has changed (``ReloadError``)."""
        if self._stopped or self._stopping is None or self._stopping.is_set():
            raise ReloadError("cacheport is stopping; reload ignored")
        plan = plan_reload(self.config, config)
        removed = [self.listeners[lc.name] for lc in plan.removed]
        # A listener re-created on the same address takes over the old socket, so
        # renaming a listener never closes its port, even for an instant.
        handoff = {str(old.config.listen): old.sock for old in removed if old.sock is not None}
        try:
            # Certificates are re-read on every reload, also for listeners otherwise unchanged.
            new_tls = {lc.name: ListenerTls(lc) for lc in config.listeners
                       if lc.name in self.listeners and (lc.tls or lc.upstream_tls)}
            added = [self._make_listener(lc) for lc in plan.added]
            self._bind_all(added, handoff)
        except (BindError, TlsError) as exc:
            self.reload_failures += 1
            raise ReloadError(f"{config.path}: {exc}; the running port map is unchanged") \
                from None
        taken = {str(listener.config.listen) for listener in added} & set(handoff)
        for old in removed:
            del self.listeners[old.name]
            if str(old.config.listen) in taken:
                old.release_socket()
            else:
                old.stop_accepting()
            self._drain_later(old, config.drain_timeout)
        for lc in plan.changed:
            self.listeners[lc.name].reconfigure(lc, self._pool(lc.buffer_size),
                                                new_tls.get(lc.name))
        for name in plan.unchanged:
            if name in new_tls:
                self.listeners[name].tls = new_tls[name]
        for listener in added:
            listener.start()
            self.listeners[listener.name] = listener
        self.config = config
        if self.loop is not None:  # new connections spread over the new count; live ones stay
            # where they are; busy_poll changes on live engines too
            configure_engines(self.loop, config.engine_threads, config.busy_poll_us)
        self.listeners_changed()
        if self.admin is not None and config.admin != self.admin_configured:
            log.warning("reload: the admin block changed; it takes effect at the next restart")
        await self._apply_clusters(config)  # clusters call listeners_changed themselves
        self.reloads += 1
        log.info("reloaded %s: %s", config.path, plan.summary())
        return plan

    def _drain_later(self, listener: Listener, timeout: float) -> None:
        """A removed listener's connections get ``timeout`` to finish, then are cut."""
        self.draining.add(listener)

        async def drain() -> None:
            try:
                if listener.active:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(timeout):
                            await listener.wait_idle()
                cut = listener.active
                listener.close_connections(closes.DRAINED)
                if cut:
                    log.info("listener %s removed: %d connection(s) cut after drain_timeout",
                             listener.name, cut)
            finally:
                self.draining.discard(listener)
                self._maybe_idle()

        assert self.loop is not None
        task = self.loop.create_task(drain())
        self._drain_tasks.add(task)
        task.add_done_callback(self._drain_tasks.discard)

    # -- stop ------------------------------------------------------------------

    def request_stop(self) -> None:
        """Safe from a signal handler: only sets events. A second request cuts at once."""
        if self._stopping is None:
            return
        if self.draining_since is None:
            self.draining_since = time.monotonic()  # /readyz fails from this moment
        if self._stopping.is_set() and self._cut_now is not None:
            self._cut_now.set()
        self._stopping.set()

    async def wait_stopping(self) -> None:
        assert self._stopping is not None, "start() first"
        await self._stopping.wait()

    async def stop(self, drain_timeout: float | None = None,
                   drain_delay: float | None = None) -> StopResult:
        """Say unready, keep accepting for ``drain_delay``, then stop accepting, let
        connections finish for ``drain_timeout`` and cut the rest.

        The delay is the load balancer's time to see /readyz fail and deregister this
        host (NLB: interval x unhealthy threshold), so no client is refused meanwhile.
        A second stop request ends the delay at once.
        """
        if self._stopped:
            return StopResult(0, 0)
        self._stopped = True
        if self._stopping is not None:
            self._stopping.set()
        if self.draining_since is None:
            self.draining_since = time.monotonic()
        delay = self.config.drain_delay if drain_delay is None else drain_delay
        if delay > 0 and self._cut_now is not None and not self._cut_now.is_set():
            log.info("unready; still accepting for drain_delay %gs", delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._cut_now.wait()
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        for manager in self.clusters.values():
            await manager.stop()
        everyone = [*self.listeners.values(), *self.draining]
        for listener in everyone:
            listener.stop_accepting()
        at_start = self.active
        if at_start and timeout > 0:
            log.info("draining %d connection(s) for up to %gs", at_start, timeout)
            await self._wait_drained(timeout)
        cut = self.active
        for listener in everyone:
            listener.close_connections()
        for task in list(self._drain_tasks):
            task.cancel()
        await asyncio.sleep(0)  # let cancelled connect tasks clean up
        if self.monitor is not None:
            await self.monitor.stop()
        if self.admin is not None:
            await self.admin.stop()
        result = StopResult(drained=max(at_start - cut, 0), cut=cut)
        log.info("cacheport stopped: %d connection(s) drained, %d cut", result.drained, result.cut)
        return result

    async def _wait_drained(self, grace: float) -> None:
        assert self._idle is not None and self._cut_now is not None
        self._idle.clear()
        self._maybe_idle()
        idle = asyncio.ensure_future(self._idle.wait())
        cut_now = asyncio.ensure_future(self._cut_now.wait())
        try:
            await asyncio.wait({idle, cut_now}, timeout=grace,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            cut_now.cancel()
        if self._cut_now.is_set():
            log.info("second stop signal: cutting connections now")

    def _maybe_idle(self) -> None:
        if self._idle is not None and not self.active:
            self._idle.set()

    @property
    def active(self) -> int:
        return sum(listener.active for listener in (*self.listeners.values(), *self.draining))
