"""Redis Cluster through a NAT host: ``rewrite`` puts the NAT host's ports into replies
(redirects and CLUSTER SLOTS / SHARDS / NODES / REPLICAS); ``topology`` parses those
replies into nodes for discovery. Both read frames through ``fields``.
"""

from .fields import blank
from .rewrite import (
    ASK_CLUSTER,
    ASK_EXEC,
    ASK_REDIRECT,
    REWRITERS,
    ClusterRewriter,
    IdMapper,
    Mapper,
    Redirect,
    Remapper,
    parse_redirect,
    rewrite_asked,
    rewrite_node_line,
    rewrite_nodes,
    rewrite_nodes_text,
    rewrite_redirect,
    rewrite_replicas,
    rewrite_shards,
    rewrite_slots,
)
from .topology import (
    ClusterNode,
    Topology,
    TopologyError,
    parse_topology,
    topology_from_nodes,
    topology_from_shards,
    topology_from_slots,
)

__all__ = [
    "ASK_CLUSTER",
    "ASK_EXEC",
    "ASK_REDIRECT",
    "REWRITERS",
    "ClusterNode",
    "ClusterRewriter",
    "IdMapper",
    "Mapper",
    "Redirect",
    "Remapper",
    "Topology",
    "TopologyError",
    "blank",
    "parse_redirect",
    "parse_topology",
    "rewrite_asked",
    "rewrite_node_line",
    "rewrite_nodes",
    "rewrite_nodes_text",
    "rewrite_redirect",
    "rewrite_replicas",
    "rewrite_shards",
    "rewrite_slots",
    "topology_from_nodes",
    "topology_from_shards",
    "topology_from_slots",
]
