"""Which node a role port of a replication group sends a new connection to; pure.

::

    primary_port --> the node discovery last found to be master
    reader_port  --> the healthy replica with the fewest connections through reader_port
                     (ties: round robin), else the primary -- like ElastiCache's reader
                     endpoint, which falls back to the primary in a group without replicas

Counts are the reader listener's established connections; connections still dialling
are not counted, so a burst of simultaneous clients is spread by the round-robin
tie-break rather than piled onto one replica.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..config import Address


def choose_reader(replicas: Sequence[Address], counts: Mapping[Address, int],
                  primary: Address | None, turn: int) -> Address | None:
    """Least connections over ``replicas`` (the healthy ones, in a stable order); ties go
    to the first at or after ``turn`` (mod their number). No replica: ``primary``."""
    if not replicas:
        return primary
    n = len(replicas)
    start = turn % n
    best: Address | None = None
    best_count = 0
    for i in range(n):
        candidate = replicas[(start + i) % n]
        count = counts.get(candidate, 0)
        if best is None or count < best_count:
            best, best_count = candidate, count
    return best


def failed_over(old_primary: Address | None, new_primary: Address | None) -> bool:
    """A failover is a primary that changed to another known node (not the first find,
    and not a discovery that found no primary)."""
    return old_primary is not None and new_primary is not None and old_primary != new_primary
