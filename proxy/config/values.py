"""The port map's vocabulary: its value types, their limits and defaults.

Kept below everything else in the package (and free of pydantic) so that modules
which only need an ``Address`` or a default do not pull in the validator.
"""

from __future__ import annotations

import ipaddress
import reprlib
from dataclasses import dataclass
from typing import Any, Literal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Protocol = Literal["tcp", "memcached", "redis"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "memcached", "redis")
Copy = Literal["auto", "splice", "buffer"]
COPY_MODES: tuple[Copy, ...] = ("auto", "splice", "buffer")
RelayKind = Literal["auto", "native", "python"]
RELAY_KINDS: tuple[RelayKind, ...] = ("auto", "native", "python")
LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
DEFAULT_PORTS: dict[str, int] = {"memcached": 11211, "redis": 6379}
Engine = Literal["redis-cluster", "redis-replication", "memcached"]
ENGINES: tuple[Engine, ...] = ("redis-cluster", "redis-replication", "memcached")
ENGINE_PROTOCOL: dict[str, Protocol] = {"redis-cluster": "redis", "redis-replication": "redis",
                                        "memcached": "memcached"}
DEFAULT_REFRESH = 30.0
# A replication group's refresh also judges its replicas for reader_port and notices a
# failover: a few ROLE round trips, cheap enough to run often.
DEFAULT_REPLICATION_REFRESH = 5.0
DEFAULT_AWS_INTERVAL = 300.0  # the aws: source re-reads the API this often
DEFAULT_AWS_FIRST_PORT = 30000
DEFAULT_RETIRE_GRACE = 600.0
MAX_CLUSTER_PORTS = 1024

DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_BUFFER_SIZE = 64 * 1024
DEFAULT_DNS_TTL = 5.0
DEFAULT_DRAIN_TIMEOUT = 30.0
# The native engine polls this long after each batch before it sleeps (docs/hot-loop.md):
# on a virtual CPU a wake-up from sleep costs tens of µs, more than the relay itself.
DEFAULT_BUSY_POLL_US = 50.0
MAX_BUSY_POLL_US = 1000.0
DEFAULT_ADMIN_PORT = 9180
DEFAULT_CHECK_INTERVAL = 2.0  # HAProxy's inter 2s, rise 2, fall 3
DEFAULT_CHECK_TIMEOUT = 1.0
DEFAULT_RISE = 2
DEFAULT_FALL = 3

ProxyProtocol = Literal["off", "v1", "v2", "any"]
PROXY_PROTOCOLS: tuple[ProxyProtocol, ...] = ("off", "v1", "v2", "any")
DEFAULT_DRAIN_DELAY = 5.0  # /readyz unready this long before accepting stops (SIGTERM)

OnDown = Literal["keep", "close"]
ON_DOWN: tuple[OnDown, ...] = ("keep", "close")
RedisRole = Literal["any", "primary"]
REDIS_ROLES: tuple[RedisRole, ...] = ("any", "primary")

_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlevel = 2


def show(value: Any) -> str:
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
