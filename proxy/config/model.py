"""What a port map may hold: one pydantic model per YAML section, defined once.

The same classes validate a file (``load.py``), generate the JSON Schema that editors
use (``cacheport schema``) and the reference in docs/configuration.md
(``reference.py``). Each field's type comes from ``fields.py`` (the parser that reads
it, the JSON Schema of what YAML may write there) and its description here is its
documentation.

Cost, measured on a 500-listener map (2 shared vCPUs): importing pydantic and building
these classes adds about 90 ms of CPU to every process start; validating the listeners
costs what the hand-written checks did (load_config 110 vs 103 ms, nearly all of it
YAML parsing). Each parser runs once per value; nothing loops in Python per field.

A section validated here is the file as written; ``load.py`` then fills in
``defaults``, merges health checks and checks what spans fields and listeners, and
builds the dataclasses of ``resolved.py``. Which keys a listener set is
``model_fields_set``: a key left out inherits from ``defaults``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .fields import (
    OFF,
    ON,
    TEXT,
    AdminListen,
    Announce,
    Backups,
    BindHost,
    Bool,
    BusyPoll,
    CheckKind,
    CopyName,
    Count,
    Drain,
    EngineName,
    EnvName,
    FileName,
    Folder,
    IpAddress,
    Kind,
    Limit,
    Listen,
    LogFormatName,
    MaybeFile,
    MaybeUpstream,
    MaybeWord,
    Name,
    Networks,
    OnDownName,
    P,
    Password,
    Port,
    PortRange,
    ProtocolName,
    ProxyProtocolName,
    ReadableFile,
    RelayName,
    RoleName,
    S,
    Seconds,
    SecondsOrOff,
    ServerName,
    Size,
    Tags,
    Threads,
    Upstream,
    UserName,
    Word,
    Words,
    Workers,
    list_or_empty,
    or_forms,
    switch,
)
from .sni import parse_sni_pattern, parse_sni_upstream
from .values import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_AWS_FIRST_PORT,
    DEFAULT_AWS_INTERVAL,
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
)


class Section(BaseModel):
    """A YAML mapping: unknown keys are refused (with a "did you mean"), nothing is coerced."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @classmethod
    def yaml_keys(cls) -> dict[str, str]:
        """YAML key -> attribute, the section's own keys first (the reference's order)."""
        keys = _KEYS.get(cls)
        if keys is None:
            own = set(cls.__annotations__)
            fields = sorted(cls.model_fields.items(), key=lambda item: item[0] not in own)
            keys = _KEYS[cls] = {field.alias or name: name for name, field in fields}
            _ATTRS[cls] = {name: key for key, name in keys.items()}
        return keys

    def given(self) -> set[str]:
        """The YAML keys this mapping set (the rest inherit or take the default)."""
        type(self).yaml_keys()
        attrs = _ATTRS[type(self)]
        return {attrs[name] for name in self.model_fields_set}

    def get(self, key: str) -> Any:
        """The value of a YAML key."""
        return getattr(self, type(self).yaml_keys()[key])


_KEYS: dict[type[Section], dict[str, str]] = {}
_ATTRS: dict[type[Section], dict[str, str]] = {}


PASSWORD_KEYS = ("password", "password_env", "password_file")


