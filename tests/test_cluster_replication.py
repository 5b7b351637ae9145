"""Replication groups (cluster mode disabled) through ``engine: redis-replication``, against
a real primary and two replicas on loopback: a port per node, primary_port following a
REPLICAOF failover while a client writes, reader_port balancing and dropping a killed
replica, a replica added at run time; and the pure parts (ROLE parsing, the reader choice,
the config checks) without sockets.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.admin import format_cluster
from proxy.admin.status import listener_status
from proxy.cluster.manager import ClusterManager
from proxy.cluster.replication import choose_reader
from proxy.config import Address, ConfigError
from proxy.protocols.redis_role import RoleError, parse_role
from proxy.relay.buffered import Relay
from proxy.relay.engine import NativeRelay, native_available
from tests.cluster_helpers import free_range
from tests.support import (
    ProxyThread,
    ServerProcess,
    make_config,
    start_server,
    valkey_server,
    wait_until,
)

HOST = "127.0.0.1"
pytestmark = pytest.mark.timeout(45)


# -- pure parts ---------------------------------------------------------------------------


def test_role_of_a_master_lists_its_replicas() -> None:
    raw = (b"*3\r\n$6\r\nmaster\r\n:42\r\n*2\r\n"
           b"*3\r\n$8\r\n10.0.0.2\r\n$4\r\n6379\r\n$2\r\n42\r\n"
           b"*3\r\n$8\r\n10.0.0.3\r\n$4\r\n6380\r\n$2\r\n40\r\n")
    role = parse_role(raw)
    assert role.is_master
    assert role.replicas == (("10.0.0.2", 6379), ("10.0.0.3", 6380))


def test_role_of_a_replica_names_its_master_and_link() -> None:
    raw = b"*5\r\n$5\r\nslave\r\n$8\r\n10.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:42\r\n"
    role = parse_role(raw)
    assert (role.role, role.master, role.link) == ("slave", ("10.0.0.1", 6379), "connected")


@pytest.mark.parametrize("raw", [b"-NOPERM no\r\n", b"*0\r\n", b"*2\r\n$6\r\nmaster\r\n:1\r\n",
                                 b"*5\r\n$5\r\nslave\r\n$1\r\nh\r\n$3\r\nabc\r\n$1\r\nx\r\n:1\r\n"])
def test_unusable_role_replies_are_errors(raw: bytes) -> None:
    with pytest.raises(RoleError):
        parse_role(raw)


A, B, P = Address("10.0.0.2", 6379), Address("10.0.0.3", 6379), Address("10.0.0.1", 6379)


def test_reader_takes_the_replica_with_fewest_connections() -> None:
    assert choose_reader([A, B], {A: 3, B: 1}, P, 0) == B
    assert choose_reader([A, B], {A: 1, B: 3}, P, 1) == A


def test_reader_ties_rotate_so_a_burst_spreads() -> None:
    picks = [choose_reader([A, B], {}, P, turn) for turn in range(4)]
    assert picks == [A, B, A, B]


def test_reader_falls_back_to_the_primary_without_healthy_replicas() -> None:
    assert choose_reader([], {}, P, 5) == P


def _cluster_doc(**extra: Any) -> dict[str, Any]:
    return {"name": "rr", "engine": "redis-replication", "seed": f"{HOST}:6379",
            "announce": HOST, "listen": HOST, "ports": "31000-31007", **extra}


def test_primary_and_reader_ports_must_lie_outside_the_range() -> None:
    with pytest.raises(ConfigError, match=r"reader_port.*inside the node range"):
        make_config([], clusters=[_cluster_doc(reader_port=31003)])


def test_role_ports_belong_to_replication_groups_only() -> None:
    with pytest.raises(ConfigError, match=r"primary_port.*only engine redis-replication"):
        make_config([], clusters=[_cluster_doc(engine="redis-cluster", primary_port=31100)])


def test_role_ports_may_not_repeat_the_seed_port() -> None:
    with pytest.raises(ConfigError, match=r"primary_port.*seed_port"):
        make_config([], clusters=[_cluster_doc(seed_port=31100, primary_port=31100)])


# -- a real primary and two replicas ------------------------------------------------------


# No 5 s wait before a full sync, no 10 s wait for replicas at shutdown.
FAST = ["--repl-diskless-sync-delay", "0", "--shutdown-timeout", "0"]


def _own_dir(base: Path) -> list[str]:
    """A replica writes the full sync's RDB file into its dir: never the work tree."""
    path = base / uuid.uuid4().hex
    path.mkdir()
    return ["--dir", str(path)]


