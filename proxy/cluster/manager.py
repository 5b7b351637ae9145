"""One cluster: discover its nodes, give each a port, keep a rewriting listener per node.

::

    refresh (every `refresh`, and at once after a MOVED or an unmapped node)
      discover ---> Discovery(nodes) ---> PortBook.assign ---> StateFile
                                              |
                                              v
      reconcile: add a listener per new node, reconfigure a node whose IP changed,
                 remove (drain) the listener of a node that left; its port rests
                 for `retire_grace` before another node may have it

    client --> listener <cluster>:<port> --> RewritingRelay(rewriter) --> that node

A replication group (``redis-replication``, cluster mode disabled) needs no rewriting:
its listeners keep the plain relays (the native engine where built), and it adds two
role listeners whose upstream follows the topology (``replication.py`` decides)::

    client --> <cluster>:primary --> the current master (retargeted on failover)
    client --> <cluster>:reader  --> least-connections healthy replica, else the master

The manager does the I/O -- the refresh task, discovery, the state file -- and asks the
listener host (the ``Server``) to bind, start and drain listeners. What it decides is
pure: ``ports.py`` (which port), ``topology.py`` (which listeners, which node maps);
``node_relays.py`` makes a node listener's relays. Mappers read plain dicts that a
refresh replaces whole, so relays never see a half-updated table.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import Address, ClusterConfig, ListenerConfig
from ..listener import BindError, Listener
from ..protocols.memcache import AutoDiscoveryNode, announce_mapper
from ..relay.engine import new_node_map
from ..relaypick import RelayFactory
from ..tls import TlsError
from . import topology
from .discovery import Discovery, DiscoveryError, Node, discover
from .node_relays import McRelays, RedisRelays
from .ports import PortBook, PortChanges, StateError, StateFile
from .replication import choose_reader, failed_over

log = logging.getLogger("cacheport.cluster")

MIN_INTERVAL = 1.0  # refreshes asked for by redirects run at most this often
KNOWN_NODES_ASKED = 3  # besides the seed, how many known nodes a refresh may ask
MAX_RESERVED = 16  # ports reserved for nodes named in replies but not yet discovered


class ListenerHost(Protocol):
    """What the manager needs from the ``Server``: listeners added and removed at run time."""

    listeners: dict[str, Listener]

    def add_listener(self, lc: ListenerConfig, relay_factory: RelayFactory | None = None
                     ) -> Listener: ...

    def remove_listener(self, name: str) -> None: ...

    def listeners_changed(self) -> None:
        """Called after the manager added, reconfigured or removed listeners."""
        ...


@dataclass
class ClusterStats:
    """Counters for metrics and ``/status``; plain integers."""

    refreshes: int = 0
    refresh_failures: int = 0
    port_range_full: int = 0  # refreshes that found a node no free port for
    redirects: int = 0  # MOVED/ASK replies rewritten
    unmapped: int = 0  # node addresses seen in replies before they had a port
    bind_failures: int = 0
    protocol_errors: int = 0  # connections closed because a peer broke the protocol
    listeners_added: int = 0
    listeners_removed: int = 0
    failovers: int = 0  # redis-replication: times the primary moved to another node


class ClusterManager:
    """Keeps one cluster's per-node listeners in step with the cluster."""

    def __init__(self, config: ClusterConfig, host: ListenerHost,
                 state: StateFile | None = None) -> None:
        self.config = config
        self.host = host
        self.state = state
        self.stats = ClusterStats()
        self.book = PortBook(config.ports[0], config.ports[1], config.retire_grace)
        self.nodes: dict[str, Node] = {}  # identity -> node, as last discovered
        self.unassigned: tuple[str, ...] = ()
        # Nodes whose port is not the one a host without state would give: id -> (port,
        # that port). Empty: every host serving this cluster agrees (cluster/ports.py).
        self.off_canonical: dict[str, tuple[int, int | None]] = {}
        self.discovery: Discovery | None = None
        self.last_error: str | None = None
        self.last_refresh: float | None = None  # wall clock of the last successful refresh
        self._owned: dict[str, ListenerConfig] = {}  # listener name -> its config
        self._redis_map: dict[tuple[str, int], tuple[str, int]] = {}
        self._redis_ids: dict[str, tuple[str, int]] = {}  # node id -> (announce, its port)
        self._nodemap = new_node_map()  # _redis_map for the engine's framer (None: not built)
        self._mc_ports: dict[str, int] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._refresh_lock: asyncio.Lock | None = None
        self._last_started = -MIN_INTERVAL
        self._state_warned = False
        self._logged_unassigned: tuple[str, ...] = ()
        self._reserved: dict[str, int] = {}  # identity -> port, named in a reply, not discovered

    @property
    def name(self) -> str:
        return self.config.name

    def listener_name(self, port: int | None) -> str:
        """``<cluster>:<port>`` for a node, ``<cluster>:seed`` for the seed listener."""
        return topology.listener_name(self.name, port)

    def role_listener_name(self, role: str) -> str:
        """``<cluster>:primary`` / ``<cluster>:reader``: a replication group's role ports."""
        return topology.role_listener_name(self.name, role)

    @property
    def primary(self) -> Node | None:
        """redis-replication: the node discovery last found to be master."""
        return topology.primary_of(self.nodes.values())

    def healthy_replicas(self) -> list[Address]:
        """redis-replication: replicas in sync with the master, in port order."""
        return topology.healthy_replicas(self.nodes, self.book)

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """First refresh (bounded); if it fails, serve the nodes the state file remembers."""
        self._wake = asyncio.Event()
        self._refresh_lock = asyncio.Lock()
        remembered = self._load_state()
        if not await self.refresh("start") and remembered:
            log.warning("cluster %s: serving the %d node(s) remembered in %s until discovery "
                        "works", self.name, len(remembered), self.state and self.state.path)
            self._apply(remembered)
        elif self.discovery is None:
            self._reconcile()  # the seed listener at least
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop refreshing; the listeners are left to the server's own stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def close(self) -> None:
        """The cluster left the port map: stop refreshing and drain all its listeners."""
        await self.stop()
        if self._owned:
            for name in list(self._owned):
                self._remove(name)
            self.host.listeners_changed()

    async def reconfigure(self, config: ClusterConfig, state: StateFile | None) -> None:
        """A reload changed this cluster: new settings apply to every listener at once."""
        self.config = config
        self.state = state
        self.book.low, self.book.high = config.ports
        self.book.grace = config.retire_grace
        if not await self.refresh("reload"):
            self._apply(list(self.nodes.values()))

    def request_refresh(self) -> None:
        """Refresh soon (at most once per ``MIN_INTERVAL``); safe from any callback."""
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.refresh):
                    await self._wake.wait()
            reason = "redirect or unmapped node" if self._wake.is_set() else "timer"
            wait = self._last_started + MIN_INTERVAL - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # coalesce a burst of redirects into one refresh
            self._wake.clear()
            await self.refresh(reason)

    # -- refresh ----------------------------------------------------------------------

    async def refresh(self, reason: str = "manual") -> bool:
        """Discover and apply; False (logged, counted) when no node answered."""
        assert self._refresh_lock is not None, "start() first"
        async with self._refresh_lock:
            self._last_started = asyncio.get_running_loop().time()
            template = self.config.template
            known = sorted(self.nodes.values(), key=lambda n: n.role != "master")
            candidates = [self.config.seed, *[n.address for n in known][:KNOWN_NODES_ASKED]]
            names = {n.address: n.hostname for n in known if n.hostname}
            try:
                health = template.health
                auth = ((health.username, health.password)
                        if health is not None and health.password is not None else None)
                found = await discover(self.config.engine, candidates, template.upstream_tls,
                                       max(template.connect_timeout, 1.0) * 2, names, auth)
            except DiscoveryError as exc:
                self.stats.refresh_failures += 1
                if exc.args[0] != self.last_error:
                    log.error("cluster %s: discovery failed (%s): %s", self.name, reason, exc)
                self.last_error = str(exc)
                return False
            self.stats.refreshes += 1
            if self.last_error is not None:
                log.info("cluster %s: discovery works again", self.name)
            self.last_error = None
            self.last_refresh = time.time()
            self.discovery = found
            self._apply(list(found.nodes))
            return True

    def _apply(self, nodes: list[Node]) -> None:
        old_primary = self.primary
        by_id = {n.identity: n for n in nodes}
        unconfirmed = set(self._reserved) - set(by_id)
        changes = self._assign(list(by_id))
        self._reserved.clear()
        for identity in unconfirmed:
            log.warning("cluster %s: %s was named in a reply but discovery does not list it; "
                        "its reserved port %d is released", self.name, identity,
                        changes.retired.pop(identity, 0))
        self.nodes = by_id
        self._persist()
        for identity, port in changes.added.items():
            log.info("cluster %s: node %s (%s) gets port %d", self.name, identity,
                     by_id[identity].address, port)
        for identity, port in changes.retired.items():
            log.info("cluster %s: node %s left; its listener on port %d drains and the port "
                     "rests for %gs", self.name, identity, port, self.config.retire_grace)
        self.unassigned = changes.unassigned
        if changes.unassigned:
            self.stats.port_range_full += 1
            if changes.unassigned != self._logged_unassigned:
                log.error("cluster %s: port range %d-%d is full; %d node(s) have no listener: "
                          "%s (widen 'ports'; existing nodes are unaffected)", self.name,
                          *self.config.ports, len(changes.unassigned),
                          ", ".join(changes.unassigned))
        self._logged_unassigned = changes.unassigned
        self._note_off_canonical()
        self._reconcile()
        new_primary = self.primary
        # Only a replication group has one primary: in a cluster, "the first master"
        # changes whenever a node joins, which is no failover.
        if self.config.engine == "redis-replication" and old_primary is not None and \
                new_primary is not None and failed_over(old_primary.address,
                                                        new_primary.address):
            self.stats.failovers += 1
            log.warning("cluster %s: the primary is now %s (was %s)", self.name,
                        new_primary.address, old_primary.address)
            listener = self.host.listeners.get(self.role_listener_name("primary"))
            if listener is not None and self.config.close_on_failover:
                listener.close_upstream_connections(old_primary.address)

    def _note_off_canonical(self) -> None:
        """Say once, when it changes, which nodes another host may map to other ports."""
        off = self.book.off_canonical()
        if off != self.off_canonical and off:
            log.warning("cluster %s: %d node(s) hold a port a host started without state "
                        "would not give them, so hosts behind one load balancer may disagree "
                        "(docs/clusters.md, 'Several hosts'): %s", self.name, len(off),
                        ", ".join(f"{i} has {p}, fresh {w}" for i, (p, w) in off.items()))
        elif self.off_canonical and not off:
            log.info("cluster %s: every node's port is canonical again", self.name)
        self.off_canonical = off

    def _assign(self, identities: list[str]) -> PortChanges:
        """Assign ports, through the state file when there is one (other workers share it).

        Reservations keep their port if the cluster confirms the node; the others are
        freed at once rather than retired.
        """
        now = time.time()
        release = set(self._reserved) - set(identities)
        if self.state is not None:
            result: list[PortChanges] = []

            def change(entry: dict[str, Any]) -> dict[str, Any]:
                self.book.load_json(entry.get("ports"))
                self.book.keep_reserved(self._reserved)
                result.append(self.book.assign(identities, now))
                self.book.release(release)
                return {**entry, "ports": self.book.to_json()}

            try:
                self.state.update_cluster(self.name, change)
                return result[0]
            except StateError as exc:
                self._warn_state(exc)
                if result:
                    return result[0]
        changes = self.book.assign(identities, now)
        self.book.release(release)
        return changes

    def _persist(self) -> None:
        """Remember the nodes' addresses, so a restart can serve them before discovery."""
        if self.state is None:
            return
        nodes = topology.nodes_to_json(self.nodes.values())

        def change(entry: dict[str, Any]) -> dict[str, Any]:
            return {**entry, "ports": self.book.to_json(), "nodes": nodes,
                    "refreshed": self.last_refresh}

        try:
            self.state.update_cluster(self.name, change)
        except StateError as exc:
            self._warn_state(exc)

    def _load_state(self) -> list[Node]:
        if self.state is None:
            return []
        try:
            entry = self.state.read_cluster(self.name)
        except StateError as exc:
            self._warn_state(exc)
            return []
        self.book.load_json(entry.get("ports"))
        return topology.nodes_from_json(entry.get("nodes"))

    def _warn_state(self, exc: StateError) -> None:
        if not self._state_warned:
            log.warning("cluster %s: %s; port assignments are kept in memory only", self.name,
                        exc)
            self._state_warned = True

    # -- listeners --------------------------------------------------------------------

    def _reconcile(self) -> None:
        desired = topology.desired_listeners(self.config, self.nodes, self.book)
        before = dict(self._owned)
        for name in [n for n in self._owned if n not in desired]:
            self._remove(name)
        for name, (lc, _identity) in desired.items():
            old = self._owned.get(name)
            if old is not None and name in self.host.listeners and old.listen == lc.listen:
                if old != lc:
                    self.host.listeners[name].reconfigure(lc)
                    self._owned[name] = lc
                    if old.upstream != lc.upstream:
                        log.info("cluster %s: listener %s now forwards to %s (was %s)",
                                 self.name, name, lc.upstream, old.upstream)
                continue
            if old is not None:
                self._remove(name)
            try:
                listener = self.host.add_listener(lc, self._relay_factory(lc))
            except (BindError, TlsError) as exc:
                self.stats.bind_failures += 1
                log.error("cluster %s: %s; will retry at the next refresh", self.name, exc)
                continue
            if name == self.role_listener_name("reader"):
                listener.chooser = self._reader_chooser(listener)
                listener.candidates = self.healthy_replicas
            self.stats.listeners_added += 1
            self._owned[name] = lc
        self._rebuild_maps(desired)
        if self._owned != before:
            self.host.listeners_changed()  # their nodes are checked like any upstream

    def _remove(self, name: str) -> None:
        self._owned.pop(name, None)
        if name in self.host.listeners:
            self.host.remove_listener(name)
            self.stats.listeners_removed += 1

    def _rebuild_maps(self, desired: topology.Desired) -> None:
        """Only nodes whose listener is up are mapped; the rest count as unmapped."""
        maps = topology.node_maps(self.config.announce, desired, self._owned, self.nodes)
        self._redis_map = maps.redis
        self._redis_ids = maps.redis_ids
        if self._nodemap is not None:
            self._nodemap.swap(maps.engine_entries())
        self._mc_ports = maps.mc_ports

    # -- relays -----------------------------------------------------------------------

    def map_redis(self, host: str, port: int) -> tuple[str, int] | None:
        """Internal node endpoint -> ``(announce, its port)``; None if it has no listener."""
        return self._redis_map.get((host, port))

    def map_redis_id(self, node_id: str) -> tuple[str, int] | None:
        """Node id -> ``(announce, its port)``, for entries with a blank endpoint (a node that
        does not know its own address lists itself as ``""``, NULL or ``?``)."""
        return self._redis_ids.get(node_id)

    def _mc_port(self, entry: AutoDiscoveryNode) -> int | None:
        """The port for an auto-discovery entry; a node new to cacheport gets one reserved.

        A client caches a config version until the version changes, so an entry passed
        through with its private address would stick. A node seen here first gets a port
        reserved at once (the reply goes out with it) and an immediate refresh; only that
        refresh, which asks the configuration endpoint itself, binds a listener -- a
        client that stored a forged ``AmazonElastiCache:cluster`` value never gets one,
        and its reservation is released, not retired.
        """
        port = self._mc_ports.get(entry.hostname)
        known = self.nodes.get(entry.hostname)
        if known is None or known.address != Address(entry.ip or entry.hostname, entry.port):
            self.request_refresh()  # new, or moved: the next refresh binds / retargets
        if port is None and known is None:
            port = self.book.port_of(entry.hostname)
            if port is None and len(self._reserved) < MAX_RESERVED:
                port = self.book.reserve(entry.hostname)
                if port is not None:
                    self._reserved[entry.hostname] = port
                    log.info("cluster %s: auto-discovery reply names new node %s; port %d "
                             "reserved until discovery confirms it", self.name,
                             entry.hostname, port)
        return port

    def _on_unmapped(self, *_what: object) -> None:
        self.stats.unmapped += 1
        self.request_refresh()

    def _on_protocol_error(self, _who: str) -> None:
        self.stats.protocol_errors += 1

    def _reader_chooser(self, listener: Listener) -> Callable[[ListenerConfig], Address | None]:
        """reader_port's upstream per connection: least connections over healthy replicas."""
        turn = 0

        def choose(config: ListenerConfig) -> Address | None:
            nonlocal turn
            turn += 1
            counts: dict[Address, int] = {}
            for address in listener.book.relays.values():
                counts[address] = counts.get(address, 0) + 1
            return choose_reader(self.healthy_replicas(), counts, config.upstream, turn)

        return choose

    def _relay_factory(self, lc: ListenerConfig) -> RelayFactory | None:
        """None: the plain relays (native engine, splice); replication needs no rewriting."""
        if self.config.engine == "redis-replication":
            return None
        if self.config.engine == "memcached":
            mapper = announce_mapper(self.config.announce, self.config.announce_ip,
                                     self._mc_port)
            return McRelays(mapper, new_node_map(memcache=True), self._on_unmapped,
                            self._on_protocol_error)
        return RedisRelays((lc.upstream.host, lc.upstream.port), map_redis=self.map_redis,
                           by_id=self.map_redis_id, nodemap=self._nodemap,
                           on_unmapped=self._on_unmapped, on_redirects=self._redirects_seen,
                           on_protocol_error=self._on_protocol_error)

    def _redirects_seen(self, count: int) -> None:
        self.stats.redirects += count
        self.request_refresh()

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The cluster as ``cacheport status`` and ``/status`` show it (JSON-ready)."""
        cfg = self.config
        nodes = []
        for identity, node in sorted(self.nodes.items(),
                                     key=lambda kv: (self.book.port_of(kv[0]) or 1 << 20)):
            port = self.book.port_of(identity)
            listener = self.host.listeners.get(self.listener_name(port)) if port else None
            nodes.append({
                "id": identity,
                "address": str(node.address),
                "hostname": node.hostname,
                "role": node.role,
                "health": node.health,
                "slots": [list(r) for r in node.slots],
                "port": port,
                "listening": listener is not None and listener.accepting,
                "connections": listener.active if listener is not None else 0,
            })
        seed_listener = (self.host.listeners.get(self.listener_name(None))
                         if cfg.seed_port is not None else None)
        return {
            "name": cfg.name,
            "engine": cfg.engine,
            "seed": str(cfg.seed),
            "seed_port": cfg.seed_port,
            "seed_listening": seed_listener is not None and seed_listener.accepting,
            "primary_port": cfg.primary_port,
            "reader_port": cfg.reader_port,
            "primary": str(self.primary.address) if self.primary is not None else None,
            "announce": cfg.announce,
            "ports": f"{cfg.ports[0]}-{cfg.ports[1]}",
            "source": self.discovery.source if self.discovery else None,
            "queried": self.discovery.queried if self.discovery else None,
            "config_version": self.discovery.version if self.discovery else None,
            "last_refresh": self.last_refresh,
            "last_error": self.last_error,
            "nodes": nodes,
            "unassigned": list(self.unassigned),
            "ports_canonical": not self.off_canonical,
            "off_canonical": {i: {"port": p, "canonical": w}
                              for i, (p, w) in self.off_canonical.items()},
            "retired": [{"port": p, "id": r.identity, "until": r.until}
                        for p, r in sorted(self.book.retired.items())],
            "stats": dataclasses.asdict(self.stats),
        }
