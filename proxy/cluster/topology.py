"""A cluster's decisions, free of I/O: which listeners its nodes want, and the node maps.

::

    nodes (discovery) + PortBook --desired_listeners--> name -> (ListenerConfig, identity)
    desired + the listeners that are up --node_maps--> endpoint -> (announce, port)

The manager (cluster/manager.py) runs discovery, writes the state file and adds or
removes listeners; everything it decides along the way is a function here, taking
values and returning values, so it is tested without sockets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import Address, ClusterConfig, ListenerConfig, UpstreamTlsConfig
from .discovery import Node
from .ports import PortBook

Desired = dict[str, tuple[ListenerConfig, str | None]]  # name -> (config, node identity)


def listener_name(cluster: str, port: int | None) -> str:
    """``<cluster>:<port>`` for a node, ``<cluster>:seed`` for the seed listener.

    Config names never contain ':', so these never clash with the port map's own.
    """
    return f"{cluster}:{port}" if port is not None else f"{cluster}:seed"


def role_listener_name(cluster: str, role: str) -> str:
    """``<cluster>:primary`` / ``<cluster>:reader``: a replication group's role ports."""
    return f"{cluster}:{role}"


def primary_of(nodes: Iterable[Node]) -> Node | None:
    """redis-replication: the node discovery found to be master."""
    return next((n for n in nodes if n.role == "master"), None)


def healthy_replicas(nodes: Mapping[str, Node], book: PortBook) -> list[Address]:
    """redis-replication: replicas in sync with the master, in port order."""
    found = [(book.port_of(i) or 0, n.address) for i, n in nodes.items()
             if n.role == "replica" and n.health == "online"]
    # Two replicas with no port yet (both 0) must not fall back to comparing Addresses.
    return [address for _, address in sorted(found, key=lambda pa: (pa[0], str(pa[1])))]


def node_tls(config: ClusterConfig, node: Node) -> UpstreamTlsConfig | None:
    """The node's name to verify: its hostname; a replication group's nodes are known
    by IP only, so there the seed's DNS name (ElastiCache certificates are wildcards
    over the group's names)."""
    upstream_tls = config.template.upstream_tls
    if upstream_tls is None or upstream_tls.server_name is not None:
        return upstream_tls
    name = node.hostname
    if not name and config.engine == "redis-replication" and not config.seed.is_ip:
        name = config.seed.host
    return dataclasses.replace(upstream_tls, server_name=name) if name else upstream_tls


def desired_listeners(config: ClusterConfig, nodes: Mapping[str, Node],
                      book: PortBook) -> Desired:
    """Listener name -> (config, identity of its node; None for the seed and role ports)."""
    template = config.template
    host = config.listen_host
    out: Desired = {}
    if config.seed_port is not None:
        name = listener_name(config.name, None)
        out[name] = (dataclasses.replace(template, name=name,
                                         listen=Address(host, config.seed_port)), None)
    primary = primary_of(nodes.values())
    for role, port in (("primary", config.primary_port), ("reader", config.reader_port)):
        if port is None or primary is None:
            continue  # no master known yet: nothing to forward to
        name = role_listener_name(config.name, role)
        out[name] = (dataclasses.replace(
            template, name=name, listen=Address(host, port), upstream=primary.address,
            upstream_tls=node_tls(config, primary)), None)
    for identity, node in nodes.items():
        port = book.port_of(identity)
        if port is None:
            continue
        name = listener_name(config.name, port)
        out[name] = (dataclasses.replace(template, name=name, listen=Address(host, port),
                                         upstream=node.address,
                                         upstream_tls=node_tls(config, node)), identity)
    return out


@dataclass(frozen=True, slots=True)
class NodeMaps:
    """What the rewriters map node addresses to, for the nodes whose listener is up."""

    redis: dict[tuple[str, int], tuple[str, int]]  # internal endpoint -> (announce, port)
    redis_ids: dict[str, tuple[str, int]]  # node id -> (announce, its port)
    mc_ports: dict[str, int]  # Memcached hostname -> its port

    def engine_entries(self) -> list[tuple[bytes, int, bytes]]:
        """``redis`` as the engine's node map takes it: (host, port, b"announce:port")."""
        return [(_utf8(h), p, b"%s:%d" % (_utf8(a), ap)) for (h, p), (a, ap) in self.redis.items()]


def node_maps(announce: str, desired: Desired, up: Collection[str],
              nodes: Mapping[str, Node]) -> NodeMaps:
    """Only nodes whose listener is ``up`` are mapped; the rest count as unmapped."""
    redis: dict[tuple[str, int], tuple[str, int]] = {}
    redis_ids: dict[str, tuple[str, int]] = {}
    mc_ports: dict[str, int] = {}
    for name, (lc, identity) in desired.items():
        if identity is None or name not in up:
            continue
        node = nodes[identity]
        target = (announce, lc.listen.port)
        for endpoint in (*node.endpoints, (node.address.host, node.address.port)):
            redis[endpoint] = target
        redis_ids[identity] = target
        mc_ports[identity] = lc.listen.port
    return NodeMaps(redis, redis_ids, mc_ports)


def nodes_to_json(nodes: Iterable[Node]) -> dict[str, Any]:
    """The nodes' addresses as the state file keeps them (a restart serves them at once)."""
    return {n.identity: {"host": n.address.host, "port": n.address.port,
                         "hostname": n.hostname, "role": n.role,
                         "endpoints": [list(e) for e in n.endpoints]}
            for n in nodes}


def nodes_from_json(raw_nodes: Any) -> list[Node]:
    """The nodes a state file remembers; entries that do not parse are skipped."""
    remembered: list[Node] = []
    for identity, raw in (raw_nodes.items() if isinstance(raw_nodes, dict) else ()):
        try:
            endpoints = tuple((str(h), int(p)) for h, p in raw.get("endpoints", ()))
            remembered.append(Node(identity=identity,
                                   address=Address(str(raw["host"]), int(raw["port"])),
                                   hostname=str(raw.get("hostname", "")),
                                   role=str(raw.get("role", "master")),
                                   health="unknown", endpoints=endpoints))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return remembered


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")
