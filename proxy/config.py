"""The YAML port map, validated into frozen dataclasses.

Everything is checked before anything binds: a bad file raises one ``ConfigError``
that names the file, the YAML line, the listener and the field, and what was
expected. Nothing here touches a socket, so a reload can build and compare a
new ``Config`` without disturbing the running one.
"""

from __future__ import annotations

import contextvars
import difflib
import ipaddress
import os
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import yaml

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Protocol = Literal["tcp", "memcached", "redis"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "memcached", "redis")
Copy = Literal["auto", "splice", "buffer"]
COPY_MODES: tuple[Copy, ...] = ("auto", "splice", "buffer")
RelayKind = Literal["auto", "native", "python"]
RELAY_KINDS: tuple[RelayKind, ...] = ("auto", "native", "python")
DEFAULT_PORTS: dict[str, int] = {"memcached": 11211, "redis": 6379}
Engine = Literal["redis-cluster", "memcached"]
ENGINES: tuple[Engine, ...] = ("redis-cluster", "memcached")
ENGINE_PROTOCOL: dict[str, Protocol] = {"redis-cluster": "redis", "memcached": "memcached"}
DEFAULT_REFRESH = 30.0
DEFAULT_RETIRE_GRACE = 600.0
MAX_CLUSTER_PORTS = 1024

DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_BUFFER_SIZE = 64 * 1024
DEFAULT_DRAIN_TIMEOUT = 30.0
# The native engine polls this long after each batch before it sleeps (docs/hot-loop.md):
# on a virtual CPU a wake-up from sleep costs tens of µs, more than the relay itself.
DEFAULT_BUSY_POLL_US = 50.0
MAX_BUSY_POLL_US = 1000.0
DEFAULT_ADMIN_PORT = 9180
DEFAULT_CHECK_INTERVAL = 2.0  # HAProxy's inter 2s, rise 2, fall 3
DEFAULT_CHECK_TIMEOUT = 1.0

