"""Redis Cluster listeners in-process, against a real 3-master cluster on loopback:
status, the CLUSTER SLOTS fallback, unmapped nodes, backpressure, and reload; and against
a lone node that does not know its own address, with real redis-py and redis-cli clients.

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

from proxy.cluster.discovery import discover_redis_at
from proxy.cluster.manager import ClusterManager
from proxy.config import Address
from proxy.relay.engine import native_available
from tests.cluster_helpers import free_range, preferred_endpoint, start_lone_node, three_masters
from tests.support import (
    ProxyThread,
    ServerProcess,
    free_port,
    make_config,
    require_binary,
    wait_until,
)

HOST = "127.0.0.1"
RELAY = "python"  # set per test by the relay fixture: every test runs on both relays


@pytest.fixture(autouse=True, params=["python", "native"])
def relay(request: pytest.FixtureRequest) -> Iterator[str]:
    """Cluster listeners on the buffered rewriting relay, and framed by the native engine."""
    if request.param == "native" and not native_available():
        pytest.skip("the native engine is not built here")
    globals()["RELAY"] = request.param
    yield str(request.param)
    globals()["RELAY"] = "python"


@pytest.fixture(scope="module")
def masters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """A real 3-master Redis Cluster on loopback."""
    with three_masters(tmp_path_factory.mktemp("cluster3")) as nodes:
        yield nodes


def cluster_config(seed: int, tmp_path: Path, ports: int = 8, **extra: Any) -> dict[str, Any]:
    base = free_range(ports + 1)
    return {"name": "rc", "engine": "redis-cluster", "seed": f"{HOST}:{seed}",
            "announce": HOST, "listen": HOST, "ports": f"{base + 1}-{base + ports}",
            "seed_port": base, "refresh": "1h", "relay": RELAY, **extra}


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
    proxy = proxy_for(masters, tmp_path)
    try:
        with preferred_endpoint([m.port for m in masters], "unknown-endpoint"):
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


# --------------------------------------------------------------------------- blank endpoints


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One node holding every slot, no cluster-announce-ip: it lists itself without a host."""
    node = start_lone_node(tmp_path_factory.mktemp("lone"))
    try:
        yield node
    finally:
        node.stop()


def recording_connection(dialled: list[tuple[str, int]]) -> type[redis.Connection]:
    """A redis-py connection class that notes every address it dials."""

    class Recording(redis.Connection):
        def _connect(self) -> socket.socket:
            dialled.append((self.host, self.port))
            sock: socket.socket = super()._connect()
            return sock

    return Recording


def check_redis_py_only_dials(proxy: ProxyThread, nodes: list[ServerProcess]) -> None:
    """redis-py's RedisCluster through the seed port: it must learn, dial and keep only
    cacheport's ports, and no node may see one of its sockets as a client."""
    st = status(proxy)
    node_ports = {n["port"] for n in st["nodes"]}
    ours = node_ports | {st["seed_port"]}
    dialled: list[tuple[str, int]] = []
    rc = redis.RedisCluster(host=HOST, port=st["seed_port"], socket_timeout=5,
                            decode_responses=True,
                            connection_class=recording_connection(dialled))
    try:
        keys = [f"blank-{i}" for i in range(100)]
        for k in keys:
            rc.set(k, k)
        assert [rc.get(k) for k in keys] == keys
        assert {(n.host, n.port) for n in rc.get_nodes()} == {(HOST, p) for p in node_ports}
        assert dialled and {h for h, _ in dialled} == {HOST}
        assert {p for _, p in dialled} <= ours, "redis-py dialled a node port directly"
        sockets = [c._sock for n in rc.get_nodes()
                   for c in (*n.redis_connection.connection_pool._available_connections,
                             *n.redis_connection.connection_pool._in_use_connections)
                   if c._sock is not None]
        assert sockets and all(s.getpeername()[1] in ours for s in sockets)
        local = {"{}:{}".format(*s.getsockname()[:2]) for s in sockets}
        for n in nodes:
            with redis.Redis(port=n.port, socket_timeout=5) as admin:
                clients = {c["addr"] for c in admin.client_list()}
            assert not clients & local, "a node has a redis-py socket as a direct client"
    finally:
        rc.close()


async def test_discovery_addresses_a_node_without_an_address_where_it_was_asked(
        lone: ServerProcess) -> None:
    found = await discover_redis_at(Address(HOST, lone.port), None)
    (node,) = found.nodes
    assert node.address == Address(HOST, lone.port)
    assert node.endpoints == ((HOST, lone.port),)
    assert node.identity == redis.Redis(port=lone.port).execute_command("CLUSTER", "MYID").decode()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("endpoint_type", ["ip", "unknown-endpoint", "hostname"])
