"""A real Redis Cluster the client cannot reach, served through cacheport as on AWS.

::

    ns cli: redis-py RedisCluster --> 198.51.100.1:7000 (seed) / :7001.. (one per node)
    ns nat: cacheport run (subprocess)  --> 192.0.2.11..17:6379
    ns vpc: 3 masters + 3 replicas, all on port 6379, each on its own 192.0.2.x

Every node listens on 6379, as on ElastiCache, so only the rewritten addresses tell the
nodes apart. The client gets no ``address_remap``; a connection to a node's own address
could not even leave its namespace. The tests run in order on one cluster: load, then
failover, then resharding (MOVED and ASK), then a node added and removed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from proxy.relay.engine import native_available
from tests.netns_lab import CLIENT_IP, NAT_IP, NamespaceUnavailable, NetnsLab, NsThread
from tests.support import CacheportProcess, require_binary, stop_process, wait_until

SEED_PORT = 7000
PORTS = (7001, 7016)
NODE_PORT = 6379
pytestmark = pytest.mark.timeout(90)


@dataclass
class Node:
    ip: str
    proc: subprocess.Popen[bytes]
    node_id: str = ""

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class Lab:
    """The namespaces, the cluster in vpc, cacheport in nat, and a thread in cli."""

    net: NetnsLab
    vpc: NsThread
    cli: NsThread
    workdir: Path
    nodes: list[Node] = field(default_factory=list)
    cacheport: CacheportProcess | None = None
    state_path: Path | None = None
    _admins: dict[str, redis.Redis] = field(default_factory=dict)

    # -- the cluster, from inside vpc -------------------------------------------------

    def start_node(self, ip: str) -> Node:
        conf = self.workdir / f"nodes-{uuid.uuid4().hex}.conf"
        proc = subprocess.Popen(
            [*self.net.prefix(self.net.vpc), require_binary("redis-server"), "--bind", ip,
             "--bind-source-addr", ip, "--port", str(NODE_PORT), "--protected-mode", "no",
             "--cluster-enabled", "yes",
             "--cluster-config-file", str(conf), "--dir", str(self.workdir),
             "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no",
             "--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1",
             "--logfile", "", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        node = Node(ip, proc)
        self.nodes.append(node)
        wait_until(lambda: self.vpc.run(self._ping, ip), 10, 0.05, f"redis-server on {ip}")
        node.node_id = self.admin(ip, "CLUSTER", "MYID")
        return node

    def _ping(self, ip: str) -> bool:
        try:
            with socket.create_connection((ip, NODE_PORT), timeout=0.5):
                return True
        except OSError:
            return False

    def admin(self, ip: str, *command: Any) -> Any:
        """A command to one node, sent from inside vpc."""
        def call() -> Any:
            client = self._admins.get(ip)
            if client is None:
                client = self._admins[ip] = redis.Redis(host=ip, port=NODE_PORT,
                                                        socket_timeout=10,
                                                        decode_responses=True)
            return client.execute_command(*command)
        return self.vpc.run(call)

    def redis_cli(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run([*self.net.prefix(self.net.vpc), require_binary("redis-cli"),
                                 *args], capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"redis-cli {args}: {result.stdout}{result.stderr}"
        return result.stdout

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.proc.poll() is None]

    def shards(self) -> list[dict[str, Any]]:
        """CLUSTER SHARDS as seen by the first live node: [{slots, nodes: [{id, ip, role}]}]."""
        raw = self.admin(self.live()[0].ip, "CLUSTER", "SHARDS")
        out = []
        for shard in raw:  # redis-py parses it into dicts already (RESP2 flat lists otherwise)
            s = shard if isinstance(shard, dict) else dict(zip(shard[::2], shard[1::2],
                                                               strict=True))
            s["nodes"] = [n if isinstance(n, dict) else dict(zip(n[::2], n[1::2], strict=True))
                          for n in s["nodes"]]
            out.append(s)
        return out

    def master_of(self, slot: int) -> dict[str, Any]:
        for shard in self.shards():
            slots = shard["slots"]
            if any(a <= slot <= b for a, b in zip(slots[::2], slots[1::2], strict=True)):
                return next(n for n in shard["nodes"] if n["role"] == "master")
        raise AssertionError(f"slot {slot} has no master")

    def settled(self) -> bool:
        """Every node reports cluster_state:ok, they agree on the number of nodes, and
        redis-cli's own check finds them agreeing on the slots (what --cluster reshard
        insists on; gossip can take a while to converge on a loaded machine)."""
        try:
            infos = [self.admin(n.ip, "CLUSTER", "INFO") for n in self.live()]
        except redis.RedisError:
            return False
        if not (all("cluster_state:ok" in i for i in infos) and len(
                {i.split("cluster_known_nodes:")[1].split()[0] for i in infos}) == 1):
            return False
        check = subprocess.run(
            [*self.net.prefix(self.net.vpc), require_binary("redis-cli"), "--cluster", "check",
             f"{self.live()[0].ip}:{NODE_PORT}"], capture_output=True, text=True, timeout=30)
        return check.returncode == 0 and "All nodes agree" in check.stdout

    # -- cacheport's view, from its state file ----------------------------------------

    def ports(self) -> dict[str, int]:
        """node id -> cacheport port, as cacheport persisted it."""
        assert self.state_path is not None
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        entry = data["clusters"]["rc"]
        return {i: p for i, p in entry["ports"]["assigned"].items() if i in entry["nodes"]}

    def reachable_from_client(self, port: int) -> bool:
        def probe() -> bool:
            try:
                with socket.create_connection((NAT_IP, port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(64) == b"+PONG\r\n"
            except OSError:
                return False
        return self.cli.run(probe)


@pytest.fixture(scope="module", params=["python", "native"])
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
        ) -> Iterator[Lab]:
    """The lab, with cacheport's cluster listeners on the buffered rewriting relay and
    framed by the native engine."""
    relay = str(request.param)
    if relay == "native" and not native_available():
        pytest.skip("the native engine is not built here")
    try:
        net = NetnsLab().create()
    except NamespaceUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
    workdir = tmp_path_factory.mktemp("netns-cluster")
    lab = Lab(net, net.thread(net.vpc), net.thread(net.cli), workdir)
    try:
        for ip in net.vpc_ips[:6]:
            lab.start_node(ip)
        lab.redis_cli("--cluster", "create", *[f"{n.ip}:{NODE_PORT}" for n in lab.nodes],
                      "--cluster-replicas", "1", "--cluster-yes")
        wait_until(lab.settled, 30, 0.1, "cluster_state:ok on every node")
        # Replicas show up in CLUSTER SLOTS (what redis-py reads) once they have synced.
        wait_until(lambda: all(len(r) == 4 for n in lab.nodes
                               for r in lab.admin(n.ip, "CLUSTER", "SLOTS")), 30, 0.1,
                   "a master and a synced replica in every node's CLUSTER SLOTS")
        config = workdir / "cacheport.yaml"
        lab.state_path = workdir / "state" / "cacheport-state.json"
        config.write_text(textwrap.dedent(f"""\
            drain_timeout: 30s
            state_dir: state
            clusters:
              - name: rc
                engine: redis-cluster
                seed: {net.vpc_ips[0]}:{NODE_PORT}
                announce: {NAT_IP}
                listen: {NAT_IP}
                allow: [{CLIENT_IP}/32]
                ports: {PORTS[0]}-{PORTS[1]}
                seed_port: {SEED_PORT}
                refresh: 1s
                retire_grace: 1m
                relay: {relay}
            """))
        lab.cacheport = CacheportProcess(config, "--loop", "uvloop",
                                         prefix=net.prefix(net.nat))
        lab.cacheport.wait_serving(20)
        wait_until(lambda: len(lab.ports()) == 6, 10, 0.1, "six node ports in the state file")
        yield lab
    finally:
        if lab.cacheport is not None:
            lab.cacheport.stop()
            print(lab.cacheport.log()[-4000:])
        for admin in lab._admins.values():
            admin.close()
        for node in lab.nodes:
            node.stop()
        net.close()


# --------------------------------------------------------------------------- the client


class ConnectRecorder:
    """Every address a socket in this process connects to, per thread name."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []
        self._original = socket.socket.connect

    def __enter__(self) -> ConnectRecorder:
        original, seen = self._original, self.seen

        def connect(sock: socket.socket, address: Any) -> None:
            seen.append((threading.current_thread().name, address))
            original(sock, address)

        socket.socket.connect = connect  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        socket.socket.connect = self._original  # type: ignore[method-assign]

    def client_targets(self, cli: NsThread) -> set[str]:
        return {addr[0] for name, addr in self.seen if name.startswith(f"netns-{cli.namespace}")}


