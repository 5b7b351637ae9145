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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import yaml

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Protocol = Literal["tcp", "memcached", "redis"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "memcached", "redis")
Copy = Literal["auto", "splice", "buffer"]
COPY_MODES: tuple[Copy, ...] = ("auto", "splice", "buffer")
DEFAULT_PORTS: dict[str, int] = {"memcached": 11211, "redis": 6379}

DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_BUFFER_SIZE = 64 * 1024
DEFAULT_DRAIN_TIMEOUT = 30.0

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(k|kb|kib|m|mb|mib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
               "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20}
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


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
    copy: Copy = "auto"  # how bytes move: splice(2) through a pipe, or through a buffer

    @property
    def may_splice(self) -> bool:
        """Only plain byte streams can skip userspace: no TLS, no protocol awareness."""
        return self.protocol == "tcp" and self.tls is None and self.upstream_tls is None

    @property
    def allows_everyone(self) -> bool:
        return self.allow is not None and any(net.prefixlen == 0 for net in self.allow)


@dataclass(frozen=True, slots=True)
class Config:
    """A whole validated port map."""

    path: str
    listeners: tuple[ListenerConfig, ...]
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    workers: int = 1

    def listener(self, name: str) -> ListenerConfig:
        for lc in self.listeners:
            if lc.name == name:
                return lc
        raise KeyError(name)


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

_LISTENER_KEYS = ("name", "listen", "upstream", "protocol")
_TUNABLE_KEYS = (
    "protocol", "connect_timeout", "idle_timeout", "buffer_size", "dns_ttl",
    "allow", "max_connections", "max_connections_per_client", "tls", "upstream_tls", "copy",
)
_TOP_KEYS = ("defaults", "listeners", "drain_timeout", "workers")

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
    if value not in COPY_MODES:
        raise ValueError(f"expected one of {', '.join(COPY_MODES)}, got {_show(value)}")
    return cast(Copy, value)


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
    "copy": _parse_copy,
}


def _tunables(ctx: _Context, mapping: _Map, where: str) -> dict[str, Any]:
    return {
        key: _field(ctx, mapping, key, where, _TUNABLE_PARSERS[key])
        for key in _TUNABLE_KEYS
        if key in mapping
    }


def _listener(
    ctx: _Context, index: int, raw: Any, defaults: Mapping[str, Any], line: int
) -> ListenerConfig:
    where = f"listeners[{index}]: "
    if not isinstance(raw, _Map):
        raise ctx.error(f"expected a mapping with name, listen and upstream, got {_show(raw)}",
                        line=line, where=where)
    if "name" in raw:
        name = _field(ctx, raw, "name", where, _parse_name)
        where = f"listener {_show(name)}: "
    _unknown_keys(ctx, raw, _LISTENER_KEYS + _TUNABLE_KEYS, where)
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
    if settings.get("allow") is None and not _is_loopback(listen):
        raise ctx.error(
            f"field 'listen': {listen} is reachable from other hosts but no 'allow' list says "
            "who may connect; add allow: [CIDR, ...] to the listener or to defaults "
            "(allow: [0.0.0.0/0] opens it to everyone)",
            line=raw.lines.get("listen", raw.line), where=where)
    lc = ListenerConfig(name=name, listen=listen, upstream=upstream, **settings)
    if lc.copy == "splice" and not lc.may_splice:
        why = (f"protocol {lc.protocol} listeners may parse the stream" if lc.protocol != "tcp"
               else "TLS is encrypted and decrypted in userspace")
        origin = "" if "copy" in raw else " (set in defaults)"
        raise ctx.error(
            f"field 'copy': splice{origin} needs a plain byte stream -- protocol tcp without "
            f"tls or upstream_tls -- and {why}; use copy: auto or buffer for this listener",
            line=raw.lines.get("copy", raw.line), where=where)
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
    if "defaults" in data:
        raw_defaults = data["defaults"]
        if not isinstance(raw_defaults, _Map):
            raise ctx.error(f"expected a mapping, got {_show(raw_defaults)}",
                            line=data.lines["defaults"], where="defaults: ")
        _unknown_keys(ctx, raw_defaults, _TUNABLE_KEYS, "defaults: ")
        defaults = _tunables(ctx, raw_defaults, "defaults: ")
    raw_listeners = data.get("listeners")
    if raw_listeners is None or raw_listeners == []:
        raise ctx.error("the port map has no listeners; add at least one under 'listeners'",
                        line=data.lines.get("listeners"))
    if not isinstance(raw_listeners, list):
        raise ctx.error(f"'listeners' must be a list, got {_show(raw_listeners)}",
                        line=data.lines["listeners"])
    listeners: list[ListenerConfig] = []
    first_line = data.lines["listeners"]
    for index, raw in enumerate(raw_listeners):
        line = raw.line if isinstance(raw, _Map) else first_line
        lc = _listener(ctx, index, raw, defaults, line)
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
        listeners.append(lc)
    top: dict[str, Any] = {}
    if "drain_timeout" in data:
        top["drain_timeout"] = _field(ctx, data, "drain_timeout", "", _parse_drain)
    if "workers" in data:
        top["workers"] = _field(ctx, data, "workers", "", parse_workers)
    return Config(path=path, listeners=tuple(listeners), **top)


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