OnDown = Literal["keep", "close"]
RedisRole = Literal["any", "primary"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(k|kb|kib|m|mb|mib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
               "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20}
_DURATION_UNITS = {None: 1.0, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlevel = 2


def _show(value: Any) -> str:
    """A short repr for error messages, whatever the YAML held (huge, deeply nested)."""
    return _REPR.repr(value)


class ConfigError(Exception):
    """A port map that cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Address:
    """A ``host:port`` pair; the host is an IP literal or a DNS name."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::")

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


class Secret:
    """A password that never shows itself: ``repr``, ``str`` and f-strings print ``***``.

    Only ``reveal()`` gives the value, and only the redis checker calls it, so a
    config dumped into a log line, an exception or ``/status`` cannot leak it.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """How one listener checks its upstream(s); HAProxy's defaults (inter 2s, rise 2, fall 3)."""

    kind: Protocol
    interval: float = DEFAULT_CHECK_INTERVAL
    timeout: float = DEFAULT_CHECK_TIMEOUT
    rise: int = 2
    fall: int = 3
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
    dns_ttl: float = 5.0
    allow: tuple[Network, ...] | None = None  # None: loopback listeners only (validated)
    max_connections: int | None = None
    max_connections_per_client: int | None = None
    tls: TlsConfig | None = None
    upstream_tls: UpstreamTlsConfig | None = None
    health: HealthConfig | None = None  # None: not checked, always used
    backup: tuple[Address, ...] = ()  # used in order while the upstream is DOWN
    on_down: OnDown = "keep"  # close: also cut live connections to a node that goes DOWN
    copy: Copy = "auto"  # how bytes move: splice(2) or a buffer
    relay: RelayKind = "auto"  # who moves them: the native engine thread, or Python

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

    listen: Address = Address("127.0.0.1", DEFAULT_ADMIN_PORT)
    # /readyz also needs at least one healthy (or unchecked) upstream, not only bound ports
    ready_requires_healthy: bool = True
    # False when the YAML has no admin block: then a taken port is a warning, not a failure
    explicit: bool = False


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

    @property
    def listen_host(self) -> str:
        return self.template.listen.host

    @property
    def port_count(self) -> int:
        return self.ports[1] - self.ports[0] + 1

    def addresses(self) -> list[Address]:
        """Every address this cluster may bind: its whole range and its seed port."""
        ports = list(range(self.ports[0], self.ports[1] + 1))
        if self.seed_port is not None:
            ports.append(self.seed_port)
        return [Address(self.listen_host, p) for p in ports]


@dataclass(frozen=True, slots=True)
class Config:
    """A whole validated port map."""

    path: str
    listeners: tuple[ListenerConfig, ...]
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    workers: int = 1
    engine_threads: int | None = None  # native relay threads per process; None: auto
    busy_poll_us: float = DEFAULT_BUSY_POLL_US  # engine polls this long after a batch; 0: off
    admin: AdminConfig | None = AdminConfig()  # None: ``admin: off``
    clusters: tuple[ClusterConfig, ...] = ()
    state_dir: str | None = None  # where cluster port assignments persist (None: in memory)

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


# ---------------------------------------------------------------------------
# YAML loading with line numbers and duplicate-key detection


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers the line of itself and of each value."""

    line: int = 0
    lines: dict[Any, int]


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    result = _Map()
    result.line = node.start_mark.line + 1
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise _Located(line, f"a mapping key must be a plain value, got {_show(key)}") from None
        if key in result:
            raise _Located(line, f"duplicate key {_show(key)} (first on line {result.lines[key]})")
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = line
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Located(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


# ---------------------------------------------------------------------------
# Field parsers: each takes the raw YAML value and returns the typed value or
# raises ValueError with what was expected.


def parse_duration(value: Any, *, allow_off: bool = False) -> float | None:
    """``500ms``, ``3s``, ``10m``, ``1h`` or a number of seconds; ``off`` where allowed."""
    if allow_off and (value is False or value is None or value in ("off", "none", 0)):
        return None
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 500ms, 3s or 10m, got {_show(value)}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        hint = " or off" if allow_off else ""
        raise ValueError(f"expected a duration like 500ms, 3s or 10m{hint}, got {_show(value)}")
    if seconds <= 0:
        raise ValueError(f"expected a duration greater than zero, got {_show(value)}")
    return seconds


def parse_size(value: Any) -> int:
    """``65536``, ``64k``, ``1m``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 64k, got {_show(value)}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        unit = m.group(2).lower() if m.group(2) else None
        size = int(m.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError(f"expected a size like 64k or 1m, got {_show(value)}")
    if not 4096 <= size <= 16 << 20:
        raise ValueError(f"expected a size between 4k and 16m, got {_show(value)}")
    return size


def _check_host(host: str, original: Any) -> str:
    if not host:
        raise ValueError(f"missing host in {_show(original)}")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_HOST_LABEL_RE.match(label) for label in labels):
        raise ValueError(
            f"{_show(host)} in {_show(original)} is neither an IP address nor a valid hostname")
    if all(label.isdigit() for label in labels):
        raise ValueError(f"{_show(host)} in {_show(original)} is not a valid IPv4 address")
    return host


def _check_port(text: str, original: Any, *, allow_zero: bool) -> int:
    if not text.isdigit():
        raise ValueError(f"port {_show(text)} in {_show(original)} is not a number")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} in {_show(original)} is out of range ({low}-65535)")
    return port


def parse_address(
    value: Any, *, default_host: str | None, default_port: int | None, allow_zero: bool = False
) -> Address:
    """Parse ``host:port``, ``[v6]:port``, ``:port``, a bare port, or a bare host."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected host:port, got {_show(value)}")
    if isinstance(value, int):
        text = str(value)
    else:
        text = value.strip()
    if text.isdigit():
        if default_host is None:
            raise ValueError(f"expected host:port, got a bare port {_show(value)}")
        return Address(default_host, _check_port(text, value, allow_zero=allow_zero))
    host: str
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {_show(value)}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected [ipv6]:port, got {_show(value)}")
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_show(host)} in {_show(value)} is not an IPv6 address") from None
    elif text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(
                f"write IPv6 addresses in brackets, like [::1]:6379, got {_show(value)}"
            ) from None
        host, port_text = text, None
    elif ":" in text:
        host, port_text = text.split(":", 1)
    else:
        host, port_text = text, None
    if not host:
        if default_host is None:
            raise ValueError(f"missing host in {_show(value)}")
        host = default_host
    host = _check_host(host, value)
    if port_text is None:
        if default_port is None:
            raise ValueError(f"missing port in {_show(value)}")
        return Address(host, default_port)
    return Address(host, _check_port(port_text, value, allow_zero=allow_zero))


# ---------------------------------------------------------------------------
# The schema

_LISTENER_KEYS = ("name", "listen", "upstream", "protocol", "backup")
_TUNABLE_KEYS = (
    "protocol", "connect_timeout", "idle_timeout", "buffer_size", "dns_ttl",
    "allow", "max_connections", "max_connections_per_client", "tls", "upstream_tls",
    "on_down", "copy", "relay",
)
# ``health`` may also sit in ``defaults``, but merges key by key instead of replacing
_HEALTH_FIELD = "health"
_TOP_KEYS = ("defaults", "listeners", "clusters", "drain_timeout", "workers", "engine_threads",
             "busy_poll", "admin", "state_dir")
_HEALTH_KEYS = ("kind", "interval", "timeout", "rise", "fall", "stats", "username",
                "password", "password_env", "password_file", "role")
_PASSWORD_KEYS = ("password", "password_env", "password_file")
_REDIS_ONLY = ("username", "role", *_PASSWORD_KEYS)
_ADMIN_KEYS = ("listen", "ready_requires_healthy")
_CLUSTER_KEYS = ("name", "engine", "seed", "announce", "announce_ip", "ports", "seed_port",
                 "listen", "refresh", "retire_grace")
_CLUSTER_TUNABLE_KEYS = tuple(k for k in _TUNABLE_KEYS if k != "protocol")

T = TypeVar("T")


class _Context:
    """Formats errors as ``file:line: listener 'x': field 'y': message``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, message: str, *, line: int | None = None, where: str = "") -> ConfigError:
        loc = f"{self.path}:{line}" if line else self.path
        return ConfigError(f"{loc}: {where}{message}")