@pytest.fixture(scope="module")
def recorder() -> Iterator[ConnectRecorder]:
    with ConnectRecorder() as rec:
        yield rec


@pytest.fixture(scope="module")
def rc(lab: Lab, recorder: ConnectRecorder) -> Iterator[RedisCluster]:
    client: RedisCluster = lab.cli.run(lambda: RedisCluster(
        host=NAT_IP, port=SEED_PORT, decode_responses=True, socket_timeout=5,
        socket_connect_timeout=2))
    try:
        yield client
    finally:
        lab.cli.run(client.close)


def client_endpoints(client: RedisCluster) -> set[tuple[str, int]]:
    """Every (host, port) the client knows a node by or holds a connection to."""
    out: set[tuple[str, int]] = set()
    for node in client.nodes_manager.nodes_cache.values():
        out.add((node.host, node.port))
        if node.redis_connection is not None:
            pool = node.redis_connection.connection_pool
            kwargs = pool.connection_kwargs
            out.add((kwargs["host"], kwargs["port"]))
            for conn in [*pool._get_free_connections(), *pool._get_in_use_connections()]:
                out.add((conn.host, conn.port))
    return out


def assert_only_nat(lab: Lab, client: RedisCluster, recorder: ConnectRecorder) -> None:
    endpoints = lab.cli.run(lambda: client_endpoints(client))
    cacheport_ports = set(lab.ports().values()) | {SEED_PORT}
    assert {h for h, _ in endpoints} == {NAT_IP}, endpoints
    assert {p for _, p in endpoints} <= cacheport_ports, endpoints
    assert recorder.client_targets(lab.cli) == {NAT_IP}


