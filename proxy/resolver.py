"""Upstream name resolution off the event loop, cached for a bounded time.

ElastiCache endpoints are DNS names whose addresses change when a node is
replaced or a primary fails over, so answers are kept for ``dns_ttl`` seconds
only, and dropped at once after a failed connect.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from .config import Address

log = logging.getLogger("cacheport.resolver")

Sockaddr = tuple[socket.AddressFamily, tuple[str, int] | tuple[str, int, int, int]]


class ResolveError(Exception):
    """The upstream's name did not resolve."""


class Resolver:
    """Caches ``getaddrinfo`` answers per name for their TTL; IP literals skip it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._cache: dict[Address, tuple[float, list[Sockaddr]]] = {}
        self._last_seen: dict[Address, list[str]] = {}

    async def resolve(self, target: Address, ttl: float) -> list[Sockaddr]:
        if target.is_ip:
            family = socket.AF_INET6 if target.is_ipv6 else socket.AF_INET
            return [(family, (target.host, target.port))]
        now = self.loop.time()
        cached = self._cache.get(target)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            infos = await self.loop.getaddrinfo(
                target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except socket.gaierror as exc:
            self._cache.pop(target, None)
            raise ResolveError(f"cannot resolve {target.host!r}: {exc.strerror}") from None
        addresses: list[Sockaddr] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            entry = (family, sockaddr)
            if entry not in addresses:
                addresses.append(entry)  # type: ignore[arg-type]
        if not addresses:
            raise ResolveError(f"{target.host!r} has no addresses")
        ips = [str(sockaddr[0]) for _family, sockaddr in addresses]
        previous = self._last_seen.get(target)
        if previous is not None and previous != ips:
            log.info("upstream %s now resolves to %s (was %s)", target,
                     ", ".join(ips), ", ".join(previous))
        self._last_seen[target] = ips
        self._cache[target] = (now + ttl, addresses)
        return addresses

    def forget(self, target: Address) -> None:
        """Drop a cached answer, e.g. after every address failed to connect."""
        self._cache.pop(target, None)

    def addresses(self, target: Address) -> list[str]:
        """The addresses last seen for ``target`` (for status output)."""
        if target.is_ip:
            return [target.host]
        return list(self._last_seen.get(target, []))
