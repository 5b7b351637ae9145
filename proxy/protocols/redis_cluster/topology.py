"""Parse a cluster's topology from CLUSTER SHARDS, SLOTS or NODES, for discovery."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from ..resp import (
    Bytes,
    Frame,
    ProtocolError,
    parse_one,
)
from .fields import _b, _fields, _port, _s, _str


class TopologyError(ValueError):
    """A CLUSTER SHARDS / SLOTS / NODES reply that is an error or not the expected shape."""


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """One node as the cluster describes it.

    ``host`` is the endpoint the cluster sends clients to (its preferred endpoint; its ip,
    else the queried host, when the reply gives NULL, "" or "?"). ``slots`` are the ranges
    served by the node's shard (for a replica: its master's). ``health`` comes from CLUSTER
    SHARDS ("online", "failed", "loading") or CLUSTER NODES flags; CLUSTER SLOTS lists only
    serving nodes.
    """

    node_id: str
    host: str
    port: int
    tls_port: int = 0
    ip: str = ""
    hostname: str = ""
    role: Literal["master", "replica"] = "master"
    master_id: str = ""
    health: str = "online"
    slots: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Topology:
    """The cluster's nodes, from whichever command could be run."""

    nodes: tuple[ClusterNode, ...] = field(default_factory=tuple)
    source: str = ""  # "shards", "slots" or "nodes"

    @property
    def masters(self) -> tuple[ClusterNode, ...]:
        return tuple(n for n in self.nodes if n.role == "master")

    def by_id(self) -> dict[str, ClusterNode]:
        return {n.node_id: n for n in self.nodes}

    def owner(self, slot: int) -> ClusterNode | None:
        """The master serving ``slot``, if any."""
        for n in self.masters:
            if any(a <= slot <= b for a, b in n.slots):
                return n
        return None


def _check(frame: Frame, what: str) -> None:
    if frame.is_error:
        raise TopologyError(f"{what} failed: {_s(frame.bytes_value or b'')}")
    if not isinstance(frame.value, list):
        raise TopologyError(f"{what} reply is not an array (type {frame.kind!r})")


def _int(f: Frame | None, what: str) -> int:
    value = _port(f)
    if value is None:
        raise TopologyError(f"{what} is not an integer")
    return value


def _ranges(values: list[int]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((values[i], values[i + 1]) for i in range(0, len(values) - 1, 2)))


def topology_from_shards(frame: Frame, default_host: str) -> Topology:
    """Parse a CLUSTER SHARDS reply (Redis 7.0+; RESP2 or RESP3)."""
    _check(frame, "CLUSTER SHARDS")
    nodes: list[ClusterNode] = []
    try:
        for shard in frame.items:
            f = _fields(shard)
            slots = _ranges([_int(s, "slot") for s in f[b"slots"].items])
            members = [_fields(node) for node in f[b"nodes"].items]
            master = next((_str(m.get(b"id")) for m in members
                           if _str(m.get(b"role")) == "master"), "")
            for m in members:
                ip, hostname = _str(m.get(b"ip")) or "", _str(m.get(b"hostname")) or ""
                endpoint = _str(m.get(b"endpoint"))
                role: Literal["master", "replica"] = (
                    "master" if _str(m.get(b"role")) == "master" else "replica")
                nodes.append(ClusterNode(
                    node_id=_str(m[b"id"]) or "",
                    host=endpoint if endpoint and endpoint != "?" else (ip or default_host),
                    port=_port(m.get(b"port")) or 0,
                    tls_port=_port(m.get(b"tls-port")) or 0,
                    ip=ip, hostname=hostname, role=role,
                    master_id="" if role == "master" else (master or ""),
                    health=_str(m.get(b"health")) or "online",
                    slots=slots,
                ))
    except KeyError as exc:
        raise TopologyError(f"CLUSTER SHARDS entry without {exc.args[0]!r}") from None
    return Topology(tuple(nodes), "shards")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(slots=True)
class _SlotsNode:
    host: str
    port: int
    ip: str
    hostname: str
    master_id: str
    slots: list[tuple[int, int]] = field(default_factory=list)