def in_client(lab: Lab, fn: Callable[[], Any], timeout: float = 60) -> Any:
    return lab.cli.run(fn, timeout=timeout)


# --------------------------------------------------------------------------- the tests


def test_client_stores_10000_keys_across_all_slots_through_nat_ports_only(
        lab: Lab, rc: RedisCluster, recorder: ConnectRecorder) -> None:
    assert len({p for p in lab.ports().values()}) == 6
    nodes = in_client(lab, lambda: rc.get_nodes())
    assert {(n.host, n.port) for n in nodes} == {(NAT_IP, p) for p in lab.ports().values()}

    def load() -> None:
        for i in range(10_000):
            rc.set(f"key:{i}", f"value:{i}")
        pipe = rc.pipeline()
        for i in range(10_000):
            pipe.get(f"key:{i}")
        assert pipe.execute() == [f"value:{i}" for i in range(10_000)]

    in_client(lab, load)
    masters = [n["ip"] for s in lab.shards() for n in s["nodes"] if n["role"] == "master"]
    counts = [lab.admin(ip, "DBSIZE") for ip in masters]
    assert sum(counts) == 10_000 and all(c > 3000 for c in counts)

    def mixed() -> None:
        tagged = {f"{{user:42}}:{i}": str(i) for i in range(50)}
        rc.mset_nonatomic(tagged)
        assert rc.mget(list(tagged)) == list(tagged.values())
        moved = "-MOVED 3999 192.0.2.12:6379\r\n-ASK 1 :6379 CONFIG cluster 0 1"
        rc.set("lookalike", moved)
        assert rc.get("lookalike") == moved
        big = "x" * (2 << 20)
        rc.set("big", big)
        assert rc.get("big") == big
        assert rc.blpop(["empty-list"], timeout=0.2) is None
        with pytest.raises(redis.ResponseError, match="same slot"):
            rc.execute_command("MGET", "key:1", "key:2", target_nodes=rc.get_primaries()[0])

    in_client(lab, mixed)
    # RESP3 (HELLO 3) clients get the same rewriting.
    resp3: RedisCluster = in_client(lab, lambda: RedisCluster(
        host=NAT_IP, port=SEED_PORT, decode_responses=True, protocol=3, socket_timeout=5))
    try:
        assert in_client(lab, lambda: [resp3.get(f"key:{i}") for i in range(200)]) == [
            f"value:{i}" for i in range(200)]
        assert {h for h, _ in in_client(lab, lambda: client_endpoints(resp3))} == {NAT_IP}
    finally:
        in_client(lab, resp3.close)
    assert_only_nat(lab, rc, recorder)


def test_a_stray_command_gets_a_moved_to_the_nat_address(lab: Lab) -> None:
    """A plain client on the wrong node's port is redirected to a port it can reach."""
    slot = 866  # "key:1"'s neighbour; any slot works
    owner = lab.master_of(slot)
    wrong = next(i for i, p in lab.ports().items() if i != owner["id"])

    def ask() -> str:
        with socket.create_connection((NAT_IP, lab.ports()[wrong]), timeout=5) as s:
            key = next(f"k{i}" for i in range(100_000)
                       if redis.cluster.key_slot(f"k{i}".encode()) == slot)
            s.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key.encode()))
            return s.recv(256).decode()

    reply = lab.cli.run(ask)
    assert reply == f"-MOVED {slot} {NAT_IP}:{lab.ports()[owner['id']]}\r\n"