def _unknown_keys(ctx: _Context, mapping: _Map, allowed: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {_show(close[0])}?)" if close else ""
            known = ", ".join(allowed)
            raise ctx.error(
                f"unknown field {_show(key)}{hint}; known fields: {known}",
                line=mapping.lines.get(key, mapping.line),
                where=where,
            )


def _field(
    ctx: _Context,
    mapping: _Map,
    key: str,
    where: str,
    parse: Callable[[Any], T],
) -> T:
    try:
        return parse(mapping[key])
    except ValueError as exc:
        raise ctx.error(
            f"field {_show(key)}: {exc}", line=mapping.lines.get(key, mapping.line), where=where
        ) from None


def _parse_protocol(value: Any) -> Protocol:
    if value not in PROTOCOLS:
        raise ValueError(f"expected one of {', '.join(PROTOCOLS)}, got {_show(value)}")
    return cast(Protocol, value)


def _parse_copy(value: Any) -> Copy:
    if value == "sockmap":
        # Withdrawn, not unknown: say why, so a config written for it fails clearly.
        raise ValueError("sockmap was withdrawn: the kernel's BPF sockmap redirect delivered "
                         "a segment twice when both directions of a connection were busy "
                         "(docs/hot-loop.md); use auto")
    if value not in COPY_MODES:
        raise ValueError(f"expected one of {', '.join(COPY_MODES)}, got {_show(value)}")
    return cast(Copy, value)


def _parse_relay(value: Any) -> RelayKind:
    if value not in RELAY_KINDS:
        raise ValueError(f"expected one of {', '.join(RELAY_KINDS)}, got {_show(value)}")
    return cast(RelayKind, value)


def _parse_name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"expected a name of letters, digits, '.', '_' or '-' (at most 64), got {_show(value)}"
        )
    return value


def _parse_connect_timeout(value: Any) -> float:
    seconds = parse_duration(value)
    assert seconds is not None
    return seconds


def _parse_idle_timeout(value: Any) -> float | None:
    return parse_duration(value, allow_off=True)


def parse_networks(value: Any) -> tuple[Network, ...]:
    """A list of CIDRs (``198.51.100.27/32``, ``2001:db8::/32``; a bare IP is one host)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a list of CIDRs like [198.51.100.27/32], got {_show(value)}")
    networks: list[Network] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected a CIDR like 198.51.100.0/24, got {_show(item)}")
        try:
            net = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as exc:
            try:
                loose = ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{_show(item)} is not a CIDR ({exc})") from None
            raise ValueError(f"{_show(item)} has host bits set; did you mean {loose}?") from None
        networks.append(net)
    return tuple(networks)


def _parse_limit(value: Any) -> int | None:
    if value is None or value is False or value == "off":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of connections >= 1 or off, got {_show(value)}")
    return value


_BASE_DIR: contextvars.ContextVar[Path] = contextvars.ContextVar("base_dir", default=Path("."))


def _readable_file(value: Any, key: str) -> str:
    """A path to a readable file; relative paths are relative to the port map's folder."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}: expected a file path, got {_show(value)}")
    path = _BASE_DIR.get() / value
    if not path.is_file():
        raise ValueError(f"{key}: no such file {_show(value)}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{key}: {_show(value)} is not readable by this user")
    return str(path)


def _sub_mapping(value: Any, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping with {', '.join(allowed)}, got {_show(value)}")
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {_show(close[0])}?)" if close else ""
            known = ", ".join(allowed)
            raise ValueError(f"unknown field {_show(key)}{hint}; known fields: {known}")
    for key in required:
        if key not in value:
            raise ValueError(f"missing required field {_show(key)}")
    return dict(value)


def parse_tls(value: Any) -> TlsConfig | None:
    if value is False or value is None or value == "off":
        return None
    raw = _sub_mapping(value, ("cert", "key", "client_ca"), ("cert", "key"))
    return TlsConfig(
        cert=_readable_file(raw["cert"], "cert"),
        key=_readable_file(raw["key"], "key"),
        client_ca=_readable_file(raw["client_ca"], "client_ca") if "client_ca" in raw else None,
    )


def parse_upstream_tls(value: Any) -> UpstreamTlsConfig | None:
    if value is False or value is None or value == "off":
        return None
    if value is True or value == "on":
        return UpstreamTlsConfig()
    raw = _sub_mapping(value, ("server_name", "ca", "verify"), ())
    server_name = raw.get("server_name")
    if server_name is not None and (not isinstance(server_name, str) or not server_name):
        raise ValueError(f"server_name: expected a host name, got {_show(server_name)}")
    verify = raw.get("verify", True)
    if not isinstance(verify, bool):
        raise ValueError(f"verify: expected true or false, got {_show(verify)}")
    ca = _readable_file(raw["ca"], "ca") if "ca" in raw else None
    return UpstreamTlsConfig(server_name=server_name, ca=ca, verify=verify)


