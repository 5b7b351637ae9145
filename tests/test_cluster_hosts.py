"""Several cacheport hosts, one port map, no shared state: every host gives every Redis
Cluster node the same port (cluster/ports.py), on first start and as nodes come and go.

Two ``cacheport run`` processes read the same YAML; only ``${CP_HOST}`` (the address
they bind, as two hosts' private IPs would differ) and ``${CP_ADMIN}`` come from their
environment. A real 3-master cluster; a fourth node joins and then is forgotten.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.admin import fetch_status
from proxy.config import Address
from tests.cluster_helpers import free_range, start_cluster_node, three_masters
from tests.lbkit import Backend, haproxy, quiet_port
from tests.support import (
    CacheportProcess,
    ServerProcess,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

HOST = "127.0.0.1"
YAML = """\
admin: {listen: "${CP_ADMIN}"}
drain_timeout: 0
clusters:
  - name: rc
    engine: redis-cluster
    seed: 127.0.0.1:%(seed)d
    announce: ${CP_HOST}
    listen: ${CP_HOST}
    ports: %(low)d-%(high)d
    refresh: 300ms
    retire_grace: 10m
    allow: [127.0.0.0/8]
    health: off
"""


@pytest.fixture(scope="module")
def masters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """A real 3-master Redis Cluster on loopback."""
    with three_masters(tmp_path_factory.mktemp("hosts3")) as nodes:
        yield nodes


def node_ports(admin: Address) -> dict[str, int]:
    (cluster,) = fetch_status(admin)["clusters"]
    return {n["id"]: n["port"] for n in cluster["nodes"]}


def cluster_doc(admin: Address) -> dict[str, Any]:
    (cluster,) = fetch_status(admin)["clusters"]
    return dict(cluster)


def test_two_hosts_without_state_agree_on_every_port_as_nodes_join_and_leave(
        masters: list[ServerProcess], tmp_path: Path) -> None:
    low = free_range(12)
    config = tmp_path / "ports.yaml"
    config.write_text(YAML % {"seed": masters[0].port, "low": low, "high": low + 11})
    hosts = []
    admins = []
    for n, ip in enumerate(("127.0.0.2", "127.0.0.3")):
        (tmp_path / f"h{n}").mkdir()
        admin = Address(HOST, quiet_port())
        admins.append(admin)
        # Each host keeps its own state file (next to its own copy of the same YAML).
        own = tmp_path / f"h{n}" / "ports.yaml"
        own.write_text(config.read_text())
        hosts.append(CacheportProcess(own, prefix=("env", f"CP_HOST={ip}",
                                                   f"CP_ADMIN={admin}")))
    extra: ServerProcess | None = None
    try:
        for host in hosts:
            host.wait_serving()
        a, b = admins
        wait_until(lambda: len(node_ports(a)) == 3 and len(node_ports(b)) == 3, 15,
                   message="both hosts to list 3 nodes")
        first = node_ports(a)
        assert first == node_ports(b)
        assert cluster_doc(a)["ports_canonical"] is True

        # A fourth node joins (no slots yet: a master a client may still be sent to).
        extra = start_cluster_node(tmp_path)
        bus = extra.args[extra.args.index("--cluster-port") + 1]
        redis.Redis(port=masters[0].port).execute_command("CLUSTER", "MEET", HOST, extra.port,
                                                          bus)
        wait_until(lambda: len(node_ports(a)) == 4 and len(node_ports(b)) == 4, 20,
                   message="both hosts to list 4 nodes")
        joined = node_ports(a)
        assert joined == node_ports(b)
        assert {k: joined[k] for k in first} == first  # nobody moved

        # It leaves: every node forgets it, then it stops.
        new_id = redis.Redis(port=extra.port).execute_command("CLUSTER", "MYID")
        new_id = new_id.decode() if isinstance(new_id, bytes) else str(new_id)
        # Every master must know it before it can forget it (gossip takes a moment).
        wait_until(lambda: all(new_id in str(redis.Redis(port=m.port).cluster("nodes"))
                               for m in masters), 10, message="gossip")
        for m in masters:
            redis.Redis(port=m.port).execute_command("CLUSTER", "FORGET", new_id)
        extra.stop()
        wait_until(lambda: len(node_ports(a)) == 3 and len(node_ports(b)) == 3, 20,
                   message="both hosts to drop the 4th node")
        assert node_ports(a) == node_ports(b) == first
        for admin in admins:
            doc = cluster_doc(admin)
            # Its port rests on both hosts for retire_grace: no other node may take it.
            assert [r["port"] for r in doc["retired"]] == [joined[new_id]]
            assert doc["ports_canonical"] is True and doc["off_canonical"] == {}
    finally:
        if extra is not None:
            extra.stop()
        for host in hosts:
            host.stop()


LB_YAML = """\
admin: {listen: "${CP_ADMIN}"}
drain_timeout: 0
clusters:
  - name: rc
    engine: redis-cluster
    seed: 127.0.0.1:%(seed)d
    announce: 127.0.0.1   # the load balancer's address: what clients are told
    listen: ${CP_HOST}
    ports: %(low)d-%(high)d
    seed_port: %(seed_port)d
    refresh: 1h
    allow: [127.0.0.0/8]
    proxy_protocol: v2
    proxy_protocol_from: [127.0.0.1/32]
    health: off
