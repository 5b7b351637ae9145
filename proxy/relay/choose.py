"""Which relay serves a listener's new connection: a pure function of its config.

=====================================  ==================================
listener                               relays tried, best first
=====================================  ==================================
cluster node (Redis Cluster or the      engine (framing it), buffered
Memcached configuration endpoint),
``relay: auto``/``native``
cluster, any other                     buffered (its rewriting subclass)
``tls`` or ``upstream_tls``,          engine (doing TLS too), buffered
``relay: auto``/``native``
``tls`` or ``upstream_tls``,           buffered
``relay: python``
``relay: python``, ``copy: buffer``    buffered
``relay: python``, ``copy: auto``/     splice, buffered
``splice``
``relay: auto``/``native``,            engine, buffered
``copy: buffer``
``relay: auto``/``native``, other      engine, splice, buffered
=====================================  ==================================

The engine moves bytes cacheport need not see, and frames cluster connections
(proxy/relay/resp_framer.c, mc_framer.c) unless the cluster's listeners ask for
``relay: python``: Redis's own test suite passes through the native framer as it does
direct (bench/conformance.py kind ``native-cluster``). TLS listeners have the engine run
the handshakes and OpenSSL's record layer (tls_engine.c; Redis's own test suite passes
through it, kind ``tls-native``); ``relay: python`` keeps them on the buffered relay,
which does TLS in Python. A relay is
skipped when it cannot serve here: the engine when it was not built (no C compiler
at install, not Linux), was built without libssl (a TLS listener), or cannot start a
thread, splice when the kernel lacks splice(2). ``copy`` then still tells the engine how
to copy (docs/hot-loop.md).
"""

from __future__ import annotations

import enum

from ..config import ListenerConfig


class RelayKind(enum.Enum):
    ENGINE = "engine"  # relay/engine.py + engine.c: a compiled epoll thread
    SPLICE = "splice"  # relay/splice.py: splice(2) driven from the event loop
    BUFFERED = "buffered"  # relay/buffered.py: asyncio transports over one scratch buffer


def relay_order(config: ListenerConfig, *, rewriting: bool = False,
                framed: bool = False) -> tuple[RelayKind, ...]:
    """The relays to try for ``config``'s connections, best first; always ends buffered.

    ``framed``: the engine can frame this rewriting listener's protocol.
    """
    if rewriting:
        if framed and config.relay != "python" and config.may_splice:
            return (RelayKind.ENGINE, RelayKind.BUFFERED)
        return (RelayKind.BUFFERED,)
    if not config.may_splice:  # TLS on a leg: records are encrypted in userspace
        if config.relay != "python":
            return (RelayKind.ENGINE, RelayKind.BUFFERED)
        return (RelayKind.BUFFERED,)
    order: list[RelayKind] = []
    if config.relay != "python":
        order.append(RelayKind.ENGINE)
    if config.copy != "buffer":
        order.append(RelayKind.SPLICE)
    order.append(RelayKind.BUFFERED)
    return tuple(order)


def serving_relay(config: ListenerConfig, available: frozenset[RelayKind], *,
                  rewriting: bool = False, framed: bool = False) -> RelayKind:
    """The relay that serves ``config``'s connections: the first of ``relay_order`` that
    is ``available``. Values in, value out, so a silent fallback can be named at start."""
    for kind in relay_order(config, rewriting=rewriting, framed=framed):
        if kind in available:
            return kind
    return RelayKind.BUFFERED