def test_client_keeps_working_after_a_replica_takes_over(
        lab: Lab, rc: RedisCluster, recorder: ConnectRecorder) -> None:
    slot = redis.cluster.key_slot(b"key:7")
    old = lab.master_of(slot)
    shard = next(s for s in lab.shards() if any(n["id"] == old["id"] for n in s["nodes"]))
    replica = next(n for n in shard["nodes"] if n["role"] != "master")
    lab.admin(replica["ip"], "CLUSTER", "FAILOVER")
    wait_until(lambda: lab.master_of(slot)["id"] == replica["id"], 20, 0.1,
               "the replica to become master")
    wait_until(lab.settled, 20, 0.1, "the cluster to settle after failover")

    def use() -> None:
        for i in range(2000):
            assert rc.get(f"key:{i}") == f"value:{i}"
        rc.set("key:7", "after failover")
        assert rc.get("key:7") == "after failover"

    in_client(lab, use)
    assert in_client(lab, lambda: rc.get_node_from_key("key:7").port) == lab.ports()[
        replica["id"]]
    assert_only_nat(lab, rc, recorder)


def _migrate_one_slot_halfway(lab: Lab, slot: int, source: dict[str, Any],
                              target: dict[str, Any], keys: list[str]) -> None:
    lab.admin(target["ip"], "CLUSTER", "SETSLOT", slot, "IMPORTING", source["id"])
    lab.admin(source["ip"], "CLUSTER", "SETSLOT", slot, "MIGRATING", target["id"])
    lab.admin(source["ip"], "MIGRATE", target["ip"], NODE_PORT, "", 0, 5000, "KEYS",
              *keys[: len(keys) // 2])


def test_client_follows_rewritten_ask_and_moved_while_slots_move(
        lab: Lab, rc: RedisCluster, recorder: ConnectRecorder) -> None:
    slot = redis.cluster.key_slot(b"ask")

    def roles_agree() -> bool:
        """The gossiped roles (CLUSTER SHARDS) match what every node says of itself; right
        after the failover test they can lag behind on a loaded machine."""
        gossiped = {n["ip"] for s in lab.shards() for n in s["nodes"] if n["role"] == "master"}
        actual = {n.ip for n in lab.live() if lab.admin(n.ip, "ROLE")[0] == "master"}
        return gossiped == actual

    wait_until(lambda: lab.settled() and roles_agree(), 30, 0.2, "roles to agree")
    source = lab.master_of(slot)
    target = next(n for s in lab.shards() for n in s["nodes"]
                  if n["role"] == "master" and n["id"] != source["id"])
    keys = [f"{{ask}}:{i}" for i in range(10)]
    in_client(lab, lambda: rc.mset_nonatomic({k: f"value:{k.split(':')[1]}" for k in keys}))
    _migrate_one_slot_halfway(lab, slot, source, target, keys)

    def raw_get(key: str) -> str:
        with socket.create_connection((NAT_IP, lab.ports()[source["id"]]), timeout=5) as s:
            s.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key.encode()))
            return s.recv(256).decode()

    moved_key = keys[0]
    assert lab.cli.run(raw_get, moved_key) == (
        f"-ASK {slot} {NAT_IP}:{lab.ports()[target['id']]}\r\n")
    # redis-py follows the rewritten ASK (ASKING + the command, at the target's port).
    assert in_client(lab, lambda: [rc.get(k) for k in keys]) == [
        f"value:{k.split(':')[1]}" for k in keys]
    # Finish the slot's move, then move 100 more slots with redis-cli: MOVED everywhere.
    rest = lab.admin(source["ip"], "CLUSTER", "GETKEYSINSLOT", slot, 1000)
    lab.admin(source["ip"], "MIGRATE", target["ip"], NODE_PORT, "", 0, 5000, "KEYS", *rest)
    # Every node that is a master right now (asked directly: after the failover test the
    # gossiped view of roles can lag behind under load).
    for node in lab.live():
        try:
            lab.admin(node.ip, "CLUSTER", "SETSLOT", slot, "NODE", target["id"])
        except redis.ResponseError as exc:
            if "only with masters" not in str(exc):
                raise
    wait_until(lab.settled, 30, 0.2, "the nodes to agree before resharding")
    lab.redis_cli("--cluster", "reshard", f"{source['ip']}:{NODE_PORT}", "--cluster-from",
                  source["id"], "--cluster-to", target["id"], "--cluster-slots", "100",
                  "--cluster-yes")
    wait_until(lab.settled, 20, 0.1, "the cluster to settle after resharding")

    def check() -> None:
        values = rc.mget_nonatomic([f"key:{i}" for i in range(10_000)])
        assert values[:7] + values[8:] == [f"value:{i}" for i in range(10_000) if i != 7]

    in_client(lab, check)
    assert rc.get_node_from_key(moved_key).port == lab.ports()[target["id"]]
    assert_only_nat(lab, rc, recorder)