def topology_from_slots(frame: Frame, default_host: str) -> Topology:
    """Parse a CLUSTER SLOTS reply (any version; RESP2 or RESP3).

    The first node of each range is its master. Ranges of one node are merged; a node
    without an id (Redis < 4) is named ``host:port``.
    """
    _check(frame, "CLUSTER SLOTS")
    found: dict[str, _SlotsNode] = {}
    for rng in frame.items:
        items = rng.items
        if len(items) < 3:
            raise TopologyError("CLUSTER SLOTS range without a master")
        start, end = _int(items[0], "slot"), _int(items[1], "slot")
        master_id = ""
        for i, node in enumerate(items[2:]):
            f = node.items
            if len(f) < 2:
                raise TopologyError("CLUSTER SLOTS node without endpoint and port")
            endpoint = _str(f[0])
            port = _int(f[1], "port")
            meta = _fields(f[3]) if len(f) > 3 else {}
            meta_ip = _str(meta.get(b"ip"))
            host = endpoint if endpoint and endpoint != "?" else (meta_ip or default_host)
            node_id = (_str(f[2]) if len(f) > 2 else None) or f"{host}:{port}"
            if i == 0:
                master_id = node_id
            acc = found.get(node_id)
            if acc is None:
                endpoint_is_ip = bool(endpoint) and _is_ip(endpoint or "")
                acc = found[node_id] = _SlotsNode(
                    host=host, port=port,
                    ip=meta_ip or (endpoint or "" if endpoint_is_ip else ""),
                    hostname=_str(meta.get(b"hostname")) or (
                        "" if endpoint_is_ip or endpoint == "?" else endpoint or ""),
                    master_id="" if i == 0 else master_id,
                )
            acc.slots.append((start, end))
    return Topology(tuple(
        ClusterNode(node_id=node_id, host=a.host, port=a.port, ip=a.ip, hostname=a.hostname,
                    role="replica" if a.master_id else "master", master_id=a.master_id,
                    slots=tuple(sorted(a.slots)))
        for node_id, a in found.items()
    ), "slots")


def topology_from_nodes(text: bytes | str, default_host: str) -> Topology:
    """Parse CLUSTER NODES text. Nodes without an address (``:0``) are left out."""
    if isinstance(text, str):
        text = _b(text)
    parsed: list[tuple[str, str, int, str, str, str, str, list[tuple[int, int]]]] = []
    for line in text.splitlines():
        fields = line.split(b" ")
        if not line.strip():
            continue
        if len(fields) < 8:
            raise TopologyError(f"CLUSTER NODES line with {len(fields)} fields: {line[:80]!r}")
        node_id, addr, flags = _s(fields[0]), fields[1], _s(fields[2]).split(",")
        hostport, _, rest = addr.partition(b"@")
        ip, _, port_s = hostport.rpartition(b":")
        if not port_s.isdigit():
            raise TopologyError(f"CLUSTER NODES address {addr!r} has no port")
        port = int(port_s)
        if port == 0 or "noaddr" in flags or "handshake" in flags:
            continue
        extras = rest.split(b",")
        hostname = _s(extras[1]) if len(extras) > 1 and b"=" not in extras[1] else ""
        role = "master" if "master" in flags else "replica"
        health = "failed" if ("fail" in flags or "fail?" in flags) else "online"
        master = _s(fields[3]) if fields[3] != b"-" else ""
        slots: list[tuple[int, int]] = []
        for s in fields[8:]:
            a, dash, b = s.partition(b"-")
            if s.startswith(b"["):
                continue  # a slot being imported or migrated
            if not a.isdigit() or (dash and not b.isdigit()):
                raise TopologyError(f"CLUSTER NODES slot field {s!r}")
            slots.append((int(a), int(b) if dash else int(a)))
        parsed.append((node_id, _s(ip) or default_host, port, hostname, role, master, health,
                       slots))
    by_id = {p[0]: p for p in parsed}
    nodes = []
    for node_id, host, port, hostname, role, master, health, slots in parsed:
        if role == "replica" and master in by_id:
            slots = by_id[master][7]
        nodes.append(ClusterNode(
            node_id=node_id, host=host, port=port, ip=host, hostname=hostname,
            role="master" if role == "master" else "replica", master_id=master,
            health=health, slots=tuple(sorted(slots)),
        ))
    return Topology(tuple(nodes), "nodes")


def parse_topology(raw: Bytes, command: Literal["shards", "slots", "nodes"],
                   default_host: str) -> Topology:
    """Parse the raw reply to ``CLUSTER <command>``; raises ``TopologyError``."""
    try:
        frame = parse_one(raw)
    except ProtocolError as exc:
        raise TopologyError(f"CLUSTER {command.upper()} reply is not RESP: {exc}") from None
    if command == "shards":
        return topology_from_shards(frame, default_host)
    if command == "slots":
        return topology_from_slots(frame, default_host)
    if frame.is_error:
        raise TopologyError(f"CLUSTER NODES failed: {_s(frame.bytes_value or b'')}")
    text = frame.bytes_value
    if text is None:
        raise TopologyError("CLUSTER NODES reply is not a string")
    return topology_from_nodes(text, default_host)
