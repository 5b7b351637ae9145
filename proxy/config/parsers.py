"""One parser per kind of YAML value: whatever the YAML held in, the typed value out.

Each raises ``ValueError`` saying what was expected, in the words users read: ``fields.py``
attaches a parser to each kind of field, and the loader adds file, line,
listener and field. Nothing here knows which section a value sits in.
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .values import (
    DEFAULT_ADMIN_PORT,
    MAX_BUSY_POLL_US,
    MAX_CLUSTER_PORTS,
    PROXY_PROTOCOLS,
    Address,
    Network,
    ProxyProtocol,
    Secret,
    show,
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(k|kb|kib|m|mb|mib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
               "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20}
_DURATION_UNITS = {None: 1.0, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


# Relative file names in a port map are relative to the map's folder; the loader sets this.
BASE_DIR: contextvars.ContextVar[Path] = contextvars.ContextVar("base_dir", default=Path("."))

T = TypeVar("T", bound=str)


def one_of(choices: tuple[T, ...], expected: str | None = None) -> Callable[[Any], T]:
    """A parser for one of ``choices``; ``expected`` words the error (default: the list)."""
    wanted = expected or f"one of {', '.join(choices)}"

    def parse(value: Any) -> T:
        for choice in choices:
            if value == choice and isinstance(value, str):
                return choice
        raise ValueError(f"expected {wanted}, got {show(value)}")

    return parse


def is_off(value: Any) -> bool:
    # YAML 1.1 reads a bare ``off`` as False
    return value is False or value is None or value == "off"


def parse_duration(value: Any, *, allow_off: bool = False) -> float | None:
    """``500ms``, ``3s``, ``10m``, ``1h`` or a number of seconds; ``off`` where allowed."""
    if allow_off and (value is False or value is None or value in ("off", "none", 0)):
        return None
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 500ms, 3s or 10m, got {show(value)}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        hint = " or off" if allow_off else ""
        raise ValueError(f"expected a duration like 500ms, 3s or 10m{hint}, got {show(value)}")
    if seconds <= 0:
        raise ValueError(f"expected a duration greater than zero, got {show(value)}")
    return seconds


def parse_seconds(value: Any) -> float:
    """A duration that must be given (no ``off``)."""
    seconds = parse_duration(value)
    assert seconds is not None
    return seconds


def parse_idle(value: Any) -> float | None:
    return parse_duration(value, allow_off=True)


def parse_drain(value: Any) -> float:
    """A duration, or ``0``/``off`` for none at all."""
    if value == 0 or value is False or value == "off":
        return 0.0
    return parse_seconds(value)


def parse_size(value: Any) -> int:
    """``65536``, ``64k``, ``1m``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 64k, got {show(value)}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        unit = m.group(2).lower() if m.group(2) else None
        size = int(m.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError(f"expected a size like 64k or 1m, got {show(value)}")
    if not 4096 <= size <= 16 << 20:
        raise ValueError(f"expected a size between 4k and 16m, got {show(value)}")
    return size


def check_host(host: str, original: Any) -> str:
    if not host:
        raise ValueError(f"missing host in {show(original)}")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_HOST_LABEL_RE.match(label) for label in labels):
        raise ValueError(
            f"{show(host)} in {show(original)} is neither an IP address nor a valid hostname")
    if all(label.isdigit() for label in labels):
        raise ValueError(f"{show(host)} in {show(original)} is not a valid IPv4 address")
    return host


def check_port(text: str, original: Any, *, allow_zero: bool) -> int:
    if not text.isdigit():
        raise ValueError(f"port {show(text)} in {show(original)} is not a number")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} in {show(original)} is out of range ({low}-65535)")
    return port


