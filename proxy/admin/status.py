"""What ``/status`` and the status page say, built a slice at a time on the loop.

``readiness`` and ``listener_status`` take values and return values. ``Slicer`` keeps a
long build (thousands of listeners) from holding the event loop: the builder calls it
after each item, and it yields to the loop once ``SLICE_SECONDS`` have gone by. At 3,000
listeners one ``/status`` held the loop ~475 ms in one piece; sliced, the relays and
checks get the loop back every few milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from ..health.monitor import HealthMonitor, Target
from ..health.state import State, choose_upstream
from ..listener import Listener

SLICE_SECONDS = 0.002


class Slicer:
    """``await slicer()`` after each piece of work: yields to the loop every few ms."""

    def __init__(self, budget: float = SLICE_SECONDS) -> None:
        self.budget = budget
        self.began = time.perf_counter()

    async def __call__(self) -> None:
        if time.perf_counter() - self.began >= self.budget:
            await asyncio.sleep(0)
            self.began = time.perf_counter()


def _healthy(state: State | None) -> bool:
    return state is None or state is State.UP


def readiness(listeners: list[Listener], monitor: HealthMonitor | None,
              requires_healthy: bool, draining: bool = False) -> tuple[bool, str]:
    """Ready when every listener accepts and, if asked, at least one upstream is healthy.

    A host that is draining is never ready: that is how a load balancer learns to send
    new clients elsewhere while this one still accepts (``drain_delay``).
    """
    if draining:
        return False, "not ready: draining (stop requested)"
    if not listeners:
        return False, "not ready: no listeners"
    idle = [lst.name for lst in listeners if not lst.accepting]
    if idle:
        return False, f"not ready: not accepting on {', '.join(idle)}"
    if requires_healthy:
        states = [monitor.state(lst.name, addr) if monitor is not None else None
                  for lst in listeners for addr in lst.config.upstreams]
        if not any(_healthy(s) for s in states):
            return False, "not ready: no upstream is healthy"
    return True, "ready"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _target_status(target: Target | None) -> dict[str, Any]:
    if target is None:
        return {"health": "unchecked"}
    out: dict[str, Any] = {
        "health": target.state.value,
        "since": _iso(target.since),
        "state_changes": target.changes,
        "checks": {"ok": target.checks_ok, "failed": target.checks_failed},
        "last_check": None,
    }
    if target.last is not None:
        out["last_check"] = {
            "ok": target.last.ok,
            "reason": target.last.reason,
            "at": _iso(target.last_at),
            "duration_seconds": round(target.last_duration or 0.0, 6),
            **({"detail": dict(target.last.detail)} if target.last.detail else {}),
        }
    return out


def listener_status(listener: Listener, monitor: HealthMonitor | None) -> dict[str, Any]:
    """One listener for ``/status``; never includes credentials (only the check's timing)."""
    lc = listener.config
    targets = {t.upstream: t for t in monitor.targets_of(lc.name)} if monitor else {}

    def state_of(addr: Any) -> State | None:
        target = targets.get(addr)
        return target.state if target is not None else None

    in_use = choose_upstream((addr, state_of(addr)) for addr in lc.upstreams)
    # A reader port spreads new connections over the healthy replicas; its upstream is
    # the fallback for when there is none.
    replicas = listener.candidates() if listener.candidates is not None else []
    totals = listener.book.totals()
    shown = [*replicas, *(a for a in lc.upstreams if a not in replicas)]
    shown += [a for a in totals if a not in shown]
    upstreams = []
    for addr in shown:
        active, up, down = totals.get(addr, (0, 0, 0))
        counters = listener.book.counters.get(addr)
        upstreams.append({
            "address": str(addr),
            "role": "replica" if addr in replicas else
                    ("fallback" if replicas else "upstream") if addr == lc.upstream else
                    "backup" if addr in lc.backup else "former",
            "in_use": addr in replicas if replicas else addr == in_use,
            **_target_status(targets.get(addr)),
            "active": active,
            "connections": counters.connections if counters else 0,
            "bytes_upstream": up,
            "bytes_downstream": down,
        })
    health = lc.health
    return {
        "name": lc.name,
        "listen": str(listener.bound or lc.listen),
        "protocol": lc.protocol,
        "accepting": listener.accepting,
        "on_down": lc.on_down,
        "check": None if health is None else {
            "kind": health.kind, "interval": health.interval, "timeout": health.timeout,
            "rise": health.rise, "fall": health.fall,
        },
        "relay": listener.relay.value,  # engine, splice or buffered: who moves the bytes
        "accepted": listener.stats.accepted,
        "active": listener.active,
        "refused": dict(sorted(listener.stats.refused.items())),
        "proxy_protocol": lc.proxy_protocol,
        # Behind a load balancer with proxy_protocol, these are the header's addresses.
        "clients": listener.top_clients(),
        "upstreams": upstreams,
    }


class LazyListeners:
    """A document's ``listeners``, each built only when the encoder reaches it.

    Built all at once, 3,000 listeners' dicts (~100,000 objects) stayed alive while they
    grew, and the cyclic GC walked them again and again: 30-70 ms held at a time. One at
    a time, each is encoded and freed by reference counting before the next exists.
    """

    def __init__(self, listeners: Iterable[Listener], monitor: HealthMonitor | None) -> None:
        self.listeners = list(listeners)
        self.monitor = monitor

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (listener_status(lst, self.monitor) for lst in self.listeners)


Listeners = list[dict[str, Any]] | LazyListeners


async def json_parts(doc: dict[str, Any], slicer: Slicer, pretty: bool = False) -> list[bytes]:
    """``doc`` as JSON in pieces, ``listeners`` (the long list) one item at a time.

    The same text as ``json.dumps(doc)`` (or ``indent=2`` when ``pretty``). Compact by
    default: the C encoder takes ~0.03 ms a listener where the pure-Python indenting one
    (used whenever ``indent`` is set) took ~0.3 ms, 1 s of CPU per /status at 3,000.
    """
    if not isinstance(doc.get("listeners"), list | LazyListeners):
        return [_dumps(doc, pretty).encode() + b"\n"]
    keys = list(doc)
    at = keys.index("listeners")
    before = {k: doc[k] for k in keys[:at]}
    after = {k: doc[k] for k in keys[at + 1:]}
    items: Listeners = doc["listeners"]
    if not pretty:
        head = _dumps(before, False)[:-1] + (", " if before else "") + '"listeners": ['
        parts = [head]
        for index, item in enumerate(items):
            parts.append((", " if index else "") + json.dumps(item))
            await slicer()
        tail = _dumps(after, False)[1:] if after else "}"
        parts.append("]" + (", " + tail if after else tail) + "\n")
        return [p.encode() for p in parts]
    parts = [_members(before, first=True) + (",\n" if before else "") + '  "listeners": [']
    for index, item in enumerate(items):
        text = json.dumps(item, indent=2).replace("\n", "\n    ")
        parts.append(("," if index else "") + "\n    " + text)
        await slicer()
    close = "\n  ]" if len(parts) > 1 else "]"
    parts.append(close + ("," + _members(after) if after else "") + "\n}\n")
    return [p.encode() for p in parts]


def _dumps(doc: dict[str, Any], pretty: bool) -> str:
    return json.dumps(doc, indent=2) if pretty else json.dumps(doc)


def _members(members: dict[str, Any], first: bool = False) -> str:
    """``members`` as the inside of an indented JSON object (no braces)."""
    if not members:
        return "{\n" if first else ""
    text = json.dumps(members, indent=2)[1:-2]  # drop "{" and "\n}"
    return ("{" if first else "") + text