class HealthSection(Section):
    """How a listener checks its upstream(s): HAProxy's defaults (inter 2s, rise 2, fall 3).

    ``health: on`` (the default) checks with these defaults, ``health: off`` turns checks
    off; a mapping in a listener overrides ``defaults``' health mapping key by key.
    """

    model_config = ConfigDict(title="health")

    kind: CheckKind = Field(
        None, json_schema_extra={"default": "the listener's protocol"},
        description="What to check: tcp (a connect), memcached (`version`, and `stats` if "
                    "asked) or redis (PING, with AUTH and ROLE if asked).")
    interval: Seconds = Field(DEFAULT_CHECK_INTERVAL, description="Time between checks.")
    timeout: Seconds = Field(
        DEFAULT_CHECK_TIMEOUT, json_schema_extra={"default": "1s, or the interval if shorter"},
        description="How long one check may take; at most the interval.")
    rise: Count = Field(DEFAULT_RISE,
                        description="Consecutive passed checks that bring a DOWN node UP.")
    fall: Count = Field(DEFAULT_FALL,
                        description="Consecutive failed checks that take an UP node DOWN.")
    stats: Bool = Field(False, description="memcached only: also read curr_connections "
                                           "with `stats`.")
    username: UserName = Field(
        None, description="redis only: the Redis 6 ACL / ElastiCache RBAC user to AUTH as.")
    password: Password = Field(
        None, description="redis only: the AUTH password. Never shown in errors, logs or "
                          "/status; prefer password_env or password_file.")
    password_env: EnvName = Field(
        None, description="redis only: the environment variable holding the password.")
    password_file: FileName = Field(
        None, description="redis only: a file holding the password (one line; relative to "
                          "the port map's folder).")
    role: RoleName = Field("any", description="redis only: `primary` also requires ROLE to "
                                              "say master (a replica counts as DOWN).")

    @model_validator(mode="before")
    @classmethod
    def _one_password_source(cls, data: Any) -> Any:
        """Two sources of one password is a mistake, said before any value is read (a
        password_env naming an unset variable would otherwise hide it)."""
        if isinstance(data, dict) and set(data) <= set(cls.yaml_keys()):
            given = [key for key in PASSWORD_KEYS if key in data]
            if len(given) > 1:
                raise PydanticCustomError(
                    "password_sources", "give only one of {keys}, got {given}",
                    {"keys": ", ".join(PASSWORD_KEYS), "given": " and ".join(given),
                     "second": given[1]})
        return data


class TlsSection(Section):
    """TLS for clients (termination): cacheport presents ``cert``; ``client_ca`` asks for
    client certificates (mutual TLS)."""

    model_config = ConfigDict(title="tls")

    cert: ReadableFile = Field(description="PEM certificate chain cacheport presents "
                                           "(relative to the port map's folder).")
    key: ReadableFile = Field(description="PEM private key of `cert`.")
    client_ca: MaybeFile = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it "
                          "signed (mutual TLS).")


class UpstreamTlsSection(Section):
    """TLS to the node (origination), for clusters with in-transit encryption; ``on`` uses
    these defaults."""

    model_config = ConfigDict(title="upstream_tls")

    server_name: ServerName = Field(
        None, json_schema_extra={"default": "the upstream's host"},
        description="Name to send (SNI) and to verify the node's certificate against.")
    ca: MaybeFile = Field(
        None, json_schema_extra={"default": "the system's trust store"},
        description="PEM CA bundle to verify the node's certificate with.")
    verify: Bool = Field(True, description="Verify the node's certificate and name; false "
                                           "only for tests.")


SniPattern = Annotated[str, P(parse_sni_pattern), S(TEXT), Kind("server name or *.suffix")]
SniUpstream = Annotated[Address, P(parse_sni_upstream), S(TEXT), Kind("host[:port]")]


class SniRouteSection(Section):
    """One entry of ``sni_routes``: clients asking for ``server_name`` go to ``upstream``."""

    model_config = ConfigDict(title="sni_route")

    server_name: SniPattern = Field(
        description="An exact name, or *.suffix for any one label before suffix; an exact "
                    "name wins over a wildcard.")
    upstream: SniUpstream = Field(
        description="host[:port] to pass the connection to; {sni} stands for the name the "
                    "client asked for. Without a port, the protocol's (6379, 11211).")


HealthSwitch = Annotated[HealthSection | None, BeforeValidator(
    switch(True, "off, on or a mapping of check settings")), Kind("health")]


