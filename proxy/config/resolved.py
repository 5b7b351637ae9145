"""What the proxy runs with: the port map resolved into frozen dataclasses.

``model.py`` says what a port map may hold; the loader validates a file against it,
fills in ``defaults`` and builds these. They stay plain dataclasses because the
running proxy derives new ones with ``dataclasses.replace`` (a cluster node's listener
from its cluster's template, the admin endpoint's bound port), compares them to plan a
reload, and keys dictionaries with them; none of that should re-run validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .sni import SniRoute, route
from .values import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_BUFFER_SIZE,
    DEFAULT_BUSY_POLL_US,
    DEFAULT_CHECK_INTERVAL,
    DEFAULT_CHECK_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DNS_TTL,
    DEFAULT_DRAIN_DELAY,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_FALL,
    DEFAULT_REFRESH,
    DEFAULT_RETIRE_GRACE,
    DEFAULT_RISE,
    Address,
    Copy,
    Engine,
    LogFormat,
    Network,
    OnDown,
    Protocol,
    ProxyProtocol,
    RedisRole,
    RelayKind,
    Secret,
)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """How one listener checks its upstream(s); HAProxy's defaults (inter 2s, rise 2, fall 3)."""

    kind: Protocol
    interval: float = DEFAULT_CHECK_INTERVAL
    timeout: float = DEFAULT_CHECK_TIMEOUT
    rise: int = DEFAULT_RISE
    fall: int = DEFAULT_FALL
    stats: bool = False  # memcached: also read curr_connections with ``stats``
    username: str | None = None  # redis: Redis 6 ACL / ElastiCache RBAC user
    password: Secret | None = field(default=None, repr=False)
    role: RedisRole = "any"  # redis: ``primary`` also requires ROLE to say master


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS for clients (termination): cacheport presents ``cert``; ``client_ca`` asks for
    client certificates (mutual TLS)."""

    cert: str
    key: str
    client_ca: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamTlsConfig:
    """TLS to the node (origination), for clusters with in-transit encryption."""

    server_name: str | None = None  # default: the upstream's host
    ca: str | None = None  # default: the system's trust store
    verify: bool = True


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One port on the NAT host and the cache node it forwards to."""

    name: str
    listen: Address
    upstream: Address
    protocol: Protocol = "tcp"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float | None = None
    buffer_size: int = DEFAULT_BUFFER_SIZE
    dns_ttl: float = DEFAULT_DNS_TTL
    allow: tuple[Network, ...] | None = None  # None: loopback listeners only (validated)
    max_connections: int | None = None
    max_connections_per_client: int | None = None
    proxy_protocol: ProxyProtocol = "off"  # read a PROXY header first: v1, v2 or any
    proxy_protocol_from: tuple[Network, ...] | None = None  # who may send one
    tls: TlsConfig | None = None
    upstream_tls: UpstreamTlsConfig | None = None
    health: HealthConfig | None = None  # None: not checked, always used
    backup: tuple[Address, ...] = ()  # used in order while the upstream is DOWN
    on_down: OnDown = "keep"  # close: also cut live connections to a node that goes DOWN
    copy: Copy = "auto"  # how bytes move: splice(2) or a buffer
    relay: RelayKind = "auto"  # who moves them: the native engine thread, or Python
    log_connections: bool = False  # one log line per closed or refused connection
    # Routed by the ClientHello's server name, TLS passed through (``upstream`` is then the
    # first route's, for display only: nothing dials it).
    sni_routes: tuple[SniRoute, ...] = ()

    def sni_target(self, name: str) -> Address | None:
        """Where a client asking for ``name`` goes (sni_routes), or None: no route."""
        found = route(self.sni_routes, name)
        return found.target(name) if found is not None else None

    @property
    def may_splice(self) -> bool:
        """Only bytes cacheport need not see can skip userspace: no TLS on either leg.

        ``protocol`` only chooses the health check; a listener never parses its stream
        (cluster listeners, which rewrite, bring their own relay and never splice).
        """
        return self.tls is None and self.upstream_tls is None

    @property
    def allows_everyone(self) -> bool:
        return self.allow is not None and any(net.prefixlen == 0 for net in self.allow)

    @property
    def upstreams(self) -> tuple[Address, ...]:
        """The upstream first, then the backups: the order new connections try them in."""
        return (self.upstream, *self.backup)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The HTTP admin endpoint (/metrics, /healthz, /readyz, /status)."""

    listen: Address = Address("127.0.0.1", DEFAULT_ADMIN_PORT)  # noqa: RUF009 (frozen)
    # /readyz also needs at least one healthy (or unchecked) upstream, not only bound ports
    ready_requires_healthy: bool = True
    # False when the YAML has no admin block: then a taken port is a warning, not a failure
    explicit: bool = False
    allow: tuple[Network, ...] | None = None  # None: every source
    token: Secret | None = None  # what write routes require (Secret: never printed)
    insecure_writes: bool = False  # off loopback without a token, writes pass anyway


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """A cluster whose nodes cacheport discovers and gives one port each (``clusters:``).

    ``template`` carries the listener settings every node's listener gets (allow list,
    timeouts, TLS); its ``listen`` host is the bind address and its ``upstream`` the seed.
    """

    name: str
    engine: Engine
    seed: Address
    announce: str  # what clients are told: the NAT host's public IP or DNS name
    announce_ip: str  # the ip field of auto-discovery entries ("" when unknown)
    ports: tuple[int, int]  # first and last port, inclusive
    template: ListenerConfig
    seed_port: int | None = None
    refresh: float = DEFAULT_REFRESH
    retire_grace: float = DEFAULT_RETIRE_GRACE
    primary_port: int | None = None  # redis-replication: always the current primary
    reader_port: int | None = None  # redis-replication: least-connections over replicas
    close_on_failover: bool = True  # redis-replication: cut primary_port links to an old primary

    @property
    def listen_host(self) -> str:
        return self.template.listen.host

    @property
    def port_count(self) -> int:
        return self.ports[1] - self.ports[0] + 1

    def addresses(self) -> list[Address]:
        """Every address this cluster may bind: its whole range and its seed port."""
        ports = list(range(self.ports[0], self.ports[1] + 1))
        ports += [p for p in (self.seed_port, self.primary_port, self.reader_port)
                  if p is not None]
        return [Address(self.listen_host, p) for p in ports]


@dataclass(frozen=True, slots=True)
class AwsConfig:
    """The ``aws:`` source: which caches to read from the ElastiCache API, how often."""

    region: str
    announce: str
    interval: float
    ids: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    first_port: int = 30000
    listen: str = "0.0.0.0"
    profile: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """A whole validated port map."""

    path: str
    listeners: tuple[ListenerConfig, ...]
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    drain_delay: float = DEFAULT_DRAIN_DELAY  # unready but still accepting, on stop
    workers: int = 1
    engine_threads: int | None = None  # native relay threads per process; None: auto
    busy_poll_us: float = DEFAULT_BUSY_POLL_US  # engine polls this long after a batch; 0: off
    admin: AdminConfig | None = AdminConfig()  # None: ``admin: off``
    clusters: tuple[ClusterConfig, ...] = ()
    state_dir: str | None = None  # where cluster port assignments persist (None: in memory)
    aws: AwsConfig | None = None  # clusters read from the ElastiCache API on an interval
    log_format: LogFormat = "text"  # logging.log_format; --log-format wins

    def listener(self, name: str) -> ListenerConfig:
        for lc in self.listeners:
            if lc.name == name:
                return lc
        raise KeyError(name)

    @property
    def state_file(self) -> str | None:
        """The JSON file that keeps cluster port assignments across restarts.

        ``state_dir/cacheport-state.json`` when set, else ``<port map>.state.json`` next
        to the YAML; None for a config that did not come from a file.
        """
        if self.state_dir is not None:
            return str(Path(self.state_dir) / "cacheport-state.json")
        if self.path.startswith("<"):
            return None
        return str(Path(self.path).with_suffix(".state.json"))
