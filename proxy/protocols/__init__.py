"""Sans-IO protocol layers: bytes in, frames and rewritten bytes out, no sockets.

- ``resp``: RESP2/RESP3, one module per step: ``framing`` (frame boundaries), ``frames``
  (parse/encode), ``requests`` (client commands), ``matching`` (which reply answers what).
- ``redis_cluster``: rewriting of Redis Cluster redirects and node lists, topology parsing.
- ``memcache``: memcached text-protocol framing and ElastiCache auto-discovery rewriting.

The listener owns the sockets and feeds these objects whatever chunks it reads.
"""