def _parse_on_down(value: Any) -> OnDown:
    if value not in ("keep", "close"):
        raise ValueError(f"expected keep or close, got {_show(value)}")
    return cast(OnDown, value)


_TUNABLE_PARSERS: dict[str, Callable[[Any], Any]] = {
    "tls": parse_tls,
    "upstream_tls": parse_upstream_tls,
    "allow": parse_networks,
    "max_connections": _parse_limit,
    "max_connections_per_client": _parse_limit,
    "protocol": _parse_protocol,
    "connect_timeout": _parse_connect_timeout,
    "idle_timeout": _parse_idle_timeout,
    "buffer_size": parse_size,
    "dns_ttl": _parse_connect_timeout,
    "on_down": _parse_on_down,
    "copy": _parse_copy,
    "relay": _parse_relay,
}


# -- health ------------------------------------------------------------------


def _is_off(value: Any) -> bool:
    # YAML 1.1 reads a bare ``off`` as False
    return value is False or value is None or value == "off"


def _parse_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise ValueError(f"expected a whole number of checks from 1 to 100, got {_show(value)}")
    return value


def _parse_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _parse_role(value: Any) -> RedisRole:
    if value not in ("any", "primary"):
        raise ValueError(f"expected primary or any, got {_show(value)}")
    return cast(RedisRole, value)


def _parse_username(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"expected a user name without spaces, got {_show(value)}")
    return value


def _parse_password(value: Any) -> Secret:
    # Never echo the value: a mistyped password is still a password.
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string (the value is not shown)")
    return Secret(value)


def _password_from_env(value: Any) -> Secret:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected the name of an environment variable, got {_show(value)}")
    secret = os.environ.get(value)
    if not secret:
        raise ValueError(f"environment variable {_show(value)} is not set or is empty")
    return Secret(secret)


def _password_from_file(value: Any) -> Secret:
    """A file holding the password; relative paths are relative to the port map's folder."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a file path, got {_show(value)}")
    path = _BASE_DIR.get() / value
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"no such file {_show(value)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{_show(value)} is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"cannot read {_show(value)}: {exc.strerror}") from None
    secret = text.rstrip("\r\n")
    if not secret:
        raise ValueError(f"{_show(value)} is empty")
    return Secret(secret)


def _parse_health_interval(value: Any) -> float:
    seconds = parse_duration(value)
    assert seconds is not None
    return seconds


class _HealthSpec:
    """One ``health:`` block, validated but not yet merged: ``None`` fields were not given."""

    def __init__(self, values: dict[str, Any], block: _Map | None) -> None:
        self.values = values
        self.block = block  # for error lines; None for ``health: on``


def _health_spec(ctx: _Context, value: Any, line: int, where: str) -> _HealthSpec | None:
    """Parse ``health: off | on | {...}``; ``None`` means off."""
    if _is_off(value):
        return None
    if value is True or value == "on":
        return _HealthSpec({}, None)
    if not isinstance(value, _Map):
        raise ctx.error(f"field 'health': expected off, on or a mapping of check settings, "
                        f"got {_show(value)}", line=line, where=where)
    hwhere = f"{where}health: "
    _unknown_keys(ctx, value, _HEALTH_KEYS, hwhere)
    given = [key for key in _PASSWORD_KEYS if key in value]
    if len(given) > 1:
        raise ctx.error(f"give only one of {', '.join(_PASSWORD_KEYS)}, got "
                        f"{' and '.join(given)}", line=value.lines[given[1]], where=hwhere)
    parsers: dict[str, Callable[[Any], Any]] = {
        "kind": _parse_protocol,
        "interval": _parse_health_interval,
        "timeout": _parse_health_interval,
        "rise": _parse_count,
        "fall": _parse_count,
        "stats": _parse_bool,
        "username": _parse_username,
        "password": _parse_password,
        "password_env": _password_from_env,
        "password_file": _password_from_file,
        "role": _parse_role,
    }
    values: dict[str, Any] = {}
    for key in _HEALTH_KEYS:
        if key in value:
            parsed = _field(ctx, value, key, hwhere, parsers[key])
            values["password" if key in _PASSWORD_KEYS else key] = parsed
    return _HealthSpec(values, value)


def _merge_health(
    ctx: _Context,
    default: _HealthSpec | None,
    own: _HealthSpec | None,
    own_given: bool,
    protocol: Protocol,
    where: str,
    line: int,
) -> HealthConfig | None:
    """The listener's own block overrides ``defaults`` key by key; ``off`` turns it off."""
    if (own_given and own is None) or (not own_given and default is None):
        return None
    values = {**(default.values if default else {}), **(own.values if own else {})}
    kind: Protocol = values.setdefault("kind", protocol)
    block = own.block if own is not None else None
    hwhere = f"{where}health: "
    # Only the listener's own block is held to these: defaults may carry redis
    # credentials that simply do not apply to the memcached listeners.
    misplaced = {key: "redis" for key in _REDIS_ONLY} | {"stats": "memcached"}
    for key, wants in misplaced.items():
        if kind != wants and block is not None and key in block:
            raise ctx.error(f"field {key!r} applies only to {wants} checks, and this check "
                            f"is {kind}", line=block.lines[key], where=hwhere)
        if kind != wants:
            values.pop(key, None)
    if "timeout" not in values and "interval" in values:
        # A short interval without a timeout: the check must still end before the next.
        values["timeout"] = min(DEFAULT_CHECK_TIMEOUT, values["interval"])
    health = HealthConfig(**values)
    if health.timeout > health.interval:
        at = line
        if block is not None:
            at = block.lines.get("timeout", block.lines.get("interval", block.line))
        raise ctx.error(f"timeout {health.timeout:g}s is longer than interval "
                        f"{health.interval:g}s; a check must end before the next one starts",
                        line=at, where=hwhere)
    return health