class Tunables(Section):
    """Listener settings that ``defaults`` and ``clusters`` may also set."""

    connect_timeout: Seconds = Field(DEFAULT_CONNECT_TIMEOUT,
                                     description="How long connecting to the upstream may take.")
    idle_timeout: SecondsOrOff = Field(
        None, json_schema_extra={"default": "off"},
        description="Close a connection after this long without a byte either way.")
    buffer_size: Size = Field(DEFAULT_BUFFER_SIZE,
                              description="Bytes read at a time per direction (4k to 16m).")
    dns_ttl: Seconds = Field(DEFAULT_DNS_TTL, description="How long an upstream's resolved "
                                                          "DNS name is reused.")
    allow: Networks = Field(
        None, json_schema_extra={"default": "loopback listeners only"},
        description="Client CIDRs that may connect (a bare IP is one host). Required for "
                    "a listener reachable from other hosts; [0.0.0.0/0] opens it to everyone.")
    max_connections: Limit = Field(
        None, json_schema_extra={"default": "off"},
        description="Refuse new clients while this many connections are open.")
    max_connections_per_client: Limit = Field(
        None, json_schema_extra={"default": "off"},
        description="Refuse a client IP's new connections while it has this many open.")
    proxy_protocol: ProxyProtocolName = Field(
        "off", description="Read a PROXY protocol header (HAProxy, an AWS NLB) before "
                           "anything else: v1, v2 or any; the allow list, per-client limit, "
                           "logs and /status then use the client address it carries.")
    proxy_protocol_from: Networks = Field(
        None, json_schema_extra={"default": "required with proxy_protocol"},
        description="The load balancers' CIDRs: only they may send a header; a connection "
                    "from anywhere else is closed.")
    tls: Annotated[TlsSection | None, BeforeValidator(
        switch(False, "a mapping with cert, key, client_ca")), Kind("tls")] = Field(
        None, json_schema_extra=or_forms(*OFF), description="TLS for clients (see tls).")
    upstream_tls: Annotated[UpstreamTlsSection | None, BeforeValidator(
        switch(True, "a mapping with server_name, ca, verify")), Kind("upstream_tls")] = Field(
        None, json_schema_extra=or_forms(*ON, *OFF),
        description="TLS to the node: on, off, or a mapping (see upstream_tls).")
    on_down: OnDownName = Field(
        "keep", description="close: also cut live connections to a node that goes DOWN "
                            "(needs health checks).")
    # ``copy`` is the YAML key; the attribute may not shadow BaseModel.copy.
    copy_mode: CopyName = Field(
        "auto", alias="copy", description="How bytes move: splice(2) through a pipe, or a "
                                          "userspace buffer; auto picks (docs/hot-loop.md).")
    relay: RelayName = Field(
        "auto", description="Who moves them: the native engine's threads (TLS included, where "
                            "built with libssl) or Python; auto picks the engine where it is "
                            "built. On a cluster entry, auto and native frame and rewrite "
                            "replies in the engine; python keeps the Python rewriters.")
    health: HealthSwitch = Field(
        None, json_schema_extra=or_forms(*ON, *OFF, default="on"),
        description="Health checks: on (the default), off, or a mapping of settings (see "
                    "health).")
    log_connections: Bool = Field(
        False, description="Log one line per closed or refused connection: client, "
                           "upstream, start, duration, bytes each way and why it ended "
                           "(docs/operating.md, Logs).")


class DefaultsSection(Tunables):
    """Settings every listener (and cluster) inherits unless it sets its own."""

    model_config = ConfigDict(title="defaults")

    protocol: ProtocolName = Field(
        "tcp", description="What the upstream speaks: tcp, memcached or redis. Chooses the "
                           "health check and the upstream's default port (11211, 6379).")


class ListenerSection(Tunables):
    """One port on the NAT host and the cache node it forwards to."""

    # ``upstream`` is required unless ``sni_routes`` names the upstreams.
    model_config = ConfigDict(title="listener", json_schema_extra={
        "if": {"not": {"required": ["sni_routes"]}}, "then": {"required": ["upstream"]}})

    name: Name = Field(description="Unique name: letters, digits, '.', '_', '-' (at most 64); "
                                   "used in logs, metrics and /status.")
    listen: Listen = Field(description="Where to bind: host:port, [v6]:port, or a bare port "
                                       "for every IPv4 address; port 0 takes any free port.")
    upstream: MaybeUpstream = Field(
        None, json_schema_extra={"default": "required, unless sni_routes"},
        description="The cache node: host:port or [v6]:port; without a port, the protocol's "
                    "(none for tcp).")
    protocol: ProtocolName = Field(
        "tcp", description="What the upstream speaks: tcp, memcached or redis. Chooses the "
                           "health check and the upstream's default port (11211, 6379).")
    backup: Backups = Field(
        (), description="Nodes used in order while the upstream is DOWN (needs health "
                        "checks).")
    sni_routes: list[SniRouteSection] | None = Field(
        None, json_schema_extra={"default": "off", "minItems": 1},
        description="Instead of upstream: read the server name of each client's TLS "
                    "ClientHello without terminating TLS and pass the encrypted bytes to "
                    "the matching route's upstream (docs/clusters.md, 'An encrypted "
                    "Redis Cluster through one port'). No tls, upstream_tls, backup or "
                    "health on such a listener.")


