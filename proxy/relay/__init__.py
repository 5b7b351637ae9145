"""Every way bytes move between a client and its upstream, one module each.

- ``engine``: the native engine (``engine.c``, built at install where a C compiler
  exists) and its Python face. Plain TCP listeners; no request wakes Python.
- ``splice``: the Python zero-copy relay (splice(2) through pooled pipes) for
  plain listeners where the engine was not built; one direction's hot path is
  ``splice_way``, the per-loop pipe pool, parking and watchdog ``splice_hub``.
- ``buffered``: the asyncio relay (transports over one scratch buffer per loop):
  TLS on either leg, any platform, and the base the cluster relays rewrite on.
- ``choose``: which of them serves a listener, a pure function with its rules.
- ``pipes`` (the pipe pool, the copy rules both zero-copy relays share) and ``hubs``
  (one hub per event loop) serve the engine and the splice relay alike.
"""
