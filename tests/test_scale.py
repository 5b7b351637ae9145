"""Hundreds of checked listeners in one process: each node checked once, not once per listener.

Counters, not timings: the nodes' own connection counts against the checks the
probes ran, and a scrape that completes with every series it should have. The
figures (CPU, stalls, scrape time) are ``python -m bench scale``'s job.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from proxy.health.monitor import HealthMonitor
from proxy.health.state import State
from tests.healthkit import FAST, http_get, proxy_with_admin
from tests.support import ServerProcess, start_server, wait_until

NODES = 3  # real redis-servers, each behind PER_NODE listeners
PER_NODE = 80
DEAD = 60  # listeners each to a port of its own with nothing listening
CHECK_BUCKETS = 15  # CHECK_DURATION_BUCKETS and +Inf


@pytest.fixture
def refusing_ports() -> Iterator[list[int]]:
    """Ports bound but not listening: connection refused, and no listener of the proxy
    (bound to port 0) can be handed one of them while the test runs."""
    socks = []
    try:
        for _ in range(DEAD):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        yield [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture
def nodes() -> Iterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    try:
        for _ in range(NODES):
            servers.append(start_server("redis"))
        yield servers
    finally:
        for server in servers:
            server.stop()


def checks(monitor: HealthMonitor, address: str) -> int:
    [probe] = [p for p in monitor.probes.values() if str(p.upstream) == address]
    return probe.checks_ok + probe.checks_failed


def connections_received(client: redis.Redis) -> int:
    return int(client.info("stats")["total_connections_received"])


def scrape(proxy: object, query: str = "") -> dict[str, list[tuple[dict[str, str], float]]]:
    code, _headers, body = http_get(proxy, "/metrics" + query)  # type: ignore[arg-type]
    assert code == 200, body[:200]
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_hundreds_of_listeners_check_each_node_once_and_a_scrape_completes(
        nodes: list[ServerProcess], refusing_ports: list[int]) -> None:
    listeners = [{"name": f"n{n}-{i}", "listen": "127.0.0.1:0", "upstream": node.address,
                  "protocol": "redis", "health": FAST}
                 for n, node in enumerate(nodes) for i in range(PER_NODE)]
    dead = [f"127.0.0.1:{port}" for port in refusing_ports]
    listeners += [{"name": f"dead-{i}", "listen": "127.0.0.1:0", "upstream": address,
                   "protocol": "redis", "health": FAST} for i, address in enumerate(dead)]
    with proxy_with_admin(listeners) as proxy:
        monitor = proxy.server.monitor
        assert monitor is not None
        # One probe per distinct node, however many listeners send to it.
        assert len(monitor.probes) == NODES + DEAD
        assert len(monitor.targets) == len(listeners)
        wait_until(lambda: all(p.checks_ok + p.checks_failed >= 3
                               for p in monitor.probes.values()), 30,
                   message="every node checked a few times")

        # Each check is one connection to the node: with PER_NODE listeners per node,
        # checking per listener would show as PER_NODE times as many.
        clients = [redis.Redis(port=node.port, socket_timeout=5) for node in nodes]
        try:
            before = [(connections_received(c), checks(monitor, n.address))
                      for c, n in zip(clients, nodes, strict=True)]
            wait_until(lambda: all(checks(monitor, n.address) >= k + 5
                                   for (_c, k), n in zip(before, nodes, strict=True)), 30,
                       message="five more checks of every node")
            for client, node, (c0, k0) in zip(clients, nodes, before, strict=True):
                seen, ran = connections_received(client) - c0, checks(monitor, node.address) - k0
                # A check in flight at either reading is counted by one side only.
                assert ran - 2 <= seen <= ran + 2, (node.address, seen, ran)
        finally:
            for client in clients:
                client.close()

        for address in dead:
            [target] = [t for t in monitor.targets.values() if str(t.upstream) == address]
            assert monitor.state(target.listener, target.upstream) is State.DOWN
            assert target.last is not None and target.last.reason == "connection refused"

        # A full scrape completes with every listener's series; the listeners of one
        # node show its one probe's counts (a scrape reads listeners a chunk at a time,
        # so a check may land between two chunks: off by one at most).
        samples = scrape(proxy)
        ok = samples["cacheport_upstream_checks_total"]
        assert len(ok) == 2 * len(listeners)
        for node in nodes:
            counts = [v for labels, v in ok
                      if labels["upstream"] == node.address and labels["result"] == "ok"]
            assert len(counts) == PER_NODE and max(counts) - min(counts) <= 1
        assert len(samples["cacheport_upstream_check_duration_seconds_bucket"]) == \
            CHECK_BUCKETS * len(listeners)
        up = {labels["listener"]: v for labels, v in samples["cacheport_upstream_up"]}
        assert sum(up.values()) == NODES * PER_NODE

        # The cardinality controls: one listener, one family, histograms summed.
        one = scrape(proxy, "?listener=n1-7")
        assert {labels["listener"] for name, rows in one.items() if name.startswith("cacheport_")
                for labels, _v in rows if "listener" in labels} == {"n1-7"}
        family = scrape(proxy, "?name[]=cacheport_upstream_up")
        assert set(family) == {"cacheport_upstream_up"}
        assert len(family["cacheport_upstream_up"]) == len(listeners)
        summed = scrape(proxy, "?histograms=sum")
        assert len(summed["cacheport_upstream_check_duration_seconds_bucket"]) == CHECK_BUCKETS
        assert summed["cacheport_upstream_check_duration_seconds_count"][0][1] >= \
            3 * len(listeners)
        assert "cacheport_upstream_connect_duration_seconds_bucket" in summed
        none = scrape(proxy, "?histograms=none")
        assert not any(name.endswith("_bucket") and name.startswith("cacheport_")
                       for name in none)
        code, _headers, body = http_get(proxy, "/metrics?histograms=some")
        assert code == 400 and b"histograms" in body