class LoggingSection(Section):
    """How cacheport writes its log (to stderr)."""

    model_config = ConfigDict(title="logging")

    log_format: LogFormatName = Field(
        "text", description="text, or json: one JSON object per line (time, level, logger, "
                            "message and the event's fields). cacheport run --log-format "
                            "wins over it.")


class AdminSection(Section):
    """The HTTP admin endpoint (/, /metrics, /healthz, /readyz, /status, POST /-/reload);
    ``off`` disables it."""

    model_config = ConfigDict(title="admin")

    listen: AdminListen = Field(
        Address("127.0.0.1", DEFAULT_ADMIN_PORT),
        json_schema_extra={"default": f"127.0.0.1:{DEFAULT_ADMIN_PORT}"},
        description="Where to serve it; a bare port binds loopback.")
    ready_requires_healthy: Bool = Field(
        True, description="/readyz also needs one healthy (or unchecked) upstream, not only "
                          "bound ports.")
    allow: Networks = Field(
        None, json_schema_extra={"default": "every source"},
        description="Source CIDRs that may use the endpoint at all (a bare IP is one host); "
                    "others get 403. Set it when listen is beyond loopback.")
    token: Password = Field(
        None, description="The bearer token that write routes (POST /-/reload) require; "
                          "write it as ${VAR}, or use token_file. Never shown in logs, "
                          "errors or /status.")
    token_file: FileName = Field(
        None, description="A file holding the token (one line; relative to the port map's "
                          "folder).")
    insecure_writes: Bool = Field(
        False, description="Let write routes through without a token although listen is "
                           "beyond loopback (only behind a firewall you trust).")

    @model_validator(mode="before")
    @classmethod
    def _one_token_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and "token" in data and "token_file" in data:
            raise PydanticCustomError("token_sources",
                                      "give only one of token and token_file", {})
        return data


class ClusterSection(Tunables):
    """A cluster whose nodes cacheport discovers and gives one port each.

    Its listener settings (``allow``, timeouts, TLS...) apply to every node's listener;
    its ``health`` block also gives discovery its credentials (Redis ACL / RBAC).
    """

    model_config = ConfigDict(title="cluster")

    name: Name = Field(description="Unique name (also among listeners); node listeners "
                                   "are named after it.")
    engine: EngineName = Field(
        description="redis-cluster (CLUSTER SHARDS / SLOTS), redis-replication (cluster mode "
                    "disabled: ROLE, one primary and its replicas) or memcached (ElastiCache "
                    "auto-discovery).")
    seed: Upstream = Field(description="The configuration endpoint: host[:port]; without a "
                                       "port, the engine's (6379, 11211).")
    announce: Announce = Field(
        description="What clients are told to connect to: the NAT host's public IP or DNS "
                    "name, no port.")
    announce_ip: IpAddress = Field(
        "", json_schema_extra={"default": "announce, when it is an IP"},
        description="The ip field of memcached auto-discovery entries.")
    ports: PortRange = Field(description="First-last port (inclusive, at most 1024) for the "
                                         "nodes' listeners.")
    seed_port: Port = Field(None, description="A port outside the range that forwards to the "
                                              "configuration endpoint.")
    primary_port: Port = Field(
        None, description="redis-replication only: a port outside the range that always "
                          "forwards to the current primary (like ElastiCache's primary "
                          "endpoint).")
    reader_port: Port = Field(
        None, description="redis-replication only: a port outside the range that forwards "
                          "each new connection to the healthy replica with the fewest, or to "
                          "the primary when none is healthy (like the reader endpoint).")
    close_on_failover: Bool = Field(
        True, description="redis-replication only: when the primary changes, also close the "
                          "primary_port connections to the old one, so clients reconnect to "
                          "the new primary (as ElastiCache's primary endpoint does).")
    listen: BindHost = Field(
        "0.0.0.0", description="The address the nodes' listeners bind.")
    refresh: Seconds = Field(
        DEFAULT_REFRESH, json_schema_extra={"default": "30s; 5s for redis-replication"},
        description="Time between topology discoveries; for redis-replication also how soon "
                    "a failover is followed and a failed replica leaves reader_port.")
    retire_grace: Drain = Field(
        DEFAULT_RETIRE_GRACE, description="How long a node that left keeps its port for "
                                          "live connections.")