# -- admin -------------------------------------------------------------------


def _admin(ctx: _Context, value: Any, line: int) -> AdminConfig | None:
    if _is_off(value):
        return None
    if not isinstance(value, _Map):
        raise ctx.error(f"expected off or a mapping with 'listen', got {_show(value)}",
                        line=line, where="admin: ")
    _unknown_keys(ctx, value, _ADMIN_KEYS, "admin: ")
    settings: dict[str, Any] = {"explicit": True}
    if "listen" in value:
        # A bare port means loopback here, not every address as for listeners.
        settings["listen"] = _field(
            ctx, value, "listen", "admin: ",
            lambda v: parse_address(v, default_host="127.0.0.1",
                                    default_port=DEFAULT_ADMIN_PORT, allow_zero=True))
    if "ready_requires_healthy" in value:
        settings["ready_requires_healthy"] = _field(
            ctx, value, "ready_requires_healthy", "admin: ", _parse_bool)
    return AdminConfig(**settings)


def _tunables(ctx: _Context, mapping: _Map, where: str) -> dict[str, Any]:
    return {
        key: _field(ctx, mapping, key, where, _TUNABLE_PARSERS[key])
        for key in _TUNABLE_KEYS
        if key in mapping
    }


def _listener(
    ctx: _Context,
    index: int,
    raw: Any,
    defaults: Mapping[str, Any],
    default_health: _HealthSpec | None,
    line: int,
) -> ListenerConfig:
    where = f"listeners[{index}]: "
    if not isinstance(raw, _Map):
        raise ctx.error(f"expected a mapping with name, listen and upstream, got {_show(raw)}",
                        line=line, where=where)
    if "name" in raw:
        name = _field(ctx, raw, "name", where, _parse_name)
        where = f"listener {_show(name)}: "
    _unknown_keys(ctx, raw, _LISTENER_KEYS + _TUNABLE_KEYS + (_HEALTH_FIELD,), where)
    for required in ("name", "listen", "upstream"):
        if required not in raw:
            raise ctx.error(f"missing required field {_show(required)}", line=raw.line, where=where)
    settings = {**defaults, **_tunables(ctx, raw, where)}
    protocol: Protocol = settings.get("protocol", "tcp")
    listen = _field(
        ctx, raw, "listen", where,
        lambda v: parse_address(v, default_host="0.0.0.0", default_port=None, allow_zero=True),
    )
    default_port = DEFAULT_PORTS.get(protocol)

    def parse_upstream(value: Any) -> Address:
        try:
            return parse_address(value, default_host=None, default_port=default_port)
        except ValueError as exc:
            if default_port is None and "missing port" in str(exc):
                raise ValueError(f"{exc} (protocol tcp has no default port)") from None
            raise

    upstream = _field(ctx, raw, "upstream", where, parse_upstream)

    def parse_backup(value: Any) -> tuple[Address, ...]:
        if not isinstance(value, list) or not value:
            raise ValueError(f"expected a list of host:port, got {_show(value)}")
        backups: list[Address] = []
        for item in value:
            address = parse_upstream(item)
            if address == upstream:
                raise ValueError(f"{_show(item)} is the upstream itself")
            if address in backups:
                raise ValueError(f"{_show(item)} is listed twice")
            backups.append(address)
        return tuple(backups)

    backup = _field(ctx, raw, "backup", where, parse_backup) if "backup" in raw else ()
    own_health = (
        _health_spec(ctx, raw[_HEALTH_FIELD], raw.lines[_HEALTH_FIELD], where)
        if _HEALTH_FIELD in raw else None
    )
    health = _merge_health(ctx, default_health, own_health, _HEALTH_FIELD in raw, protocol,
                           where, raw.line)
    if health is None:
        # Without checks nothing ever says the upstream is DOWN, so these would never act.
        for key in ("backup", "on_down"):
            if key in raw and (key == "backup" or settings.get("on_down") == "close"):
                raise ctx.error(f"field {key!r} needs health checks to act, and they are off "
                                f"for this listener", line=raw.lines[key], where=where)
    if settings.get("allow") is None and not _is_loopback(listen):
        raise ctx.error(
            f"field 'listen': {listen} is reachable from other hosts but no 'allow' list says "
            "who may connect; add allow: [CIDR, ...] to the listener or to defaults "
            "(allow: [0.0.0.0/0] opens it to everyone)",
            line=raw.lines.get("listen", raw.line), where=where)
    lc = ListenerConfig(name=name, listen=listen, upstream=upstream, backup=backup,
                        health=health, **settings)
    if lc.copy == "splice" and not lc.may_splice:
        origin = "" if "copy" in raw else " (set in defaults)"
        raise ctx.error(
            f"field 'copy': {lc.copy}{origin} needs a plain byte stream -- no tls or upstream_tls "
            "-- and TLS is encrypted and decrypted in userspace; use copy: auto or buffer "
            "for this listener", line=raw.lines.get("copy", raw.line), where=where)
    if lc.relay == "native" and not lc.may_splice:
        origin = "" if "relay" in raw else " (set in defaults)"
        raise ctx.error(
            f"field 'relay': native{origin} relays plain byte streams only -- no tls or "
            "upstream_tls -- and TLS is encrypted and decrypted in Python; use relay: auto "
            "or python for this listener", line=raw.lines.get("relay", raw.line), where=where)
    return lc