def _replica_of(primary: ServerProcess, base: Path) -> ServerProcess:
    return start_server(primary.kind, [*FAST, *_own_dir(base), "--replicaof", HOST,
                                       str(primary.port)])


def _in_sync(primary: ServerProcess, replicas: int) -> bool:
    with redis.Redis(port=primary.port, socket_timeout=2) as r:
        info = r.info("replication")
    return sum(1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
               and v.get("state") == "online") == replicas


@pytest.fixture(params=["redis", "valkey"])
def group(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """[primary, replica, replica], replicas in sync: redis-server, and valkey-server where
    scripts/valkey.sh could get one."""
    if request.param == "valkey" and valkey_server() is None:
        pytest.skip("no valkey-server (scripts/valkey.sh found none to install)")
    nodes = [start_server(request.param, [*FAST, *_own_dir(tmp_path)])]
    try:
        nodes += [_replica_of(nodes[0], tmp_path), _replica_of(nodes[0], tmp_path)]
        wait_until(lambda: _in_sync(nodes[0], 2), 15, 0.05, "two replicas in sync")
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def _proxy(group: list[ServerProcess], tmp_path: Path, **extra: Any) -> ProxyThread:
    base = free_range(10)
    cluster = {"name": "rr", "engine": "redis-replication", "seed": f"{HOST}:{group[0].port}",
               "announce": HOST, "listen": HOST, "ports": f"{base + 2}-{base + 9}",
               "primary_port": base, "reader_port": base + 1, "refresh": "300ms", **extra}
    config = make_config([], clusters=[cluster], state_dir=str(tmp_path / "state"))
    return ProxyThread(config).start()


def _manager(proxy: ProxyThread) -> ClusterManager:
    return proxy.server.clusters["rr"]


def _port_behind(port: int) -> int:
    """Which redis-server a new connection to cacheport's ``port`` reaches."""
    with redis.Redis(port=port, socket_timeout=3) as r:
        return int(r.config_get("port")["port"])


def test_every_node_gets_a_port_and_role_ports_use_plain_relays(
        group: list[ServerProcess], tmp_path: Path) -> None:
    proxy = _proxy(group, tmp_path)
    try:
        manager = _manager(proxy)
        assert manager.primary is not None and manager.primary.address.port == group[0].port
        behind = {_port_behind(manager.book.port_of(i) or 0) for i in manager.nodes}
        assert behind == {n.port for n in group}
        assert _port_behind(manager.config.primary_port or 0) == group[0].port
        assert _port_behind(manager.config.reader_port or 0) in {group[1].port, group[2].port}
        listener = proxy.server.listeners["rr:primary"]
        assert listener.relay_factory is Relay  # nothing to rewrite: the zero-copy relays
        with redis.Redis(port=listener.config.listen.port, socket_timeout=3) as r:
            r.ping()
            relay = proxy.call(lambda: next(iter(listener.relays)))
            if native_available():
                assert isinstance(relay, NativeRelay)
        status = manager.status()
        assert status["primary"] == f"{HOST}:{group[0].port}"
        assert sorted(n["role"] for n in status["nodes"]) == ["master", "replica", "replica"]
        text = "\n".join(format_cluster(status))
        assert f"primary port {manager.config.primary_port}" in text
        assert f"reader port {manager.config.reader_port}" in text
        # /status shows where the reader port sends new connections: the replicas, with
        # the primary as the fallback.
        def roles() -> dict[str, tuple[str, bool]]:
            reader = proxy.call(lambda: listener_status(proxy.server.listeners["rr:reader"],
                                                        None))
            return {u["address"]: (u["role"], u["in_use"]) for u in reader["upstreams"]}

        wanted = {f"{HOST}:{group[0].port}": ("fallback", False),
                  f"{HOST}:{group[1].port}": ("replica", True),
                  f"{HOST}:{group[2].port}": ("replica", True)}
        wait_until(lambda: roles() == wanted, 10, message=f"reader roles {wanted}")
    finally:
        proxy.stop()


def test_primary_port_follows_a_failover_while_a_client_writes(
        group: list[ServerProcess], tmp_path: Path) -> None:
    proxy = _proxy(group, tmp_path)
    primary_port = _manager(proxy).config.primary_port
    written: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        client = redis.Redis(port=primary_port, socket_timeout=2)
        i = 0
        while not stop.is_set():
            try:
                client.set("counter", i)
                written.append(i)
                i += 1
            except redis.RedisError as exc:  # READONLY, or the connection closed: retry
                errors.append(type(exc).__name__)
                time.sleep(0.02)
        client.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        old, new, other = group
        wait_until(lambda: len(written) > 50, 10, 0.02, "writes through primary_port")
        with redis.Redis(port=new.port) as r:
            r.replicaof("NO", "ONE")
        for node in (old, other):
            with redis.Redis(port=node.port) as r:
                r.replicaof(HOST, new.port)
        manager = _manager(proxy)
        wait_until(lambda: manager.primary is not None
                   and manager.primary.address.port == new.port, 10, 0.05, "the new primary")
        mark = len(written)
        wait_until(lambda: len(written) > mark + 50, 10, 0.02, "writes after the failover")
        stop.set()
        thread.join(5)
        last = written[-1]
        with redis.Redis(port=new.port) as r:
            assert int(r.get("counter") or -1) == last  # the new primary took the writes
        assert manager.stats.failovers == 1
        assert _port_behind(primary_port or 0) == new.port
        # close_on_failover cut the old link: the writer saw errors and reconnected.
        assert errors
    finally:
        stop.set()
        proxy.stop()


def test_a_killed_replica_leaves_the_reader_rotation_and_comes_back(
        group: list[ServerProcess], tmp_path: Path) -> None:
    proxy = _proxy(group, tmp_path)
    try:
        manager = _manager(proxy)
        reader = manager.config.reader_port or 0
        primary, first, second = group
        held = [redis.Redis(port=reader, socket_timeout=3) for _ in range(4)]
        ports = [int(c.config_get("port")["port"]) for c in held]
        assert sorted(ports) == sorted([first.port, second.port] * 2)  # least connections
        for c in held:
            c.close()
        second.kill()
        wait_until(lambda: len(manager.healthy_replicas()) == 1, 10, 0.05, "one healthy replica")
        assert {_port_behind(reader) for _ in range(4)} == {first.port}
        second.restart()
        wait_until(lambda: len(manager.healthy_replicas()) == 2, 15, 0.05, "the replica back")
        assert {_port_behind(reader) for _ in range(4)} == {first.port, second.port}
        first.kill()
        second.kill()
        wait_until(lambda: not manager.healthy_replicas(), 10, 0.05, "no healthy replica")
        assert _port_behind(reader) == primary.port  # the fallback
    finally:
        proxy.stop()


def test_a_replica_added_gets_its_own_port_without_a_restart(
        group: list[ServerProcess], tmp_path: Path) -> None:
    proxy = _proxy(group, tmp_path)
    extra = None
    try:
        manager = _manager(proxy)
        extra = _replica_of(group[0], tmp_path)
        identity = f"{HOST}:{extra.port}"
        wait_until(lambda: identity in manager.nodes
                   and manager.nodes[identity].health == "online", 15, 0.05, "the new replica")
        port = manager.book.port_of(identity)
        assert port is not None
        wait_until(lambda: f"rr:{port}" in proxy.server.listeners, 5, 0.05, "its listener")
        assert _port_behind(port) == extra.port
    finally:
        proxy.stop()
        if extra is not None:
            extra.stop()


def test_a_replication_group_refreshes_every_5s_unless_told() -> None:
    config = make_config([], clusters=[_cluster_doc(), _cluster_doc(
        name="rc", engine="redis-cluster", ports="31010-31017"), _cluster_doc(
        name="r2", ports="31020-31027", refresh="1m")])
    assert [c.refresh for c in config.clusters] == [5.0, 30.0, 60.0]