"""


def test_a_cluster_client_through_the_balancer_follows_redirects_across_both_hosts(
        masters: list[ServerProcess], tmp_path: Path) -> None:
    """redis-py RedisCluster at the balancer's address, no address_remap: every port it
    is told (by either host) reaches the same node through either host."""
    seed_port = free_range(13)
    values = {"seed": masters[0].port, "low": seed_port + 1, "high": seed_port + 12,
              "seed_port": seed_port}
    hosts: list[CacheportProcess] = []
    admins: list[Address] = []
    try:
        for n, ip in enumerate(("127.0.0.2", "127.0.0.3")):
            admin = Address(ip, quiet_port(ip))  # where the balancer's checks reach it
            admins.append(admin)
            (tmp_path / f"h{n}").mkdir()
            own = tmp_path / f"h{n}" / "ports.yaml"
            own.write_text(LB_YAML % values)
            hosts.append(CacheportProcess(own, prefix=("env", f"CP_HOST={ip}",
                                                       f"CP_ADMIN={admin}")))
        for host in hosts:
            host.wait_serving()
        wait_until(lambda: all(len(node_ports(a)) == 3 for a in admins), 15,
                   message="both hosts to list 3 nodes")
        ports = node_ports(admins[0])
        assert ports == node_ports(admins[1])
        backends = [Backend(ip, 0, a.port) for ip, a in zip(("127.0.0.2", "127.0.0.3"),
                                                            admins, strict=True)]
        with haproxy(tmp_path, backends, bind=f"{seed_port}-{seed_port + 12}"):
            client = redis.RedisCluster(host=HOST, port=seed_port, socket_timeout=3)
            try:
                assert {n.port for n in client.get_nodes()} == set(ports.values())
                for i in range(60):
                    client.set(f"key-{i}", i)
                assert [int(client.get(f"key-{i}") or -1) for i in range(60)] == list(range(60))
            finally:
                client.close()
            # A MOVED asked of the wrong node names the same port whichever host answers:
            # round robin sends consecutive connections to alternating hosts.
            owner = redis.cluster.key_slot(b"key-0")
            answers = set()
            right = client_port(owner, admins[0])
            wrong = next(p for p in ports.values() if p != right)
            for _ in range(4):
                with socket.create_connection((HOST, wrong), timeout=3) as s:
                    s.sendall(b"*2\r\n$3\r\nGET\r\n$5\r\nkey-0\r\n")
                    answers.add(s.recv(128))
            assert len(answers) == 1, answers
            (moved,) = answers
            assert moved == b"-MOVED %d 127.0.0.1:%d\r\n" % (owner, right), moved
        for admin in admins:  # both hosts rewrote (and counted) some of those redirects
            # Counted when the engine's note of it reaches the loop, a moment after.
            wait_until(lambda a=admin: cluster_doc(a)["stats"]["redirects"] >= 1, 5,
                       message=f"{admin} to count the redirects it rewrote")
            assert cluster_doc(admin)["ports_canonical"]
    finally:
        for host in hosts:
            host.stop()


def client_port(slot: int, admin: Address) -> int:
    """The port of the node serving ``slot``, from a host's /status."""
    (cluster,) = fetch_status(admin)["clusters"]
    for node in cluster["nodes"]:
        if any(a <= slot <= b for a, b in node["slots"]):
            return int(node["port"])
    raise AssertionError(f"no node serves slot {slot}")
