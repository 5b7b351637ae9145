"""A listener's TLS outside the relays' byte loops: the ClientHello read for
``sni_routes``, the handshakes the buffered relay runs in Python, and the reports of
those the native engine runs.

::

    client --ClientHello (peeked)--> sni_route --> the upstream for its server name
    client <==TLS==> Relay.client        Relay.upstream <==TLS==> upstream   (buffered)
    native engine --on_tls_failure / on_tls_peer--> engine_failed / engine_peer

A failed handshake is counted and worded alike whichever relay ran it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from . import closes, preread
from .config import Address, ListenerConfig
from .logs import RateLimitedLog
from .protocols import tls_hello
from .relay import tls_layer
from .tls import LEG_CLIENT, LEG_UPSTREAM, ListenerTls, record_certificate_expiry

log = logging.getLogger("cacheport.listener")

# sni_routes: how long a client may take to send its whole ClientHello.
CLIENT_HELLO_TIMEOUT = 5.0


def _failure(exc: BaseException) -> str:
    """Why a handshake failed, in words for the log."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "handshake timed out"
    return str(exc) or type(exc).__name__


class Handshakes:
    """One listener's TLS: the contexts its connections use (``tls``, replaced on every
    reload), the handshakes Python runs with them, their rate-limited warning."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: str, tls: ListenerTls,
                 refuse: Callable[[str], None]) -> None:
        self.loop = loop
        self.listener = listener  # its name: a reload matches listeners by name
        self.tls = tls
        self.refuse = refuse  # counts a refusal on the listener
        self.warn = RateLimitedLog(log)
        # notAfter of the certificate the peers showed the engine at their last handshake,
        # per leg ("upstream", "client").
        self.peer_expiry: dict[str, float] = {}

    async def sni_route(self, client: socket.socket, source: str,
                        config: ListenerConfig) -> Address | None:
        """sni_routes: the upstream for the server name in the client's ClientHello, which
        stays in the stream for it; None (counted, logged) refuses the client."""
        reason = detail = ""
        try:
            hello = await preread.peek(self.loop, client, tls_hello.parse,
                                       tls_hello.MAX_HELLO, CLIENT_HELLO_TIMEOUT)
        except tls_hello.HelloError as exc:
            reason, detail = exc.reason, str(exc)
        except TimeoutError:
            reason, detail = closes.CLIENT_HELLO_TIMEOUT, f"none within {CLIENT_HELLO_TIMEOUT:g}s"
        except (EOFError, OSError) as exc:
            reason, detail = closes.CLIENT_HELLO_INCOMPLETE, f"connection ended first ({exc})"
        else:
            name = hello.server_name
            target = config.sni_target(name) if name is not None else None
            if target is not None:
                return target
            reason, detail = (closes.SNI_NO_MATCH, f"no route for {name!r}") if name is not None \
                else (closes.SNI_MISSING, "the ClientHello names no server")
        self.refuse(reason)
        self.warn.warning("listener %s: closed a connection from %s: %s", self.listener,
                          source, detail)
        return None

    def upstream_name(self, config: ListenerConfig, target: Address | None) -> str | None:
        """SNI and the name the node's certificate must carry; a backup is another node:
        without an explicit server_name it is named by its host."""
        name = self.tls.server_name
        if target is not None and target != config.upstream and \
                config.upstream_tls is not None and config.upstream_tls.server_name is None:
            name = target.host
        return name

    async def with_client(self, side: asyncio.BufferedProtocol, client: socket.socket,
                          source: str, config: ListenerConfig) -> bool:
        """The client's handshake on the buffered relay's ``side``; False (logged) if it
        failed."""
        context = self.tls.server
        assert context is not None
        try:
            layer = await tls_layer.wrap(self.loop, side, client, context, server_side=True,
                                         handshake_timeout=config.connect_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            self.warn.warning("listener %s: TLS handshake with client %s failed: %s",
                              self.listener, source, _failure(exc), listener=self.listener,
                              client=source, reason=closes.TLS_HANDSHAKE_FAILED)
            return False
        self.tls.client_seen(layer.sslobj)  # the expiry gauge
        return True

    async def with_upstream(self, side: asyncio.BufferedProtocol, upstream: socket.socket,
                            config: ListenerConfig, target: Address) -> bool:
        """The handshake with the node on the buffered relay's ``side``; False (logged) if
        it failed."""
        name = self.upstream_name(config, target)
        context = self.tls.client
        assert context is not None
        try:
            layer = await tls_layer.wrap(self.loop, side, upstream, context, server_side=False,
                                         server_hostname=name,
                                         handshake_timeout=config.connect_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            self.warn.warning("listener %s: TLS handshake with upstream %s (name %s) "
                              "failed: %s; client closed", self.listener, target,
                              name, _failure(exc), listener=self.listener,
                              upstream=str(target), reason=closes.UPSTREAM_TLS_FAILED)
            return False
        self.tls.upstream_seen(layer.sslobj)  # the expiry gauge
        return True

    def engine_failed(self, side: int, reason: str, source: str, target: Address | None,
                      config: ListenerConfig) -> None:
        """A handshake the native engine ran failed (``side`` 0: the client's, 1: the
        node's): counted and logged as the Python relay's are."""
        if side == 0:
            self.refuse(closes.TLS_HANDSHAKE_FAILED)
            self.warn.warning("listener %s: TLS handshake with client %s failed: %s",
                              self.listener, source, reason)
        else:
            self.refuse(closes.UPSTREAM_TLS_FAILED)
            self.warn.warning("listener %s: TLS handshake with upstream %s (name %s) "
                              "failed: %s; client closed", self.listener, target,
                              self.upstream_name(config, target), reason)

    def engine_peer(self, side: int, not_after: float) -> None:
        """The notAfter of the certificate a peer showed the engine at a handshake: the
        node's (side 1), or a client's under mutual TLS (side 0)."""
        leg = LEG_CLIENT if side == 0 else LEG_UPSTREAM
        self.peer_expiry[leg] = not_after
        record_certificate_expiry(self.listener, leg, not_after)