def parse_address(
    value: Any, *, default_host: str | None, default_port: int | None, allow_zero: bool = False
) -> Address:
    """Parse ``host:port``, ``[v6]:port``, ``:port``, a bare port, or a bare host."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected host:port, got {show(value)}")
    text = str(value) if isinstance(value, int) else value.strip()
    if text.isdigit():
        if default_host is None:
            raise ValueError(f"expected host:port, got a bare port {show(value)}")
        return Address(default_host, check_port(text, value, allow_zero=allow_zero))
    host: str
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {show(value)}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected [ipv6]:port, got {show(value)}")
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{show(host)} in {show(value)} is not an IPv6 address") from None
    elif text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(
                f"write IPv6 addresses in brackets, like [::1]:6379, got {show(value)}"
            ) from None
        host, port_text = text, None
    elif ":" in text:
        host, port_text = text.split(":", 1)
    else:
        host, port_text = text, None
    if not host:
        if default_host is None:
            raise ValueError(f"missing host in {show(value)}")
        host = default_host
    host = check_host(host, value)
    if port_text is None:
        if default_port is None:
            raise ValueError(f"missing port in {show(value)}")
        return Address(host, default_port)
    return Address(host, check_port(port_text, value, allow_zero=allow_zero))


def is_loopback(address: Address) -> bool:
    if address.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        return False


def conflicts(a: Address, b: Address) -> bool:
    """Whether binding both would fail: same port, and same host or a wildcard of one family."""
    if a.port != b.port or a.port == 0:
        return False
    if a.host == b.host:
        return True
    return a.is_ipv6 == b.is_ipv6 and (a.is_wildcard or b.is_wildcard)


def parse_listen(value: Any) -> Address:
    """A listener's bind address: a bare port binds every IPv4 address; port 0 is any port."""
    return parse_address(value, default_host="0.0.0.0", default_port=None, allow_zero=True)


def parse_upstream(value: Any, default_port: int | None) -> Address:
    """A node address; without a port, the protocol's (none for tcp)."""
    try:
        return parse_address(value, default_host=None, default_port=default_port)
    except ValueError as exc:
        if default_port is None and "missing port" in str(exc):
            raise ValueError(f"{exc} (protocol tcp has no default port)") from None
        raise


def parse_upstream_form(value: Any) -> Address:
    """The shape of an upstream before the protocol is known; port 0 stands for its default."""
    return parse_address(value, default_host=None, default_port=0)


def parse_backup_form(value: Any) -> tuple[Address, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a list of host:port, got {show(value)}")
    return tuple(parse_upstream_form(item) for item in value)


def parse_backup(value: Any, upstream: Address, default_port: int | None) -> tuple[Address, ...]:
    """Backups in order, each with the protocol's default port; neither the upstream nor twice."""
    parse_backup_form(value)
    backups: list[Address] = []
    for item in value:
        address = parse_upstream(item, default_port)
        if address == upstream:
            raise ValueError(f"{show(item)} is the upstream itself")
        if address in backups:
            raise ValueError(f"{show(item)} is listed twice")
        backups.append(address)
    return tuple(backups)


def parse_admin_listen(value: Any) -> Address:
    # A bare port means loopback here, not every address as for listeners.
    return parse_address(value, default_host="127.0.0.1", default_port=DEFAULT_ADMIN_PORT,
                         allow_zero=True)


def parse_name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"expected a name of letters, digits, '.', '_' or '-' (at most 64), got {show(value)}"
        )
    return value


def is_name(value: Any) -> bool:
    return isinstance(value, str) and _NAME_RE.match(value) is not None


def parse_networks(value: Any) -> tuple[Network, ...]:
    """A list of CIDRs (``198.51.100.27/32``, ``2001:db8::/32``; a bare IP is one host)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a list of CIDRs like [198.51.100.27/32], got {show(value)}")
    networks: list[Network] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected a CIDR like 198.51.100.0/24, got {show(item)}")
        try:
            net = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as exc:
            try:
                loose = ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{show(item)} is not a CIDR ({exc})") from None
            raise ValueError(f"{show(item)} has host bits set; did you mean {loose}?") from None
        networks.append(net)
    return tuple(networks)


def parse_proxy_protocol(value: Any) -> ProxyProtocol:
    """``off`` (YAML false), v1, v2 or any."""
    if is_off(value):
        return "off"
    return one_of(PROXY_PROTOCOLS[1:], "off, v1, v2 or any")(value)


def parse_limit(value: Any) -> int | None:
    if value is None or value is False or value == "off":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of connections >= 1 or off, got {show(value)}")
    return value


def parse_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise ValueError(f"expected a whole number of checks from 1 to 100, got {show(value)}")
    return value


def parse_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {show(value)}")
    return value


def readable_file(value: Any) -> str:
    """A path to a readable file; relative paths are relative to the port map's folder."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a file path, got {show(value)}")
    path = BASE_DIR.get() / value
    if not path.is_file():
        raise ValueError(f"no such file {show(value)}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{show(value)} is not readable by this user")
    return str(path)


def parse_server_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a host name, got {show(value)}")
    return value


def parse_username(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"expected a user name without spaces, got {show(value)}")
    return value