def _is_loopback(address: Address) -> bool:
    if address.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        return False


def _conflicts(a: Address, b: Address) -> bool:
    """Whether binding both would fail: same port, and same host or a wildcard of one family."""
    if a.port != b.port or a.port == 0:
        return False
    if a.host == b.host:
        return True
    return a.is_ipv6 == b.is_ipv6 and (a.is_wildcard or b.is_wildcard)


def parse_config(data: Any, path: str = "<config>") -> Config:
    """Validate a loaded YAML document (as from ``load_yaml``) into a ``Config``."""
    base = Path(path).parent if not path.startswith("<") else Path(".")
    token = _BASE_DIR.set(base)
    try:
        return _parse_config(data, path)
    finally:
        _BASE_DIR.reset(token)


def _parse_config(data: Any, path: str) -> Config:
    ctx = _Context(path)
    if data is None:
        raise ctx.error("the file is empty; expected a mapping with a 'listeners' list")
    if not isinstance(data, _Map):
        raise ctx.error(f"expected a mapping with a 'listeners' list at the top, got {_show(data)}")
    _unknown_keys(ctx, data, _TOP_KEYS, "")
    defaults: dict[str, Any] = {}
    # Health checks are on unless a defaults or listener block says ``health: off``.
    default_health: _HealthSpec | None = _HealthSpec({}, None)
    if "defaults" in data:
        raw_defaults = data["defaults"]
        if not isinstance(raw_defaults, _Map):
            raise ctx.error(f"expected a mapping, got {_show(raw_defaults)}",
                            line=data.lines["defaults"], where="defaults: ")
        _unknown_keys(ctx, raw_defaults, (*_TUNABLE_KEYS, _HEALTH_FIELD), "defaults: ")
        defaults = _tunables(ctx, raw_defaults, "defaults: ")
        if _HEALTH_FIELD in raw_defaults:
            default_health = _health_spec(ctx, raw_defaults[_HEALTH_FIELD],
                                          raw_defaults.lines[_HEALTH_FIELD], "defaults: ")
    admin: AdminConfig | None = AdminConfig()
    if "admin" in data:
        admin = _admin(ctx, data["admin"], data.lines["admin"])
    raw_listeners = data.get("listeners")
    if (raw_listeners is None or raw_listeners == []) and not data.get("clusters"):
        raise ctx.error("the port map has no listeners; add at least one under 'listeners' "
                        "(or a cluster under 'clusters')",
                        line=data.lines.get("listeners"))
    if raw_listeners is None:
        raw_listeners = []
    if not isinstance(raw_listeners, list):
        raise ctx.error(f"'listeners' must be a list, got {_show(raw_listeners)}",
                        line=data.lines["listeners"])
    listeners: list[ListenerConfig] = []
    first_line = data.lines.get("listeners", data.line)
    for index, raw in enumerate(raw_listeners):
        line = raw.line if isinstance(raw, _Map) else first_line
        lc = _listener(ctx, index, raw, defaults, default_health, line)
        for other in listeners:
            if other.name == lc.name:
                raise ctx.error(f"duplicate name {lc.name!r}, already used by listeners"
                                f"[{listeners.index(other)}]", line=line,
                                where=f"listener {lc.name!r}: field 'name': ")
            if _conflicts(other.listen, lc.listen):
                raise ctx.error(
                    f"address {lc.listen} is already used by listener {other.name!r}"
                    f" ({other.listen})", line=raw.lines.get("listen", line),
                    where=f"listener {lc.name!r}: field 'listen': ")
        if admin is not None and _conflicts(admin.listen, lc.listen):
            raise ctx.error(
                f"address {lc.listen} is already used by the admin endpoint ({admin.listen})",
                line=raw.lines.get("listen", line), where=f"listener {lc.name!r}: field 'listen': ")
        listeners.append(lc)
    top: dict[str, Any] = {}
    if "drain_timeout" in data:
        top["drain_timeout"] = _field(ctx, data, "drain_timeout", "", _parse_drain)
    if "workers" in data:
        top["workers"] = _field(ctx, data, "workers", "", parse_workers)
    if "engine_threads" in data:
        top["engine_threads"] = _field(ctx, data, "engine_threads", "", parse_engine_threads)
    if "busy_poll" in data:
        top["busy_poll_us"] = _field(ctx, data, "busy_poll", "", parse_busy_poll)
    if "state_dir" in data:
        top["state_dir"] = _field(ctx, data, "state_dir", "", _parse_state_dir)
    if "clusters" in data:
        top["clusters"] = _clusters(ctx, data, defaults, default_health, listeners)
    return Config(path=path, listeners=tuple(listeners), admin=admin, **top)


