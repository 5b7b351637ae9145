"""``sni_routes``: which upstream a TLS client's server name goes to (no TLS terminated).

A route's ``server_name`` is an exact name (``node-1.example.com``) or a one-label
wildcard (``*.abc123.use1.cache.amazonaws.com`` matches ``x.abc123...`` but neither
``abc123...`` itself nor ``a.b.abc123...``); names compare in lower case, as DNS does.
An exact route wins over a wildcard, as in nginx's ``server_name``. The route's
``upstream`` is ``host[:port]`` where ``{sni}`` stands for the name the client asked
for; without a port, the listener protocol's (6379, 11211).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .parsers import parse_upstream
from .values import Address, show

SNI = "{sni}"
_PLACEHOLDER = "sni-name-placeholder"
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def _dns_name(text: str, value: Any) -> str:
    name = text.lower()
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"expected a DNS name (letters, digits, '-', dots), got {show(value)}")
    return name


def parse_sni_pattern(value: Any) -> str:
    """``name`` or ``*.suffix`` (one label), in lower case."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a server name or *.suffix, got {show(value)}")
    text = value.strip()
    if text.startswith("*."):
        return "*." + _dns_name(text[2:], value)
    if "*" in text:
        raise ValueError(f"a wildcard is '*.' and a suffix, one label only, got {show(value)}")
    return _dns_name(text, value)


def parse_sni_upstream(value: Any, default_port: int | None = 0) -> Address:
    """``host[:port]`` whose host may hold ``{sni}``; port 0 when left to the protocol."""
    if not isinstance(value, str):
        raise ValueError(f"expected host[:port] (the host may hold {SNI}), got {show(value)}")
    text = value.strip()
    if "{" in text.replace(SNI, "") or "}" in text.replace(SNI, ""):
        raise ValueError(f"only {SNI} may stand in the upstream, got {show(value)}")
    address = parse_upstream(text.replace(SNI, _PLACEHOLDER), default_port)
    return Address(address.host.replace(_PLACEHOLDER, SNI), address.port)


@dataclass(frozen=True, slots=True)
class SniRoute:
    """One ``sni_routes`` entry: a pattern and the upstream its names go to."""

    server_name: str  # exact, or "*." + suffix
    upstream: Address  # its host may hold ``{sni}``; port 0: the protocol's default

    def target(self, name: str) -> Address:
        return Address(self.upstream.host.replace(SNI, name), self.upstream.port)


def route(routes: tuple[SniRoute, ...], name: str) -> SniRoute | None:
    """The route for ``name`` (lower case): an exact match, else the wildcard of its parent."""
    wildcard = "*." + name.partition(".")[2] if "." in name else None
    found = None
    for r in routes:
        if r.server_name == name:
            return r
        if found is None and r.server_name == wildcard:
            found = r
    return found
