"""Whether a new client may enter a listener, and under which address.

::

    accept
      |
      +-- proxy_protocol --> sender in proxy_protocol_from?    (proxy_protocol_untrusted)
      |                      PROXY header, bounded in time and size  (_malformed, _timeout,
      |                      -> the client is the header's source     _missing)
      v
    refusal(config, client, active, per_client) -> None: admit        (not_allowed,
                                                   or why not          max_connections...)

The decisions (``trusted_sender``, ``refusal``) take values and return values; the
listener owns the sockets, the counts and the task that reads the header, and calls
``AdmissionLog`` to word a refusal. Reasons are proxy/closes.py's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from . import closes, preread
from .config import ListenerConfig
from .logs import RateLimitedLog
from .protocols import proxy_header

log = logging.getLogger("cacheport.listener")

# The spec asks receivers to wait "at least 3 seconds to cover a TCP retransmit".
PROXY_HEADER_TIMEOUT = 3.0


def refusal(config: ListenerConfig, source: str, active: int,
            per_client: Mapping[str, int]) -> str | None:
    """Why a new client from ``source`` is refused, or None to admit it; ``active``: the
    listener's connections that count against max_connections, ``per_client``: its live
    connections per client address."""
    if config.allow is not None:
        ip = ipaddress.ip_address(source)
        if not any(ip in net for net in config.allow):
            return closes.NOT_ALLOWED
    limit = config.max_connections
    if limit is not None and active >= limit:
        return closes.MAX_CONNECTIONS
    limit = config.max_connections_per_client
    if limit is not None and per_client.get(source, 0) >= limit:
        return closes.MAX_CONNECTIONS_PER_CLIENT
    return None


def trusted_sender(config: ListenerConfig, peer: str) -> bool:
    """May ``peer`` (a load balancer) send this listener a PROXY header?"""
    trusted = config.proxy_protocol_from or ()
    return any(ipaddress.ip_address(peer) in net for net in trusted)


@dataclass(frozen=True, slots=True)
class Refused:
    """Why a PROXY header would not do: a proxy/closes.py reason, and words for the log."""

    reason: str
    detail: str


async def proxied_client(loop: asyncio.AbstractEventLoop, client: socket.socket, peer: str,
                         port: int, mode: proxy_header.Mode) -> tuple[str, int] | Refused:
    """The client a load balancer's PROXY header names (``peer``, ``port`` for a header
    with no address, such as LOCAL), or why the header would not do.

    The header's bytes, and only they, are taken off the stream: peeking leaves the
    stream untouched until the header is complete, so whatever the client sent after it
    stays in the kernel for the relay (native, splice, TLS).
    """
    try:
        header = await preread.peek(loop, client, lambda data: proxy_header.parse(data, mode),
                                    proxy_header.MAX_HEADER, PROXY_HEADER_TIMEOUT)
        # The bytes are in the kernel's buffer already: one recv takes exactly them.
        taken = client.recv(header.length)
        if len(taken) != header.length:
            raise EOFError("header shrank between peek and read")
    except proxy_header.HeaderError as exc:
        return Refused(closes.PROXY_MALFORMED, str(exc))
    except TimeoutError:
        return Refused(closes.PROXY_TIMEOUT, f"none complete within {PROXY_HEADER_TIMEOUT:g}s")
    except (EOFError, OSError) as exc:  # a reset or a close before the whole header
        return Refused(closes.PROXY_MISSING, f"connection ended first ({exc})")
    if header.source is None:
        return peer, port
    return sys.intern(header.source[0]), int(header.source[1])


class AdmissionLog:
    """The warnings for clients refused at admission, kept from flooding the log."""

    def __init__(self, listener: str) -> None:
        self.listener = listener  # its name: a reload matches listeners by name
        self._limit_warn = RateLimitedLog(log)
        self._proxy_warn = RateLimitedLog(log)
        self._not_allowed_seen: dict[str, float] = {}

    def refused(self, reason: str, source: str, config: ListenerConfig) -> None:
        """Word a ``refusal`` (its config's limits)."""
        name = self.listener
        if reason == closes.NOT_ALLOWED:
            self._not_allowed(source)
        elif reason == closes.MAX_CONNECTIONS:
            self._limit_warn.warning(
                "listener %s: max_connections %d reached; new clients are closed",
                name, config.max_connections, listener=name, reason=closes.MAX_CONNECTIONS)
        elif reason == closes.MAX_CONNECTIONS_PER_CLIENT:
            self._limit_warn.warning(
                "listener %s: client %s reached max_connections_per_client %d",
                name, source, config.max_connections_per_client, listener=name,
                client=source, reason=closes.MAX_CONNECTIONS_PER_CLIENT)

    def proxied(self, peer: str, reason: str, detail: str) -> None:
        """A load balancer's connection closed for its PROXY header (or its address)."""
        name = self.listener
        self._proxy_warn.warning("listener %s: closed a connection from %s: %s: %s",
                                 name, peer, reason, detail, listener=name, client=peer,
                                 reason=reason)

    def _not_allowed(self, source: str) -> None:
        """At most one line per source per minute, and a bounded memory of sources."""
        now = time.monotonic()
        last = self._not_allowed_seen.get(source)
        if last is not None and now - last < 60:
            return
        if len(self._not_allowed_seen) >= 4096:
            self._not_allowed_seen = {
                s: t for s, t in self._not_allowed_seen.items() if now - t < 60}
        self._not_allowed_seen[source] = now
        log.warning("listener %s: refused %s, not in its allow list", self.listener, source,
                    extra={"listener": self.listener, "client": source,
                           "reason": closes.NOT_ALLOWED})