def parse_password(value: Any) -> Secret:
    # Never echo the value: a mistyped password is still a password.
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string (the value is not shown)")
    return Secret(value)


def parse_env_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected the name of an environment variable, got {show(value)}")
    return value


def password_from_env(name: str) -> Secret:
    secret = os.environ.get(name)
    if not secret:
        raise ValueError(f"environment variable {show(name)} is not set or is empty")
    return Secret(secret)


def parse_file_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a file path, got {show(value)}")
    return value


def password_from_file(name: str) -> Secret:
    """A file holding the password; relative paths are relative to the port map's folder."""
    path = BASE_DIR.get() / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"no such file {show(name)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{show(name)} is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"cannot read {show(name)}: {exc.strerror}") from None
    secret = text.rstrip("\r\n")
    if not secret:
        raise ValueError(f"{show(name)} is empty")
    return Secret(secret)


def parse_state_dir(value: Any) -> str:
    """A folder for the state file; relative to the port map's folder; created if missing."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a folder path, got {show(value)}")
    path = BASE_DIR.get() / value
    if path.exists() and not path.is_dir():
        raise ValueError(f"{show(value)} exists and is not a folder")
    return str(path)


def parse_port_range(value: Any) -> tuple[int, int]:
    """``6380-6399`` (inclusive) or a single port."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected a port range like 6380-6399, got {show(value)}")
    text = str(value).strip()
    first, dash, last = text.partition("-")
    first, last = first.strip(), last.strip() if dash else first.strip()
    low = check_port(first, value, allow_zero=False)
    high = check_port(last, value, allow_zero=False)
    if high < low:
        raise ValueError(f"range {show(value)} ends before it starts")
    if high - low + 1 > MAX_CLUSTER_PORTS:
        raise ValueError(f"range {show(value)} has {high - low + 1} ports; "
                         f"at most {MAX_CLUSTER_PORTS}")
    return low, high


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def parse_announce(value: Any) -> str:
    """The host clients are told to use: an IP or DNS name, no port."""
    if isinstance(value, bool) or not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected the NAT host's public IP or DNS name, got {show(value)}")
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text and not _is_ipv6(text):
        raise ValueError(f"expected a host without a port, got {show(value)}")
    return check_host(text, value)


def parse_ip(value: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise ValueError(f"expected an IP address, got {show(value)}") from None


def parse_single_port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a port number, got {show(value)}")
    return check_port(str(value).strip(), value, allow_zero=False)


def parse_bind_host(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected an address to bind, like 0.0.0.0, got {show(value)}")
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return check_host(text, value)


def parse_workers(value: Any) -> int:
    """A number of worker processes, or ``auto`` for one per CPU."""
    if value == "auto":
        return max(os.cpu_count() or 1, 1)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ValueError(f"expected a number of workers from 1 to 256 or auto, got {show(value)}")
    return value


def parse_engine_threads(value: Any) -> int | None:
    """Native relay threads per process, or ``auto`` (None: the CPUs shared among workers)."""
    if value == "auto":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError(f"expected a number of engine threads from 1 to 64 or auto, "
                         f"got {show(value)}")
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
                         f"or off, got {show(value)}") from None
    us = 0.0 if seconds is None else round(seconds * 1e6, 3)
    if us > MAX_BUSY_POLL_US:
        raise ValueError(f"expected a duration up to {MAX_BUSY_POLL_US:.0f}us (a longer spin "
                         f"costs a CPU for nothing a sleep would not give), got {show(value)}")
    return us


def parse_word(value: Any) -> str:
    """One word of text (a region, a profile name): no spaces, not empty."""
    if not isinstance(value, str) or not value.strip() or len(value.split()) != 1:
        raise ValueError(f"expected one word such as us-east-1, got {show(value)}")
    return value.strip()


def parse_words(value: Any) -> tuple[str, ...]:
    """A word or a list of words (cache ids)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"expected an id or a list of ids, got {show(value)}")
    return tuple(parse_word(item) for item in items)


def parse_tags(value: Any) -> tuple[tuple[str, str], ...]:
    """A mapping of tag key to value, kept as pairs (hashable)."""
    if not isinstance(value, dict) or not value:
        raise ValueError(f"expected a mapping of tag keys to values, got {show(value)}")
    if not all(isinstance(k, str) and isinstance(v, str | int | float) for k, v in value.items()):
        raise ValueError(f"expected tag keys and values as text, got {show(value)}")
    return tuple((k, str(v)) for k, v in value.items())
