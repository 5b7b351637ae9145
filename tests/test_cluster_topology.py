"""A cluster's pure decisions (proxy/cluster/topology.py): values in, values out, no sockets."""

from __future__ import annotations

from typing import Any

from proxy.cluster import topology
from proxy.cluster.discovery import Node
from proxy.cluster.ports import PortBook
from proxy.config import Address, ClusterConfig
from tests.support import make_config


def cluster(**extra: Any) -> ClusterConfig:
    doc = {"name": "c", "engine": "redis-cluster", "seed": "cfg.example.internal:6379",
           "announce": "203.0.113.10", "listen": "127.0.0.1", "ports": "31000-31007", **extra}
    return make_config([], clusters=[doc]).clusters[0]


A = Node("a" * 40, Address("10.0.0.1", 6379), hostname="a.example.internal",
         endpoints=(("a.example.internal", 6379),))
B = Node("b" * 40, Address("10.0.0.2", 6379), role="replica")


def book_with(*nodes: Node) -> PortBook:
    book = PortBook(31000, 31007, 60.0)
    book.assign([n.identity for n in nodes], 0.0)
    return book


def test_each_node_with_a_port_wants_a_listener_and_the_seed_port_one_more() -> None:
    config = cluster(seed_port=31100, upstream_tls=True)
    nodes = {A.identity: A, B.identity: B}
    book = book_with(A, B)
    desired = topology.desired_listeners(config, nodes, book)
    port_a, port_b = book.port_of(A.identity), book.port_of(B.identity)
    assert set(desired) == {"c:seed", f"c:{port_a}", f"c:{port_b}"}
    seed, identity = desired["c:seed"]
    assert identity is None and seed.listen == Address("127.0.0.1", 31100)
    node_a, identity = desired[f"c:{port_a}"]
    assert identity == A.identity and node_a.upstream == A.address
    assert node_a.upstream_tls is not None
    assert node_a.upstream_tls.server_name == "a.example.internal"  # verified by its name


def test_a_node_without_a_port_wants_no_listener() -> None:
    desired = topology.desired_listeners(cluster(), {A.identity: A}, book_with())
    assert desired == {}


def test_replication_role_ports_follow_the_master_and_verify_the_seed_name() -> None:
    config = cluster(engine="redis-replication", primary_port=31100, reader_port=31101,
                     upstream_tls=True)
    ip_only = Node("10.0.0.1:6379", Address("10.0.0.1", 6379))
    desired = topology.desired_listeners(config, {ip_only.identity: ip_only}, book_with())
    primary, identity = desired["c:primary"]
    assert identity is None and primary.upstream == ip_only.address
    assert primary.upstream_tls is not None
    assert primary.upstream_tls.server_name == "cfg.example.internal"
    assert "c:reader" in desired
    # No master known: nothing for the role ports to forward to.
    replica = Node("10.0.0.2:6379", Address("10.0.0.2", 6379), role="replica")
    assert topology.desired_listeners(config, {replica.identity: replica}, book_with()) == {}


def test_only_nodes_whose_listener_is_up_are_mapped() -> None:
    config = cluster()
    nodes = {A.identity: A, B.identity: B}
    book = book_with(A, B)
    desired = topology.desired_listeners(config, nodes, book)
    port_a = book.port_of(A.identity)
    assert port_a is not None
    maps = topology.node_maps(config.announce, desired, {f"c:{port_a}"}, nodes)
    target = ("203.0.113.10", port_a)
    assert maps.redis == {("a.example.internal", 6379): target, ("10.0.0.1", 6379): target}
    assert maps.redis_ids == {A.identity: target}
    assert maps.mc_ports == {A.identity: port_a}
    assert sorted(maps.engine_entries()) == sorted(
        [(b"a.example.internal", 6379, b"203.0.113.10:%d" % port_a),
         (b"10.0.0.1", 6379, b"203.0.113.10:%d" % port_a)])


def test_replicas_come_in_port_order_and_only_when_online() -> None:
    c = Node("c" * 40, Address("10.0.0.3", 6379), role="replica")
    down = Node("d" * 40, Address("10.0.0.4", 6379), role="replica", health="loading")
    nodes = {n.identity: n for n in (A, B, c, down)}
    book = book_with(A, B, c, down)
    expected = sorted([B, c], key=lambda n: book.port_of(n.identity) or 0)
    assert topology.healthy_replicas(nodes, book) == [n.address for n in expected]
    assert topology.primary_of(nodes.values()) is A


def test_the_state_file_nodes_round_trip_and_bad_entries_are_skipped() -> None:
    raw = topology.nodes_to_json([A, B])
    raw["broken"] = {"host": "10.0.0.9"}  # no port
    raw["worse"] = "not a mapping"
    back = {n.identity: n for n in topology.nodes_from_json(raw)}
    assert set(back) == {A.identity, B.identity}
    assert back[A.identity].address == A.address
    assert back[A.identity].endpoints == A.endpoints
    assert back[B.identity].role == "replica" and back[B.identity].health == "unknown"
    assert topology.nodes_from_json(None) == []
