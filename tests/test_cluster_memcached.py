"""Memcached auto discovery through cacheport, with real memcached nodes and a real
auto-discovery client (emcache, ``autodiscovery=True``).

::

    emcache --config get cluster--> cacheport seed_port --> ConfigEndpoint (test) --> memcached
            --get/set------------> cacheport <cluster>:<port> --------------------> memcached x3

The configuration endpoint lists the nodes as ``mc-000N.test.cache.internal|127.0.0.1|<real
port>``; the client must only ever see ``127.0.0.1|127.0.0.1|<cacheport port>``. Every test
runs on both relays: the engine framing Memcached (``relay: native``, the default) and the
buffered rewriting relay (``relay: python``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import emcache
import pytest
from pymemcache.client.base import Client as MemcacheClient

from proxy.cluster.manager import ClusterManager
from proxy.protocols.memcache import parse_config_reply
from proxy.relay.engine import native_available
from tests.cluster_helpers import ConfigEndpoint, ad_reply, async_wait, free_range
from tests.support import ProxyThread, ServerProcess, make_config, start_server, wait_until

HOST = "127.0.0.1"
RELAY = "python"  # set per test by the relay fixture


@pytest.fixture(autouse=True, params=["python", "native"])
def relay(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "native" and not native_available():
        pytest.skip("the native engine is not built here")
    globals()["RELAY"] = request.param
    yield str(request.param)
    globals()["RELAY"] = "python"


def hostname(i: int) -> str:
    return f"mc-{i:04d}.test.cache.internal"


@pytest.fixture
def nodes() -> Iterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    try:
        for _ in range(4):
            servers.append(start_server("memcached"))
        yield servers
    finally:
        for s in servers:
            s.stop()


def entries(servers: list[ServerProcess], which: list[int]) -> list[tuple[str, str, int]]:
    return [(hostname(i), HOST, servers[i].port) for i in which]


@pytest.fixture
def endpoint(nodes: list[ServerProcess]) -> Iterator[ConfigEndpoint]:
    ep = ConfigEndpoint(nodes[0].port, entries(nodes, [0, 1, 2]))
    try:
        yield ep
    finally:
        ep.close()


def cluster_proxy(seed: int, tmp_path: Path, ports: int = 8, **extra: Any) -> ProxyThread:
    base = free_range(ports + 1)
    cluster = {"name": "mc", "engine": "memcached", "seed": f"{HOST}:{seed}",
               "announce": HOST, "listen": HOST, "ports": f"{base + 1}-{base + ports}",
               "seed_port": base, "refresh": "300ms", "retire_grace": "1m", "relay": RELAY,
               **extra}
    config = make_config([], clusters=[cluster], state_dir=str(tmp_path / "state"),
                         drain_timeout="30s")
    return ProxyThread(config).start()


def manager(proxy: ProxyThread) -> ClusterManager:
    return proxy.server.clusters["mc"]


def status(proxy: ProxyThread) -> dict[str, Any]:
    result: list[dict[str, Any]] = proxy.call(proxy.server.cluster_status)
    return result[0]


def node_ports(proxy: ProxyThread) -> dict[str, int]:
    """hostname -> announced port, for nodes with a live listener."""
    return {n["id"]: n["port"] for n in status(proxy)["nodes"] if n["listening"]}


def items(server: ServerProcess) -> int:
    client = MemcacheClient((HOST, server.port), connect_timeout=2, timeout=2)
    try:
        return int(client.stats()[b"curr_items"])
    finally:
        client.close()


def discovered(client: emcache.Client) -> set[tuple[str, int]]:
    return {(a.address, a.port) for a in client.cluster_managment().nodes()}


@pytest.mark.timeout(60)
def test_emcache_autodiscovery_sees_only_announced_ports_and_follows_version_bumps(
        nodes: list[ServerProcess], endpoint: ConfigEndpoint, tmp_path: Path) -> None:
    proxy = cluster_proxy(endpoint.port, tmp_path)
    try:
        ports = node_ports(proxy)
        assert set(ports) == {hostname(0), hostname(1), hostname(2)}
        st = status(proxy)
        assert (st["source"], st["config_version"]) == ("config get cluster", 1)
        seed = st["seed_port"]
        real = {n.port for n in nodes}

        async def scenario() -> None:
            client = await emcache.create_client(
                [emcache.MemcachedHostAddress(HOST, seed)], autodiscovery=True,
                autodiscovery_poll_interval=0.2, autodiscovery_timeout=2, timeout=2)
            try:
                assert discovered(client) == {(HOST, p) for p in ports.values()}
                assert not {p for _, p in discovered(client)} & real
                # Keys spread over every node, each stored and read through cacheport.
                for i in range(90):
                    await client.set(b"key%d" % i, b"value%d" % i)
                for i in range(90):
                    got = await client.get(b"key%d" % i)
                    assert got is not None and got.value == b"value%d" % i
                assert all(items(nodes[i]) > 0 for i in range(3))

                # A node is added: the version bump reaches the client with a new port.
                endpoint.set_nodes(entries(nodes, [0, 1, 2, 3]))
                await async_wait(lambda: len(discovered(client)) == 4, 10, "emcache sees 4")
                await async_wait(lambda: hostname(3) in node_ports(proxy), 10,
                                 "cacheport listens for the new node")
                new_port = node_ports(proxy)[hostname(3)]
                assert (HOST, new_port) in discovered(client)
                assert not {p for _, p in discovered(client)} & real

                async def lands_on_new_node() -> bool:
                    for i in range(20):
                        key = b"new%d-%d" % (time.monotonic_ns(), i)
                        await client.set(key, b"x")
                        assert (await client.get(key)).value == b"x"  # type: ignore[union-attr]
                    return items(nodes[3]) > 0

                await async_wait(lands_on_new_node, 10, "a key stored on the new node")

                # A node leaves: the client drops it; cacheport drains and retires its port.
                gone = ports[hostname(1)]
                held = MemcacheClient((HOST, gone), connect_timeout=2, timeout=2)
                assert held.set("held", "on the old connection", noreply=False)
                endpoint.set_nodes(entries(nodes, [0, 2, 3]))
                await async_wait(lambda: len(discovered(client)) == 3, 10, "emcache sees 3")
                assert (HOST, gone) not in discovered(client)
                await async_wait(lambda: hostname(1) not in node_ports(proxy), 10,
                                 "the departed node's listener to go")
                assert held.get("held") == b"on the old connection"  # draining, not cut
                held.close()
                with pytest.raises(OSError):
                    socket.create_connection((HOST, gone), timeout=2).close()
                st = status(proxy)
                assert [r["port"] for r in st["retired"]] == [gone]
                assert st["config_version"] == 3
            finally:
                await client.close()

        asyncio.run(scenario())
        # Port numbers did not move for the nodes that stayed.
        assert {h: p for h, p in node_ports(proxy).items() if h in ports} == {
            h: p for h, p in ports.items() if h != hostname(1)}
    finally:
        proxy.stop()


def raw_call(port: int, request: bytes, until: bytes = b"END\r\n") -> bytes:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(request)
        buf = b""
        deadline = time.monotonic() + 5
        while not buf.endswith(until):
            assert time.monotonic() < deadline, f"no reply ending {until!r}: {buf!r}"
            chunk = s.recv(65536)
            assert chunk, f"closed after {buf!r}"
            buf += chunk
        return buf


def test_ad_reply_is_rewritten_exactly_and_stored_lookalikes_pass_unchanged(
        nodes: list[ServerProcess], endpoint: ConfigEndpoint, tmp_path: Path) -> None:
    proxy = cluster_proxy(endpoint.port, tmp_path)
    try:
        ports = node_ports(proxy)
        seed = status(proxy)["seed_port"]
        expected = ad_reply(1, [(HOST, HOST, ports[hostname(i)]) for i in range(3)])
        assert raw_call(seed, b"config get cluster\r\n") == expected
        # Storage commands whose data block is an AD reply, with noreply and meta commands,
        # on the seed listener and on a node listener: byte for byte.
        fake = ad_reply(7, [("evil.example", "10.9.9.9", 11211)])
        for port in (seed, ports[hostname(0)]):
            assert raw_call(port, b"set lookalike 0 0 %d noreply\r\n%s\r\nmn\r\n" % (
                len(fake), fake), b"MN\r\n") == b"MN\r\n"
            assert raw_call(port, b"get lookalike\r\n") == (
                b"VALUE lookalike 0 %d\r\n%s\r\nEND\r\n" % (len(fake), fake))
            assert raw_call(port, b"mg lookalike v\r\n", b"\r\n" + fake + b"\r\n") == (
                b"VA %d\r\n%s\r\n" % (len(fake), fake))
        assert manager(proxy).stats.protocol_errors == 0
    finally:
        proxy.stop()


def test_old_engines_are_discovered_through_the_get_fallback(
        nodes: list[ServerProcess], tmp_path: Path) -> None:
    endpoint = ConfigEndpoint(nodes[0].port, entries(nodes, [0, 1]), old_engine=True)
    proxy = cluster_proxy(endpoint.port, tmp_path)
    try:
        st = status(proxy)
        assert st["source"] == "get AmazonElastiCache:cluster"
        ports = node_ports(proxy)
        reply = raw_call(st["seed_port"], b"get AmazonElastiCache:cluster\r\n")
        assert reply == ad_reply(1, [(HOST, HOST, ports[hostname(i)]) for i in range(2)],
                                 "get")
    finally:
        proxy.stop()
        endpoint.close()


def test_a_full_range_is_logged_and_counted_and_spares_existing_nodes(
        nodes: list[ServerProcess], endpoint: ConfigEndpoint, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "cacheport.cluster")
    proxy = cluster_proxy(endpoint.port, tmp_path, ports=2)
    try:
        st = status(proxy)
        assert len(node_ports(proxy)) == 2 and st["unassigned"] == [hostname(2)]
        assert st["stats"]["port_range_full"] >= 1
        assert "port range" in caplog.text and "is full" in caplog.text
        client = MemcacheClient((HOST, node_ports(proxy)[hostname(0)]), timeout=2)
        client.set("a", "b")
        assert client.get("a") == b"b"
        client.close()
        # The unplaced node is passed through unmapped in the AD reply, never given a
        # port it does not have.
        reply = raw_call(st["seed_port"], b"config get cluster\r\n")
        assert f"{hostname(2)}|{HOST}|{nodes[2].port}".encode() in reply
    finally:
        proxy.stop()


def test_ports_survive_a_restart_and_a_node_replaced_with_a_new_address(
        nodes: list[ServerProcess], endpoint: ConfigEndpoint, tmp_path: Path) -> None:
    first = cluster_proxy(endpoint.port, tmp_path)
    try:
        before = node_ports(first)
        seed = status(first)["seed_port"]
        ports = status(first)["ports"]
    finally:
        first.stop()
    # Node 1 is replaced: same hostname, new address (node 3's memcached); a new node 4
    # named first alphabetically must not push anyone off their port.
    endpoint.set_nodes([("a-first.test.cache.internal", HOST, nodes[3].port),
                        (hostname(0), HOST, nodes[0].port), (hostname(1), HOST, nodes[3].port),
                        (hostname(2), HOST, nodes[2].port)])
    low, high = (int(p) for p in ports.split("-"))
    config = make_config([], clusters=[{
        "name": "mc", "engine": "memcached", "seed": f"{HOST}:{endpoint.port}",
        "announce": HOST, "listen": HOST, "ports": ports, "seed_port": seed,
        "refresh": "300ms"}], state_dir=str(tmp_path / "state"))
    second = ProxyThread(config).start()
    try:
        after = node_ports(second)
        assert {h: after[h] for h in before} == before
        assert low <= after["a-first.test.cache.internal"] <= high
        replaced = MemcacheClient((HOST, after[hostname(1)]), timeout=2)
        assert replaced.set("where", "node 3's memcached", noreply=False)
        replaced.close()
        direct = MemcacheClient((HOST, nodes[3].port), timeout=2)
        assert direct.get("where") == b"node 3's memcached"
        direct.close()
    finally:
        second.stop()


def test_a_reply_naming_an_unknown_node_reserves_a_port_and_discovery_confirms_it(
        nodes: list[ServerProcess], endpoint: ConfigEndpoint, tmp_path: Path) -> None:
    proxy = cluster_proxy(endpoint.port, tmp_path, refresh="1h")
    try:
        seed = status(proxy)["seed_port"]
        endpoint.set_nodes(entries(nodes, [0, 1, 2, 3]))
        # The very first reply after the change already carries a cacheport port...
        announced = parse_config_reply(raw_call(seed, b"config get cluster\r\n"))
        assert announced.version == 2 and len(announced.nodes) == 4
        assert not {n.port for n in announced.nodes} & {n.port for n in nodes}
        # ...which the refresh that reply asked for then binds.
        wait_until(lambda: hostname(3) in node_ports(proxy), 10,
                   message="the refresh the reply asked for")
        assert {n.port for n in announced.nodes} == set(node_ports(proxy).values())
    finally:
        proxy.stop()


def test_each_relay_serves_the_listeners_and_a_broken_reply_is_a_clean_close(
        nodes: list[ServerProcess], tmp_path: Path, relay: str) -> None:
    """The engine frames Memcached node listeners unless ``relay: python``; a node that
    sends a value line without a length gets both sides closed and a counter, on both."""
    from proxy.relay.choose import RelayKind
    from proxy.relay.engine import NativeRelay

    liar = socket.create_server((HOST, 0))
    endpoint = ConfigEndpoint(nodes[0].port, [*entries(nodes, [0]),
                                              ("liar.test", HOST, liar.getsockname()[1])])
    proxy = cluster_proxy(endpoint.port, tmp_path)
    try:
        ports = node_ports(proxy)
        listener = proxy.server.listeners[f"mc:{ports[hostname(0)]}"]
        with socket.create_connection((HOST, ports[hostname(0)]), timeout=5) as s:
            s.sendall(b"version\r\n")
            assert s.recv(64).startswith(b"VERSION ")
            kinds = proxy.call(lambda: [type(r).__name__ for r in listener.relays])
        native = relay == "native"
        assert listener.relay == (RelayKind.ENGINE if native else RelayKind.BUFFERED)
        assert kinds == [NativeRelay.__name__ if native else "RewritingRelay"]
        before = manager(proxy).stats.protocol_errors
        with socket.create_connection((HOST, ports["liar.test"]), timeout=5) as c:
            c.sendall(b"get k\r\n")
            liar.settimeout(5)
            conn, _ = liar.accept()
            with conn:
                conn.settimeout(5)
                assert conn.recv(64) == b"get k\r\n"
                conn.sendall(b"VALUE k 0 x\r\nEND\r\n")
                try:
                    got = c.recv(64)
                except ConnectionResetError:
                    got = b""
                assert got == b""  # nothing of the broken reply, then the close
        wait_until(lambda: manager(proxy).stats.protocol_errors == before + 1, 5,
                   message="the protocol error counted")
    finally:
        proxy.stop()
        endpoint.close()
        liar.close()