def _parse_state_dir(value: Any) -> str:
    """A folder for the state file; relative to the port map's folder; created if missing."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a folder path, got {_show(value)}")
    path = _BASE_DIR.get() / value
    if path.exists() and not path.is_dir():
        raise ValueError(f"{_show(value)} exists and is not a folder")
    return str(path)


def parse_port_range(value: Any) -> tuple[int, int]:
    """``6380-6399`` (inclusive) or a single port."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected a port range like 6380-6399, got {_show(value)}")
    text = str(value).strip()
    first, dash, last = text.partition("-")
    first, last = first.strip(), last.strip() if dash else first.strip()
    low = _check_port(first, value, allow_zero=False)
    high = _check_port(last, value, allow_zero=False)
    if high < low:
        raise ValueError(f"range {_show(value)} ends before it starts")
    if high - low + 1 > MAX_CLUSTER_PORTS:
        raise ValueError(f"range {_show(value)} has {high - low + 1} ports; "
                         f"at most {MAX_CLUSTER_PORTS}")
    return low, high


def _parse_engine(value: Any) -> Engine:
    if value not in ENGINES:
        raise ValueError(f"expected one of {', '.join(ENGINES)}, got {_show(value)}")
    return cast(Engine, value)


def _parse_announce(value: Any) -> str:
    """The host clients are told to use: an IP or DNS name, no port."""
    if isinstance(value, bool) or not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected the NAT host's public IP or DNS name, got {_show(value)}")
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text and not _is_ipv6(text):
        raise ValueError(f"expected a host without a port, got {_show(value)}")
    return _check_host(text, value)


