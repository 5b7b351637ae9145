"""Redis Cluster listeners in-process, against a real 3-master cluster on loopback:
status, the CLUSTER SLOTS fallback, unmapped nodes, backpressure, and reload.

(The namespaced end-to-end run with a real client is test_cluster_redis_netns.py.)
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.cluster.manager import ClusterManager
from tests.cluster_helpers import free_range
from tests.support import (
    ProxyThread,
    ServerProcess,
    free_port,
    make_config,
    require_binary,
    start_server,
    wait_until,
)

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def masters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    workdir = tmp_path_factory.mktemp("cluster3")
    nodes: list[ServerProcess] = []
    try:
        for _ in range(3):
            nodes.append(start_server("redis", [
                "--cluster-enabled", "yes", "--dir", str(workdir),
                "--cluster-config-file", f"nodes-{uuid.uuid4().hex}.conf",
                "--cluster-port", str(free_port()), "--cluster-node-timeout", "2000"]))
        subprocess.run([require_binary("redis-cli"), "--cluster", "create",
                        *[f"{HOST}:{n.port}" for n in nodes], "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)

        def ok() -> bool:
            for n in nodes:
                with redis.Redis(port=n.port, socket_timeout=2) as r:
                    info = r.cluster("info")
                    if info.get("cluster_state") != "ok" or int(
                            info.get("cluster_known_nodes", 0)) != 3:
                        return False
            return True

        wait_until(ok, 30, 0.1, "cluster_state:ok")
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def cluster_config(seed: int, tmp_path: Path, ports: int = 8, **extra: Any) -> dict[str, Any]:
    base = free_range(ports + 1)
    return {"name": "rc", "engine": "redis-cluster", "seed": f"{HOST}:{seed}",
            "announce": HOST, "listen": HOST, "ports": f"{base + 1}-{base + ports}",
            "seed_port": base, "refresh": "1h", **extra}


def proxy_for(masters: list[ServerProcess], tmp_path: Path, **extra: Any) -> ProxyThread:
    config = make_config([], clusters=[cluster_config(masters[0].port, tmp_path, **extra)],
                         state_dir=str(tmp_path / "state"))
    return ProxyThread(config).start()


def status(proxy: ProxyThread) -> dict[str, Any]:
    result: list[dict[str, Any]] = proxy.call(proxy.server.cluster_status)
    return result[0]


def manager(proxy: ProxyThread) -> ClusterManager:
    return proxy.server.clusters["rc"]


def raw(port: int, request: bytes, size: int = 256) -> bytes:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(request)
        return s.recv(size)


def get(key: str) -> bytes:
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key.encode())


def test_status_shows_every_node_with_role_slots_and_port(
        masters: list[ServerProcess], tmp_path: Path) -> None:
    proxy = proxy_for(masters, tmp_path)
    try:
        st = status(proxy)
        assert st["source"] == "CLUSTER SHARDS" and st["last_error"] is None
        assert st["seed_listening"] and st["announce"] == HOST
        nodes = st["nodes"]
        assert {n["address"] for n in nodes} == {f"{HOST}:{m.port}" for m in masters}
        assert {n["role"] for n in nodes} == {"master"}
        assert all(n["listening"] and n["health"] == "online" for n in nodes)
        slots = sorted(tuple(r) for n in nodes for r in n["slots"])
        assert slots[0][0] == 0 and slots[-1][1] == 16383
        assert sum(b - a + 1 for a, b in slots) == 16384
        low, high = (int(p) for p in st["ports"].split("-"))
        assert all(low <= n["port"] <= high for n in nodes)
        # Each node's port reaches that node.
        for n in nodes:
            info = raw(n["port"], b"*2\r\n$7\r\nCLUSTER\r\n$4\r\nMYID\r\n")
            assert n["id"].encode() in info
    finally:
        proxy.stop()


def test_status_endpoint_and_table_show_the_cluster(
        masters: list[ServerProcess], tmp_path: Path) -> None:
    from proxy.admin import fetch_status, format_status
    from proxy.config import Address

    admin_port = free_port()
    config = make_config([], clusters=[cluster_config(masters[0].port, tmp_path)],
                         state_dir=str(tmp_path / "state"),
                         admin={"listen": f"127.0.0.1:{admin_port}"})
    proxy = ProxyThread(config).start()
    try:
        doc = fetch_status(Address("127.0.0.1", admin_port))
        (cluster,) = doc["clusters"]
        assert {n["port"] for n in cluster["nodes"]} == {n["port"] for n in status(proxy)["nodes"]}
        table = format_status(doc)
        assert "cluster rc (redis-cluster" in table
        import urllib.request

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics",
                                         timeout=5).read().decode()
        assert 'cacheport_cluster_nodes{cluster="rc"} 3.0' in metrics
        assert 'cacheport_cluster_refreshes_total{cluster="rc"}' in metrics
        assert 'cacheport_cluster_port_range_full_total{cluster="rc"} 0.0' in metrics
        for node in cluster["nodes"]:
            assert str(node["port"]) in table and node["address"] in table
        assert "master" in table and "0-" in table
    finally:
        proxy.stop()


def test_discovery_falls_back_to_cluster_slots_when_shards_is_refused(
        masters: list[ServerProcess], tmp_path: Path) -> None:
    admins = [redis.Redis(port=m.port, socket_timeout=5) for m in masters]
    for a in admins:
        a.execute_command("ACL", "SETUSER", "default", "-cluster|shards")
    proxy = proxy_for(masters, tmp_path)
    try:
        st = status(proxy)
        assert st["source"] == "CLUSTER SLOTS"
        assert len([n for n in st["nodes"] if n["listening"]]) == 3
    finally:
        proxy.stop()
        for a in admins:
            a.execute_command("ACL", "SETUSER", "default", "+cluster|shards")
            a.close()


def test_a_node_without_a_port_gets_tryagain_not_its_private_address(
        masters: list[ServerProcess], tmp_path: Path) -> None:
    proxy = proxy_for(masters, tmp_path, ports=2)
    try:
        st = status(proxy)
        assert len(st["unassigned"]) == 1 and st["stats"]["port_range_full"] >= 1
        missing = next(n for n in st["nodes"] if n["port"] is None)
        served = next(n for n in st["nodes"] if n["port"] is not None)
        slot = missing["slots"][0][0]
        key = next(f"k{i}" for i in range(100_000)
                   if redis.cluster.key_slot(f"k{i}".encode()) == slot)
        reply = raw(served["port"], get(key))
        assert reply.startswith(b"-TRYAGAIN ")
        assert manager(proxy).stats.unmapped >= 1
        # Redirects to nodes that do have a port are rewritten as usual.
        other = next(n for n in st["nodes"] if n["port"] is not None and n is not served)
        key2 = next(f"k{i}" for i in range(100_000)
                    if redis.cluster.key_slot(f"k{i}".encode()) == other["slots"][0][0])
        assert raw(served["port"], get(key2)) == b"-MOVED %d %s:%d\r\n" % (
            other["slots"][0][0], HOST.encode(), other["port"])
        wait_until(lambda: manager(proxy).stats.refreshes >= 2, 10,
                   message="the refresh the redirects asked for")
    finally:
        proxy.stop()


def test_a_slow_client_stops_the_node_read_and_memory_stays_bounded(
        masters: list[ServerProcess], tmp_path: Path) -> None:
    proxy = proxy_for(masters, tmp_path)
    value = bytes(range(256)) * (32 * 1024)  # 8 MiB
    key = "big-" + uuid.uuid4().hex
    try:
        rc = redis.RedisCluster(host=HOST, port=masters[0].port, socket_timeout=10)
        rc.set(key, value)
        owner = rc.get_node_from_key(key).port
        rc.close()
        port = next(n["port"] for n in status(proxy)["nodes"]
                    if n["address"] == f"{HOST}:{owner}")
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.settimeout(10)
        s.connect((HOST, port))
        s.sendall(get(key) * 3)
        listener = proxy.server.listeners[f"rc:{port}"]

        def moved() -> int:
            return proxy.call(lambda: sum(r.bytes_downstream for r in listener.relays))

        wait_until(lambda: moved() > 0, 10, message="the reply to start")
        last, still = -1, 0
        deadline = time.monotonic() + 10
        while still < 5:  # unread by the client: the relay must stop reading the node
            assert time.monotonic() < deadline, "the relay never stopped reading"
            now = moved()
            still = still + 1 if now == last else 0
            last = now
            time.sleep(0.05)
        assert last < len(value)  # far from the 24 MiB the node has queued
        pending = proxy.call(lambda: max(r.pending_downstream for r in listener.relays))
        assert pending <= 2 * 64 * 1024
        expected = (b"$%d\r\n" % len(value) + value + b"\r\n") * 3
        got = bytearray()
        while len(got) < len(expected):
            chunk = s.recv(1 << 20)
            assert chunk
            got += chunk
        assert got == expected
        s.close()
    finally:
        proxy.stop()


def test_a_reload_removes_and_restores_a_cluster_with_the_same_ports(
        masters: list[ServerProcess], tmp_path: Path) -> None:
    cluster = cluster_config(masters[0].port, tmp_path)
    keep = {"name": "static", "listen": f"{HOST}:0", "upstream": f"{HOST}:{masters[1].port}"}
    state = str(tmp_path / "state")
    with_cluster = make_config([keep], clusters=[cluster], state_dir=state)
    proxy = ProxyThread(with_cluster).start()
    try:
        before = {n["id"]: n["port"] for n in status(proxy)["nodes"]}
        proxy.call(lambda: proxy.server.reload(make_config([keep], state_dir=state)))
        assert proxy.server.cluster_status() == []
        assert set(proxy.server.listeners) == {"static"}
        for port in before.values():
            with pytest.raises(OSError):
                socket.create_connection((HOST, port), timeout=2).close()
        proxy.call(lambda: proxy.server.reload(with_cluster))
        assert {n["id"]: n["port"] for n in status(proxy)["nodes"]} == before
        assert raw(next(iter(before.values())), b"PING\r\n") == b"+PONG\r\n"
    finally:
        proxy.stop()


def _key_in_slot_of(node: dict[str, Any]) -> tuple[int, str]:
    slot = node["slots"][0][0]
    return slot, next(f"k{i}" for i in range(100_000)
                      if redis.cluster.key_slot(f"k{i}".encode()) == slot)


def test_empty_host_redirects_name_the_node_the_connection_reached(
        masters: list[ServerProcess], tmp_path: Path) -> None:
    """``-MOVED 1 :6380`` means "the host you are on, that port": cacheport knows which."""
    admins = [redis.Redis(port=m.port, socket_timeout=5) for m in masters]
    proxy = proxy_for(masters, tmp_path)
    try:
        for a in admins:
            a.config_set("cluster-preferred-endpoint-type", "unknown-endpoint")
        # The seed listener goes to masters[0]; ask it (and its own port) for another's key.
        nodes = status(proxy)["nodes"]
        seed_node = next(n for n in nodes if n["address"] == f"{HOST}:{masters[0].port}")
        owner = next(n for n in nodes if n is not seed_node)
        slot, key = _key_in_slot_of(owner)
        direct = raw(masters[0].port, get(key))
        assert direct.startswith(b"-MOVED %d :" % slot)  # what the node really says
        for port in (seed_node["port"], status(proxy)["seed_port"]):
            assert raw(port, get(key)) == b"-MOVED %d %s:%d\r\n" % (
                slot, HOST.encode(), owner["port"])
    finally:
        proxy.stop()
        for a in admins:
            a.config_set("cluster-preferred-endpoint-type", "ip")
            a.close()


def test_sharded_pubsub_is_redirected_and_then_delivered(
        masters: list[ServerProcess], tmp_path: Path) -> None:
    proxy = proxy_for(masters, tmp_path)
    try:
        nodes = status(proxy)["nodes"]
        slot, channel = _key_in_slot_of(nodes[2])
        sub = b"*2\r\n$10\r\nSSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(channel), channel.encode())
        assert raw(nodes[0]["port"], sub) == b"-MOVED %d %s:%d\r\n" % (
            slot, HOST.encode(), nodes[2]["port"])
        with socket.create_connection((HOST, nodes[2]["port"]), timeout=5) as s:
            s.sendall(sub)
            assert s.recv(256).startswith(b"*3\r\n$10\r\nssubscribe\r\n")
            message = "-MOVED 1 10.0.0.1:6379"
            assert redis.Redis(port=nodes[2]["port"]).execute_command(
                "SPUBLISH", channel, message) == 1
            expected = b"*3\r\n$8\r\nsmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
                len(channel), channel.encode(), len(message), message.encode())
            got = b""
            while len(got) < len(expected):
                chunk = s.recv(256)
                assert chunk
                got += chunk
            assert got == expected
    finally:
        proxy.stop()


@pytest.mark.parametrize("password", ["s3cret-Pw", "wrong-Pw"])
def test_discovery_authenticates_with_the_cluster_health_credentials(
        masters: list[ServerProcess], tmp_path: Path, password: str,
        caplog: pytest.LogCaptureFixture) -> None:
    admins = [redis.Redis(port=m.port, socket_timeout=5) for m in masters]
    for a in admins:
        a.config_set("requirepass", "s3cret-Pw")
    try:
        cluster = cluster_config(masters[0].port, tmp_path,
                                 health={"password": password})
        config = make_config([], clusters=[cluster], state_dir=str(tmp_path / "state"))
        proxy = ProxyThread(config).start()
        try:
            st = status(proxy)
            if password == "s3cret-Pw":
                assert st["last_error"] is None
                assert len(st["nodes"]) == 3 and all(n["listening"] for n in st["nodes"])
            else:
                assert "auth failed (WRONGPASS)" in str(st["last_error"])
            assert password not in repr(st)
        finally:
            proxy.stop()
    finally:
        for m in masters:
            with redis.Redis(port=m.port, socket_timeout=5, password="s3cret-Pw") as a:
                a.config_set("requirepass", "")
        for a in admins:
            a.close()
    assert all(password not in r.getMessage() for r in caplog.records)
