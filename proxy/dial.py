"""Dial a listener's upstream for one new connection.

::

    dial(config, target) --Resolver (dns_ttl)--> addresses --sock_connect, in turn--> socket
                         |<------------------ one connect_timeout ------------------>|
    none answers: the refusal reason (dns_failed, upstream_connect_failed), logged; a
    name's cached answer is dropped so the next dial asks DNS again
"""

from __future__ import annotations

import asyncio
import logging
import socket

from . import closes
from .config import Address, ListenerConfig
from .logs import RateLimitedLog
from .resolver import ResolveError, Resolver

log = logging.getLogger("cacheport.listener")


class Dialer:
    """Connects one listener's clients' upstream sockets; owns the warning when it cannot."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolver: Resolver,
                 listener: str) -> None:
        self.loop = loop
        self.resolver = resolver
        self.listener = listener  # its name: a reload matches listeners by name
        self.warn = RateLimitedLog(log)

    async def dial(self, config: ListenerConfig, target: Address) -> socket.socket | str:
        """Connect to ``target``, trying each address; the refusal reason (logged) when
        none answers."""
        deadline = self.loop.time() + config.connect_timeout
        try:
            async with asyncio.timeout(config.connect_timeout):
                addresses = await self.resolver.resolve(target, config.dns_ttl)
        except (TimeoutError, ResolveError) as exc:
            reason = "DNS lookup timed out" if isinstance(exc, TimeoutError) else str(exc)
            self.warn.warning(
                "listener %s: cannot reach upstream %s: %s; client closed",
                self.listener, target, reason, listener=self.listener, upstream=str(target),
                reason=closes.DNS_FAILED)
            return closes.DNS_FAILED
        last_error = "no address"
        for family, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                async with asyncio.timeout_at(deadline):
                    await self.loop.sock_connect(sock, sockaddr)
            except TimeoutError:
                sock.close()
                last_error = f"no answer within connect_timeout {config.connect_timeout:g}s"
                break
            except OSError as exc:
                sock.close()
                last_error = exc.strerror or str(exc)
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        if not target.is_ip:
            self.resolver.forget(target)
        self.warn.warning(
            "listener %s: cannot connect to upstream %s: %s; client closed",
            self.listener, target, last_error, listener=self.listener, upstream=str(target),
            reason=closes.UPSTREAM_CONNECT_FAILED)
        return closes.UPSTREAM_CONNECT_FAILED