def test_a_node_added_gets_a_listener_without_restart_and_a_removed_one_drains(
        lab: Lab, rc: RedisCluster, recorder: ConnectRecorder) -> None:
    assert lab.cacheport is not None
    pid = lab.cacheport.pid
    newcomer = lab.start_node(lab.net.vpc_ips[6])
    lab.admin(lab.nodes[0].ip, "CLUSTER", "MEET", newcomer.ip, NODE_PORT)
    wait_until(lambda: newcomer.node_id in lab.ports(), 20, 0.1,
               "cacheport to give the new node a port")
    port = lab.ports()[newcomer.node_id]
    assert PORTS[0] <= port <= PORTS[1]
    wait_until(lambda: lab.reachable_from_client(port), 10, 0.1, "a listener on its port")
    wait_until(lab.settled, 20, 0.1, "the cluster to know the new node")
    # Give it slots; the client finds its keys there through the new port.
    donor = lab.master_of(0)
    wait_until(lab.settled, 30, 0.2, "the nodes to agree before resharding")
    lab.redis_cli("--cluster", "reshard", f"{donor['ip']}:{NODE_PORT}", "--cluster-from",
                  donor["id"], "--cluster-to", newcomer.node_id, "--cluster-slots", "50",
                  "--cluster-yes")
    wait_until(lab.settled, 20, 0.1, "the cluster to settle")
    on_new = in_client(lab, lambda: [f"key:{i}" for i in range(10_000) if redis.cluster.key_slot(
        f"key:{i}".encode()) <= 49])
    assert in_client(lab, lambda: [rc.get(k) for k in on_new]) == [
        f"value:{k.split(':')[1]}" for k in on_new]
    assert in_client(lab, lambda: rc.get_node_from_key(on_new[0]).port) == port
    assert_only_nat(lab, rc, recorder)

    # Remove it again: slots back, forgotten by the others, reset. A connection held
    # through its listener is left to drain; new ones are refused.
    wait_until(lab.settled, 30, 0.2, "the nodes to agree before resharding")
    lab.redis_cli("--cluster", "reshard", f"{newcomer.ip}:{NODE_PORT}", "--cluster-from",
                  newcomer.node_id, "--cluster-to", donor["id"], "--cluster-slots", "50",
                  "--cluster-yes")
    wait_until(lab.settled, 20, 0.1, "the cluster to settle")

    def hold() -> socket.socket:
        s = socket.create_connection((NAT_IP, port), timeout=5)
        s.sendall(b"PING\r\n")
        assert s.recv(64) == b"+PONG\r\n"
        return s

    held = lab.cli.run(hold)
    try:
        for node in lab.live():
            if node is not newcomer:
                lab.admin(node.ip, "CLUSTER", "FORGET", newcomer.node_id)
        lab.admin(newcomer.ip, "CLUSTER", "RESET", "HARD")
        wait_until(lambda: newcomer.node_id not in lab.ports(), 20, 0.1,
                   "cacheport to drop the node that left")
        wait_until(lambda: not lab.reachable_from_client(port), 10, 0.1,
                   "its listener to stop accepting")

        def still_served() -> bytes:
            held.sendall(b"PING\r\n")
            return held.recv(64)

        assert lab.cli.run(still_served) == b"+PONG\r\n"  # draining, not cut
    finally:
        lab.cli.run(held.close)
    state = json.loads(lab.state_path.read_text())  # type: ignore[union-attr]
    assert state["clusters"]["rc"]["ports"]["retired"][str(port)]["id"] == newcomer.node_id
    assert in_client(lab, lambda: [rc.get(k) for k in on_new[:20]]) == [
        f"value:{k.split(':')[1]}" for k in on_new[:20]]
    assert lab.cacheport.pid == pid and lab.cacheport.proc.poll() is None
    assert_only_nat(lab, rc, recorder)