def _parse_announce_ip(value: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise ValueError(f"expected an IP address, got {_show(value)}") from None


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_single_port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a port number, got {_show(value)}")
    return _check_port(str(value).strip(), value, allow_zero=False)


def _parse_bind_host(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected an address to bind, like 0.0.0.0, got {_show(value)}")
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return _check_host(text, value)


def _cluster(ctx: _Context, index: int, raw: Any, defaults: Mapping[str, Any],
             default_health: _HealthSpec | None, line: int) -> ClusterConfig:
    where = f"clusters[{index}]: "
    if not isinstance(raw, _Map):
        raise ctx.error(f"expected a mapping with name, engine, seed, announce and ports, "
                        f"got {_show(raw)}", line=line, where=where)
    if "name" in raw:
        name = _field(ctx, raw, "name", where, _parse_name)
        where = f"cluster {_show(name)}: "
    _unknown_keys(ctx, raw, (*_CLUSTER_KEYS, *_CLUSTER_TUNABLE_KEYS, _HEALTH_FIELD), where)
    for required in ("name", "engine", "seed", "announce", "ports"):
        if required not in raw:
            raise ctx.error(f"missing required field {_show(required)}", line=raw.line,
                            where=where)
    engine = _field(ctx, raw, "engine", where, _parse_engine)
    protocol = ENGINE_PROTOCOL[engine]
    default_port = DEFAULT_PORTS[protocol]
    seed = _field(ctx, raw, "seed", where,
                  lambda v: parse_address(v, default_host=None, default_port=default_port))
    announce = _field(ctx, raw, "announce", where, _parse_announce)
    if "announce_ip" in raw:
        announce_ip = _field(ctx, raw, "announce_ip", where, _parse_announce_ip)
    else:
        announce_ip = announce if Address(announce, 0).is_ip else ""
    ports = _field(ctx, raw, "ports", where, parse_port_range)
    seed_port = (_field(ctx, raw, "seed_port", where, _parse_single_port)
                 if "seed_port" in raw else None)
    if seed_port is not None and ports[0] <= seed_port <= ports[1]:
        raise ctx.error(f"field 'seed_port': {seed_port} is inside the node range "
                        f"{ports[0]}-{ports[1]}; pick a port outside it",
                        line=raw.lines["seed_port"], where=where)
    host = _field(ctx, raw, "listen", where, _parse_bind_host) if "listen" in raw \
        else "0.0.0.0"
    refresh = (_field(ctx, raw, "refresh", where, _parse_connect_timeout)
               if "refresh" in raw else DEFAULT_REFRESH)
    grace = (_field(ctx, raw, "retire_grace", where, _parse_drain)
             if "retire_grace" in raw else DEFAULT_RETIRE_GRACE)
    settings = {**{k: v for k, v in defaults.items() if k != "protocol"},
                **{key: _field(ctx, raw, key, where, _TUNABLE_PARSERS[key])
                   for key in _CLUSTER_TUNABLE_KEYS if key in raw}}
    listen = Address(host, ports[0])
    if settings.get("allow") is None and not _is_loopback(listen):
        raise ctx.error(
            f"its listeners bind {host}, reachable from other hosts, but no 'allow' list says "
            "who may connect; add allow: [CIDR, ...] to the cluster or to defaults",
            line=raw.lines.get("listen", raw.line), where=where)
    # The cluster's health block gives discovery its credentials (Redis ACL / RBAC).
    own_health = (
        _health_spec(ctx, raw[_HEALTH_FIELD], raw.lines[_HEALTH_FIELD], where)
        if _HEALTH_FIELD in raw else None
    )
    health = _merge_health(ctx, default_health, own_health, _HEALTH_FIELD in raw, protocol,
                           where, raw.line)
    template = ListenerConfig(name=name, listen=listen, upstream=seed, protocol=protocol,
                              health=health, **settings)
    return ClusterConfig(name=name, engine=engine, seed=seed, announce=announce,
                         announce_ip=announce_ip, ports=ports, template=template,
                         seed_port=seed_port, refresh=refresh, retire_grace=grace)


def _clusters(ctx: _Context, data: _Map, defaults: Mapping[str, Any],
              default_health: _HealthSpec | None,
              listeners: list[ListenerConfig]) -> tuple[ClusterConfig, ...]:
    raw_clusters = data["clusters"]
    line = data.lines["clusters"]
    if raw_clusters is None:
        return ()
    if not isinstance(raw_clusters, list):
        raise ctx.error(f"'clusters' must be a list, got {_show(raw_clusters)}", line=line)
    clusters: list[ClusterConfig] = []
    for index, raw in enumerate(raw_clusters):
        at = raw.line if isinstance(raw, _Map) else line
        cc = _cluster(ctx, index, raw, defaults, default_health, at)
        where = f"cluster {cc.name!r}: "
        for other in clusters:
            if other.name == cc.name:
                raise ctx.error(f"duplicate name {cc.name!r}, already used by clusters"
                                f"[{clusters.index(other)}]", line=at,
                                where=where + "field 'name': ")
        for lc in listeners:
            if lc.name == cc.name:
                raise ctx.error(f"name {cc.name!r} is already used by a listener", line=at,
                                where=where + "field 'name': ")
        mine = {a.port for a in cc.addresses()}
        host = Address(cc.listen_host, 1)
        for lc in listeners:
            if lc.listen.port in mine and _conflicts(lc.listen, Address(host.host,
                                                                         lc.listen.port)):
                raise ctx.error(
                    f"listener {lc.name!r} ({lc.listen}) uses a port of this cluster's range "
                    f"{cc.ports[0]}-{cc.ports[1]} or its seed_port", line=at, where=where)
        for other in clusters:
            common = mine & {a.port for a in other.addresses()}
            if common and _conflicts(host, Address(other.listen_host, 1)):
                raise ctx.error(f"port {min(common)} is also in cluster {other.name!r}'s "
                                "range or seed_port", line=at, where=where)
        clusters.append(cc)
    return tuple(clusters)


def _parse_drain(value: Any) -> float:
    if value == 0 or value is False or value == "off":
        return 0.0
    seconds = parse_duration(value)
    assert seconds is not None
    return seconds


def parse_workers(value: Any) -> int:
    """A number of worker processes, or ``auto`` for one per CPU."""
    if value == "auto":
        return max(os.cpu_count() or 1, 1)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ValueError(f"expected a number of workers from 1 to 256 or auto, got {_show(value)}")
    return value


def parse_engine_threads(value: Any) -> int | None:
    """Native relay threads per process, or ``auto`` (None: the CPUs shared among workers)."""
    if value == "auto":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError(f"expected a number of engine threads from 1 to 64 or auto, "
                         f"got {_show(value)}")
    return value


def parse_busy_poll(value: Any) -> float:
    """``busy_poll: 50us`` (µs the engine polls after a batch before it sleeps), ``off``."""
    m = _DURATION_RE.match(value) if isinstance(value, str) else None
    if value == 0 or (m is not None and float(m.group(1)) == 0):  # 0, 0us: off
        return 0.0
    try:
        seconds = parse_duration(value, allow_off=True)
    except ValueError:
        raise ValueError(f"expected a duration up to {MAX_BUSY_POLL_US:.0f}us, like 50us, "
                         f"or off, got {_show(value)}") from None
    us = 0.0 if seconds is None else round(seconds * 1e6, 3)
    if us > MAX_BUSY_POLL_US:
        raise ValueError(f"expected a duration up to {MAX_BUSY_POLL_US:.0f}us (a longer spin "
                         f"costs a CPU for nothing a sleep would not give), got {_show(value)}")
    return us


def load_yaml(text: str, path: str = "<config>") -> Any:
    """Parse YAML text, turning every parser error into a located ``ConfigError``."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except _Located as exc:
        raise ConfigError(f"{path}:{exc.line}: {exc.message}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = exc.problem or exc.context or "unparsable"
        raise ConfigError(f"{loc}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a port map") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a port map file."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror}") from None
    return parse_config(load_yaml(text, name), name)
