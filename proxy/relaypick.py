"""Which relay takes a listener's new connection, and building it.

::

    relay_order(config) --engine: choose_native gives a lane--> NativeRelay (it runs the
                        |                                        TLS too), or a cluster's
                        |                                        framing relay
                        --splice: choose_hub gives a hub------> SpliceRelay
                        --buffered----------------------------> the listener's RelayFactory

The order is relay/choose.py's pure table; here each relay in turn says whether it can
serve here and now (built on this install, a lane or a hub to be had).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .config import Address, ListenerConfig
from .handshake import Handshakes
from .relay.buffered import BufferPool, Relay
from .relay.choose import RelayKind, relay_order, serving_relay
from .relay.engine import (
    AnyRelay,
    NativeRelay,
    choose_native,
    native_available,
    native_tls_available,
    tls_spec,
)
from .relay.pipes import splice_supported
from .relay.splice import SpliceRelay, choose_hub
from .tls import ListenerTls

RelayFactory = Callable[[BufferPool, Callable[[Relay], None], str], Relay]
"""Builds the relay for each new connection: ``(pool, on_close, source) -> Relay``.

A cluster's factory may also have ``native(hub, bufsize, on_close, source) ->
NativeRelay``: the engine can frame its protocol (``relay: native``; relay/choose.py)."""


def relays_here(tls: bool = False) -> frozenset[RelayKind]:
    """The relays this install can run: the engine only where it was built (for ``tls``
    listeners, built with libssl), splice only where the kernel has splice(2); buffered
    everywhere."""
    here = {RelayKind.BUFFERED}
    if native_tls_available() if tls else native_available():
        here.add(RelayKind.ENGINE)
    if splice_supported():
        here.add(RelayKind.SPLICE)
    return frozenset(here)


def rewriting(factory: RelayFactory) -> bool:
    """A cluster listener's factory: its relays rewrite replies, so they never splice."""
    return factory is not Relay


def framed(factory: RelayFactory) -> bool:
    """A cluster listener's factory whose protocol the engine can frame (Redis Cluster)."""
    return getattr(factory, "native", None) is not None


def serving(config: ListenerConfig, factory: RelayFactory) -> RelayKind:
    """Which relay serves a listener's connections on this install (``/status``)."""
    return serving_relay(config, relays_here(tls=not config.may_splice),
                         rewriting=rewriting(factory), framed=framed(factory))


def engine_missing(config: ListenerConfig, factory: RelayFactory) -> bool:
    """The native engine would serve a listener, but it was not built here."""
    return (RelayKind.ENGINE in relay_order(config, rewriting=rewriting(factory),
                                            framed=framed(factory))
            and not native_available())


def new_relay(loop: asyncio.AbstractEventLoop, config: ListenerConfig, pool: BufferPool,
              factory: RelayFactory, on_close: Callable[[AnyRelay], None], source: str,
              target: Address, tls: ListenerTls, handshakes: Handshakes) -> AnyRelay:
    """The relay for a new connection from ``source`` to ``target``: the engine or a
    splice relay takes the raw sockets; the buffered Relay wraps them in transports.
    ``tls``: the contexts the connection began with; the engine reports its handshakes
    to ``handshakes``."""
    order = relay_order(config, rewriting=factory is not Relay,
                        framed=getattr(factory, "native", None) is not None)
    native = choose_native(loop, config, order) if RelayKind.ENGINE in order else None
    hub = choose_hub(loop, config) if native is None and RelayKind.SPLICE in order else None
    if native is not None and factory is not Relay:
        return factory.native(  # type: ignore[attr-defined,no-any-return]
            native, config.buffer_size, on_close, source)
    if native is not None:
        return NativeRelay(
            native, config.buffer_size, on_close, source, config.copy,
            tls=tls_spec(tls.server, tls.client, handshakes.upstream_name(config, target)),
            on_tls_failure=lambda side, why: handshakes.engine_failed(side, why, source,
                                                                      target, config),
            on_tls_peer=handshakes.engine_peer, handshake_timeout=config.connect_timeout)
    if hub is not None:
        return SpliceRelay(hub, pool, on_close, source, adaptive=config.copy == "auto")
    return factory(pool, on_close, source)
