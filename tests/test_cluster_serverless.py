"""The ElastiCache Serverless shape through ``clusters:``: one TLS-only endpoint that
speaks the cluster protocol and names itself by hostname in CLUSTER SLOTS. Stood in for
by a one-node TLS Redis Cluster with ``cluster-announce-hostname`` and
``cluster-preferred-endpoint-type hostname``; clients speak plain RESP to cacheport,
which dials the node with TLS (verifying the hostname) and rewrites the hostname in
slot replies to ``announce``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from tests.certs import make_pki, tls_redis
from tests.cluster_helpers import free_range
from tests.support import (
    ProxyThread,
    ServerProcess,
    free_port,
    make_config,
    valkey_server,
    wait_until,
)

HOST = "127.0.0.1"
NAME = "localhost"  # a hostname that resolves here, as the serverless endpoint does in a VPC
pytestmark = pytest.mark.timeout(40)


@pytest.fixture(params=["redis-server", "valkey-server"])
def serverless(request: pytest.FixtureRequest, tmp_path: Path
               ) -> Iterator[tuple[ServerProcess, Path]]:
    """(the TLS-only node, the CA file that signed its certificate for NAME)."""
    if request.param == "valkey-server" and valkey_server() is None:
        pytest.skip("no valkey-server (scripts/valkey.sh found none to install)")
    pki = make_pki(tmp_path)
    node = tls_redis(pki, *pki.issue("node", NAME), kind=request.param.removesuffix("-server"),
                     extra=["--bind", "127.0.0.1 -::1", "--tls-cluster", "yes",
                            "--cluster-enabled", "yes",
                            "--cluster-config-file", f"nodes-{uuid.uuid4().hex}.conf",
                            "--dir", str(tmp_path), "--cluster-port", str(free_port()),
                            "--cluster-announce-hostname", NAME,
                            "--cluster-preferred-endpoint-type", "hostname"])
    port, ca_file = node.port, pki.ca_file
    try:
        with redis.Redis(port=port, ssl=True, ssl_ca_certs=str(ca_file),
                         ssl_check_hostname=False, socket_timeout=5) as r:
            r.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            wait_until(lambda: r.cluster("info").get("cluster_state") == "ok", 15, 0.05,
                       "cluster_state:ok")
            slots = r.execute_command("CLUSTER", "SLOTS")
            assert slots[0][2][0] == NAME.encode()  # the shape: a hostname, TLS port
        yield node, ca_file
    finally:
        node.stop()


def test_a_tls_only_hostname_cluster_works_through_clusters_with_upstream_tls(
        serverless: tuple[ServerProcess, Path], tmp_path: Path) -> None:
    node, ca_file = serverless
    base = free_range(5)
    cluster = {"name": "sl", "engine": "redis-cluster", "seed": f"{NAME}:{node.port}",
               "announce": HOST, "listen": HOST, "ports": f"{base + 1}-{base + 4}",
               "seed_port": base, "refresh": "1h", "upstream_tls": {"ca": str(ca_file)}}
    proxy = ProxyThread(make_config([], clusters=[cluster],
                                    state_dir=str(tmp_path / "state"))).start()
    try:
        manager = proxy.server.clusters["sl"]
        (only,) = manager.nodes.values()
        assert only.hostname == NAME
        node_port = manager.book.port_of(only.identity)
        assert node_port is not None
        # The slot reply names the NAT host and the node's cacheport port, not the
        # endpoint's hostname and TLS port.
        with redis.Redis(host=HOST, port=base, socket_timeout=5) as r:
            (entry,) = r.execute_command("CLUSTER", "SLOTS")
            assert (entry[2][0], entry[2][1]) == (HOST.encode(), node_port)
            assert NAME.encode() not in repr(r.execute_command("CLUSTER", "SHARDS")).encode()
        client = RedisCluster(host=HOST, port=base, socket_timeout=5)
        try:
            for i in range(50):
                client.set(f"key:{i}", i)
            assert [int(client.get(f"key:{i}") or -1) for i in range(50)] == list(range(50))
            assert {n.port for n in client.get_nodes()} == {node_port}
        finally:
            client.close()
    finally:
        proxy.stop()