class AwsSection(Section):
    """Clusters read from the ElastiCache API (``pip install cacheport[aws]``), as
    ``cacheport import-aws`` would write them, re-read every ``interval``: caches that
    appear or disappear are added or removed by a reload, validated like any other (an
    answer that does not validate, or no answer, changes nothing). Their listeners inherit
    ``defaults`` (put ``allow`` there)."""

    model_config = ConfigDict(title="aws")

    region: Word = Field(description="The AWS region to describe, e.g. us-east-1.")
    announce: Announce = Field(description="What cluster clients are told to connect to: "
                                           "the NAT host's address, no port.")
    interval: Seconds = Field(DEFAULT_AWS_INTERVAL, json_schema_extra={"default": "5m"},
                              description="Time between reads of the API.")
    ids: Words = Field((), json_schema_extra={"default": "every cache"},
                       description="Only these replication groups / cache clusters / "
                                   "serverless caches.")
    tags: Tags = Field((), json_schema_extra={"default": "no filter"},
                       description="Only caches carrying every one of these tags (needs "
                                   "elasticache:ListTagsForResource).")
    first_port: Port = Field(DEFAULT_AWS_FIRST_PORT,
                             description="Ports are handed out upwards from here; a cache "
                                         "keeps its block while it exists.")
    listen: BindHost = Field("0.0.0.0", description="The address the listeners bind.")
    profile: MaybeWord = Field(None, json_schema_extra={"default": "boto3's default chain"},
                               description="A named profile from the shared AWS config.")


class PortMap(Section):
    """A whole port map: listeners, clusters and process-wide settings."""

    model_config = ConfigDict(title="cacheport port map")

    defaults: DefaultsSection = Field(
        default_factory=DefaultsSection,  # type: ignore[arg-type]
        description="Settings every listener and cluster inherits.")
    listeners: list[ListenerSection] | None = Field(
        None, json_schema_extra=list_or_empty,
        description="The ports to forward (at least one, unless there are clusters).")
    clusters: list[ClusterSection] | None = Field(
        None, json_schema_extra=list_or_empty,
        description="Clusters whose nodes are discovered and given a port each.")
    drain_delay: Drain = Field(
        DEFAULT_DRAIN_DELAY, description="On stop (SIGTERM), how long /readyz says unready "
                                         "while listeners keep accepting, so a load balancer "
                                         "deregisters the host first; 0 or off: stop at once.")
    drain_timeout: Drain = Field(
        DEFAULT_DRAIN_TIMEOUT, description="On stop or reload, how long live connections may "
                                           "finish before they are closed; 0 or off: at once.")
    workers: Workers = Field(
        1, description="Worker processes sharing the ports (SO_REUSEPORT); auto: one per CPU.")
    engine_threads: Threads = Field(
        None, json_schema_extra={"default": "auto"},
        description="Native relay threads per process; auto: the CPUs shared among workers.")
    busy_poll: BusyPoll = (
        Field(DEFAULT_BUSY_POLL_US, json_schema_extra={"default": "50us"},
              description="How long the native engine polls after a batch before it sleeps "
                          "(at most 1000us); off: sleep at once."))
    admin: Annotated[AdminSection | None, BeforeValidator(
        switch(False, "off or a mapping with 'listen'")), Kind("admin")] = Field(
        None, json_schema_extra=or_forms(*OFF, default="127.0.0.1:9180, see admin"),
        description="The admin endpoint (see admin); off disables it. Without this key it "
                    "listens on 127.0.0.1:9180 and a taken port is only a warning.")
    state_dir: Folder = Field(
        None, json_schema_extra={"default": "next to the port map"},
        description="Where cluster port assignments persist across restarts.")
    aws: Annotated[AwsSection | None, Kind("aws")] = Field(
        None, description="Clusters read from the ElastiCache API on an interval (see aws).")
    logging: Annotated[LoggingSection, Kind("logging")] = Field(
        default_factory=LoggingSection,  # type: ignore[arg-type]
        description="How the log is written (see logging).")


SECTIONS: tuple[type[Section], ...] = (PortMap, ListenerSection, DefaultsSection,
                                       HealthSection, TlsSection, UpstreamTlsSection,
                                       SniRouteSection,
                                       AdminSection, ClusterSection, AwsSection,
                                       LoggingSection)