def test_redis_py_reaches_a_node_without_an_address_only_through_cacheport(
        lone: ServerProcess, tmp_path: Path, endpoint_type: str) -> None:
    """The lone node says "" (or NULL, or "?") with its own port in CLUSTER SLOTS; redis-py
    would read that as "the seed's host, this port" and dial the node around cacheport."""
    with preferred_endpoint([lone.port], endpoint_type):
        proxy = proxy_for([lone], tmp_path)
        try:
            (node,) = status(proxy)["nodes"]
            assert node["address"] == f"{HOST}:{lone.port}" and node["listening"]
            slots = redis.Redis(port=node["port"], socket_timeout=5).execute_command(
                "CLUSTER", "SLOTS")
            assert slots[0][2][:2] == [HOST.encode(), node["port"]]
            check_redis_py_only_dials(proxy, [lone])
        finally:
            proxy.stop()


def redis_cli(port: int, *args: str) -> str:
    result = subprocess.run([require_binary("redis-cli"), "-c", "-h", HOST, "-p", str(port),
                             *args], capture_output=True, text=True, timeout=10, check=True)
    return result.stdout


def test_redis_cli_sees_a_node_without_an_address_at_its_cacheport_port(
        lone: ServerProcess, tmp_path: Path) -> None:
    proxy = proxy_for([lone], tmp_path)
    try:
        st = status(proxy)
        (node,) = st["nodes"]
        text = redis_cli(st["seed_port"], "CLUSTER", "NODES")
        assert f" {HOST}:{node['port']}@" in text and f":{lone.port}@" not in text
        slots = redis_cli(st["seed_port"], "CLUSTER", "SLOTS").split()
        assert HOST in slots and str(node["port"]) in slots and str(lone.port) not in slots
        assert redis_cli(st["seed_port"], "SET", "lone-cli", "v").strip() == "OK"
        assert redis_cli(node["port"], "GET", "lone-cli").strip() == "v"
    finally:
        proxy.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("endpoint_type", ["ip", "unknown-endpoint", "hostname"])
def test_redis_py_through_a_three_node_cluster_dials_only_cacheport(
        masters: list[ServerProcess], tmp_path: Path, endpoint_type: str) -> None:
    """NULL and "?" entries of every node (unknown-endpoint, hostname without hostnames)."""
    proxy = proxy_for(masters, tmp_path)
    try:
        with preferred_endpoint([m.port for m in masters], endpoint_type):
            check_redis_py_only_dials(proxy, masters)
    finally:
        proxy.stop()


@pytest.mark.parametrize("endpoint_type", ["ip", "unknown-endpoint"])
def test_redis_cli_follows_redirects_to_cacheport_ports(
        masters: list[ServerProcess], tmp_path: Path, endpoint_type: str) -> None:
    proxy = proxy_for(masters, tmp_path)
    try:
        with preferred_endpoint([m.port for m in masters], endpoint_type) as admins:
            st = status(proxy)
            seed_node = f"{HOST}:{masters[0].port}"
            for owner in st["nodes"]:
                _, key = _key_in_slot_of(owner)
                listener = proxy.server.listeners[f"rc:{owner['port']}"]
                before = proxy.call(lambda listener=listener: listener.stats.accepted)
                # redis-cli prints no "-> Redirected" line when not interactive: the owner's
                # listener counts the connection it followed the redirect with.
                assert redis_cli(st["seed_port"], "SET", key, "via-cli").strip() == "OK"
                after = proxy.call(lambda listener=listener: listener.stats.accepted)
                assert after == before + (owner["address"] != seed_node)
                direct = next(a for a, m in zip(admins, masters, strict=True)
                              if owner["address"] == f"{HOST}:{m.port}")
                assert direct.get(key) == b"via-cli"
    finally:
        proxy.stop()


def test_each_relay_serves_the_node_listeners_it_is_named_for(
        masters: list[ServerProcess], tmp_path: Path, relay: str) -> None:
    """``relay: native`` frames cluster connections in the engine; ``python`` keeps the
    buffered rewriting relay. (``auto`` is native: test_native_cluster.py's relay_order.)"""
    from proxy.relay.choose import RelayKind
    from proxy.relay.engine import NativeRelay

    proxy = proxy_for(masters, tmp_path)
    try:
        node = status(proxy)["nodes"][0]
        listener = proxy.server.listeners[f"rc:{node['port']}"]
        with socket.create_connection((HOST, node["port"]), timeout=5) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert s.recv(64) == b"+PONG\r\n"
            kinds = proxy.call(lambda: [type(r).__name__ for r in listener.relays])
            s.sendall(b"*2\r\n$7\r\nCLUSTER\r\n$5\r\nSLOTS\r\n")
            reply = s.recv(65536)
            assert f":{node['port']}\r\n".encode() in reply
            assert f":{masters[0].port}\r\n".encode() not in reply
        if relay == "native":
            assert listener.relay == RelayKind.ENGINE
            assert kinds == [NativeRelay.__name__]
        else:
            assert listener.relay == RelayKind.BUFFERED
            assert kinds == ["RewritingRelay"]
    finally:
        proxy.stop()
