"""Backup upstreams and ``on_down``, against real memcached and redis-server nodes."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pymemcache.client.base import Client as MemcacheClient

from proxy.config import Address
from tests.healthkit import (
    ADMIN,
    DOWN_WITHIN,
    FAST,
    UP_WITHIN,
    last_check,
    metrics,
    proxy_with_admin,
    sample,
    upstream_status,
    wait_health,
)
from tests.support import ServerProcess, free_port, make_config, start_server, wait_until


@pytest.fixture(params=["memcached", "redis"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[str, ServerProcess, ServerProcess]]:
    """A primary node and its backup, of one kind."""
    kind = str(request.param)
    primary = start_server(kind)
    try:
        backup = start_server(kind)
        try:
            yield kind, primary, backup
        finally:
            backup.stop()
    finally:
        primary.stop()


def writer(kind: str, port: int) -> Callable[[str, str], None]:
    def write(key: str, value: str) -> None:
        if kind == "redis":
            client = redis.Redis(port=port, socket_timeout=5)
            client.set(key, value)
            client.close()
        else:
            mc = MemcacheClient(("127.0.0.1", port), connect_timeout=5, timeout=5)
            assert mc.set(key, value.encode(), noreply=False)
            mc.close()

    return write


def read(kind: str, server: ServerProcess, key: str) -> str | None:
    if kind == "redis":
        client = redis.Redis(port=server.port, socket_timeout=5)
        value: Any = client.get(key)
        client.close()
    else:
        mc = MemcacheClient(("127.0.0.1", server.port), connect_timeout=5, timeout=5)
        value = mc.get(key)
        mc.close()
    return value.decode() if value is not None else None


def test_new_connections_use_the_backup_while_the_primary_is_down(
        pair: tuple[str, ServerProcess, ServerProcess]) -> None:
    kind, primary, backup = pair
    listeners = [{"name": "node", "listen": "127.0.0.1:0", "upstream": primary.address,
                  "protocol": kind, "backup": [backup.address], "health": FAST}]
    with proxy_with_admin(listeners) as proxy:
        write = writer(kind, proxy.port("node"))
        wait_health(proxy, "node", primary.address, "up", UP_WITHIN)
        wait_health(proxy, "node", backup.address, "up", UP_WITHIN)
        write("before", "primary")
        assert read(kind, primary, "before") == "primary"
        assert read(kind, backup, "before") is None

        primary.kill()
        wait_health(proxy, "node", primary.address, "down", DOWN_WITHIN)
        assert upstream_status(proxy, "node", backup.address)["in_use"] is True
        write("during", "backup")
        assert read(kind, backup, "during") == "backup"

        primary.restart()
        wait_health(proxy, "node", primary.address, "up", UP_WITHIN)
        write("after", "primary again")
        assert read(kind, primary, "after") == "primary again"
        assert read(kind, backup, "after") is None

        s = metrics(proxy)
        assert sample(s, "cacheport_upstream_connections_total", listener="node",
                      upstream=backup.address) == 1
        assert sample(s, "cacheport_upstream_connections_total", listener="node",
                      upstream=primary.address) == 2
        assert sample(s, "cacheport_connections_refused_total", listener="node",
                      reason="upstream_down") == 0


def test_all_upstreams_down_refuses_with_reason(
        pair: tuple[str, ServerProcess, ServerProcess]) -> None:
    kind, primary, backup = pair
    listeners = [{"name": "node", "listen": "127.0.0.1:0", "upstream": primary.address,
                  "protocol": kind, "backup": [backup.address], "health": FAST}]
    with proxy_with_admin(listeners) as proxy:
        wait_health(proxy, "node", backup.address, "up", UP_WITHIN)
        primary.kill()
        backup.kill()
        wait_health(proxy, "node", primary.address, "down", DOWN_WITHIN)
        wait_health(proxy, "node", backup.address, "down", DOWN_WITHIN)
        with socket.create_connection(("127.0.0.1", proxy.port("node")), timeout=5) as sock:
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        wait_until(lambda: sample(metrics(proxy), "cacheport_connections_refused_total",
                                  listener="node", reason="upstream_down") == 1, 5,
                   message="the refusal to be counted")


@pytest.fixture
def two_primaries(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    # No shutdown-timeout: a primary would wait up to 10 s for its replica when stopped.
    # A replica's full sync writes dump.rdb: keep it out of the working directory.
    extra = ["--shutdown-timeout", "0", "--dir", str(tmp_path)]
    a = start_server("redis", extra)
    try:
        b = start_server("redis", extra)
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def demote(node: ServerProcess, to: ServerProcess) -> None:
    """Make ``node`` a replica of ``to``, as a failover does; its TCP connections stay up."""
    client = redis.Redis(port=node.port, socket_timeout=5)
    client.replicaof("127.0.0.1", str(to.port))
    client.close()


@pytest.mark.parametrize("on_down", ["close", "keep"])
def test_on_down_decides_whether_live_connections_to_a_demoted_primary_survive(
        two_primaries: tuple[ServerProcess, ServerProcess], on_down: str) -> None:
    a, b = two_primaries
    listeners = [{"name": "primary", "listen": "127.0.0.1:0", "upstream": a.address,
                  "protocol": "redis", "backup": [b.address], "on_down": on_down,
                  "health": {**FAST, "role": "primary"}}]
    with proxy_with_admin(listeners) as proxy:
        wait_health(proxy, "primary", a.address, "up", UP_WITHIN)
        client = redis.Redis(port=proxy.port("primary"), socket_timeout=5,
                             single_connection_client=True,
                             retry=None)  # see a closed connection, do not hide it
        assert client.ping()
        demote(a, to=b)
        wait_health(proxy, "primary", a.address, "down", DOWN_WITHIN)
        last_check(proxy, "primary", a.address, "role is replica, not primary")
        if on_down == "close":
            listener = proxy.server.listeners["primary"]
            wait_until(lambda: proxy.call(lambda: listener.active) == 0, DOWN_WITHIN,
                       message="the connection to the demoted node to close")
            with pytest.raises(redis.ConnectionError):
                client.ping()
            assert sample(metrics(proxy), "cacheport_connections_closed_total",
                          listener="primary", reason="upstream_down") == 1
        else:
            assert client.ping()  # still connected to the (now replica) node
            assert client.execute_command("ROLE")[0] == b"slave"
        client.close()
        # Either way, new connections follow the primary.
        fresh = redis.Redis(port=proxy.port("primary"), socket_timeout=5)
        assert fresh.execute_command("ROLE")[0] == b"master"
        fresh.set("followed", "yes")
        fresh.close()
        direct = redis.Redis(port=b.port, socket_timeout=5)
        assert direct.get("followed") == b"yes"
        direct.close()


def test_reload_keeps_what_the_checks_saw_and_checks_new_upstreams(
        two_primaries: tuple[ServerProcess, ServerProcess]) -> None:
    kind = "redis"
    first, second = two_primaries
    dead = f"127.0.0.1:{free_port()}"
    listeners = [
        {"name": "kept", "listen": "127.0.0.1:0", "upstream": dead, "protocol": kind,
         "health": FAST},
        {"name": "moved", "listen": "127.0.0.1:0", "upstream": first.address,
         "protocol": kind, "health": FAST},
    ]
    with proxy_with_admin(listeners) as proxy:
        wait_health(proxy, "kept", dead, "down", DOWN_WITHIN)
        wait_health(proxy, "moved", first.address, "up", UP_WITHIN)
        monitor = proxy.server.monitor
        assert monitor is not None
        host, port = dead.split(":")
        kept = monitor.targets[("kept", Address(host, int(port)))]
        new = make_config([
            listeners[0],
            {**listeners[1], "upstream": second.address},
            {"name": "added", "listen": "127.0.0.1:0", "upstream": second.address,
             "protocol": kind, "health": FAST},
        ], admin=ADMIN)
        plan = proxy.call(lambda: proxy.server.reload(new))
        assert [lc.name for lc in plan.added] == ["added"]
        # The unchanged listener's target is the same object, still DOWN: no new first check.
        assert monitor.targets[("kept", kept.upstream)] is kept and kept.state.value == "down"
        assert [str(t.upstream) for t in monitor.targets_of("moved")] == [second.address]
        wait_health(proxy, "moved", second.address, "up", UP_WITHIN)
        wait_health(proxy, "added", second.address, "up", UP_WITHIN)
        client = redis.Redis(port=proxy.port("moved"), socket_timeout=5)
        client.set("where", "second")
        client.close()
        assert read(kind, second, "where") == "second"
