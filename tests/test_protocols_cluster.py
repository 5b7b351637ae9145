"""Redis Cluster rewriting and topology parsing against a real 3-master, 3-replica cluster.

The cluster runs on loopback (one redis-server per node, started in a temp dir and
stopped by PID). Replies are recorded from raw sockets, then fed to a ``ClusterRewriter``
in random splits: the output must equal what the whole stream gives, with every node
endpoint mapped and every other byte unchanged. A small threaded proxy built on the
rewriter lets a real ``redis.RedisCluster`` (no ``address_remap``) work through it.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.cluster import ClusterNode as PyClusterNode
from redis.cluster import RedisCluster

from proxy.protocols.redis_cluster import (
    ClusterRewriter,
    Remapper,
    Topology,
    TopologyError,
    parse_redirect,
    parse_topology,
    rewrite_node_line,
    rewrite_redirect,
    topology_from_nodes,
)
from proxy.protocols.resp import Framer, Reader, parse_one
from proxy.relay.engine import native_available
from tests.cluster_helpers import preferred_endpoint, start_lone_node
from tests.support import ServerProcess, free_port, require_binary, start_server, wait_until
from tests.test_protocols_helpers import RawConnection, command, splits

ANNOUNCE = "nat.example.test"
HOST = "127.0.0.1"

# --------------------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    nodes: list[ServerProcess]
    ids: dict[int, str] = field(default_factory=dict)  # port -> node id
    clients: dict[int, redis.Redis] = field(default_factory=dict)

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def client(self, port: int) -> redis.Redis:
        if port not in self.clients:
            self.clients[port] = redis.Redis(host=HOST, port=port, socket_timeout=5,
                                             decode_responses=True)
        return self.clients[port]

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        for n in self.nodes:
            n.stop()

    def topology(self, port: int | None = None,
                 source: Literal["shards", "slots", "nodes"] = "shards") -> Topology:
        raw = RawConnection(port or self.ports[0])
        try:
            return parse_topology(raw.call(command("CLUSTER", source.upper()))[0], source, HOST)
        finally:
            raw.close()

    def masters(self) -> list[int]:
        return sorted(n.port for n in self.topology().masters)

    def owner_port(self, key: str) -> int:
        slot = int(self.client(self.ports[0]).execute_command("CLUSTER", "KEYSLOT", key))
        owner = self.topology().owner(slot)
        assert owner is not None
        return owner.port

    def config_all(self, name: str, value: str) -> None:
        for port in self.ports:
            self.client(port).config_set(name, value)


def _cluster_ok(c: Cluster) -> bool:
    for port in c.ports:
        try:
            info = c.client(port).cluster("info")
        except redis.RedisError:
            return False
        if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(
                c.ports):
            return False
    return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Six nodes: three masters with one replica each, all on 127.0.0.1."""
    cli = require_binary("redis-cli")
    workdir: Path = tmp_path_factory.mktemp("cluster")
    c = Cluster([])
    nodes = c.nodes
    try:
        t0 = time.monotonic()
        for _ in range(6):
            nodes.append(start_server("redis", [
                "--cluster-enabled", "yes", "--dir", str(workdir),
                "--cluster-config-file", f"nodes-{uuid.uuid4().hex}.conf",
                "--cluster-port", str(free_port()), "--cluster-node-timeout", "2000",
                "--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1",
            ]))
        ports = [n.port for n in nodes]
        subprocess.run(
            [cli, "--cluster", "create", *[f"{HOST}:{p}" for p in ports],
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )
        t1 = time.monotonic()
        wait_until(lambda: _cluster_ok(c), 30, 0.1, "cluster_state:ok on every node")
        t2 = time.monotonic()
        c.ids.update({p: c.client(p).execute_command("CLUSTER", "MYID") for p in ports})
        # Replicas show up in CLUSTER SLOTS once they have synced with their master.
        wait_until(lambda: all(len(c.topology(p, "slots").nodes) == 6 for p in ports), 30, 0.1,
                   "three masters and three synced replicas in every CLUSTER SLOTS")
        print(f"cluster: started+created {t1 - t0:.1f}s, ok {t2 - t1:.1f}s, "
              f"replicas synced {time.monotonic() - t2:.1f}s")
        yield c
    finally:
        c.close()


# --------------------------------------------------------------------------- helpers


def _mapper(cluster: Cluster, extra: dict[str, str] | None = None
            ) -> Callable[[str, int], tuple[str, int] | None]:
    """127.0.0.1:<node port> (or a node's hostname) -> nat.example.test:<41000 + index>."""
    table = {(HOST, p): (ANNOUNCE, 41000 + i) for i, p in enumerate(sorted(cluster.ports))}
    for name, ip in (extra or {}).items():
        for (h, p), v in list(table.items()):
            if h == ip:
                table[(name, p)] = v
    return _Table(table)


class _Table:
    """A mapper over a plain table (the engine's node map is built from the same one)."""

    def __init__(self, table: dict[tuple[str, int], tuple[str, int]]) -> None:
        self.table = table

    def __call__(self, host: str, port: int) -> tuple[str, int] | None:
        return self.table.get((host, port))


def _native(sent: bytes, chunks: list[bytes],
            mapper: Callable[[str, int], tuple[str, int] | None], upstream: int,
            by_id: Callable[[str], tuple[str, int] | None] | None) -> bytes:
    """The same conversation through the engine's C framer (asks answered in Python)."""
    from proxy.protocols.redis_cluster import Remapper, rewrite_asked
    from proxy.relay.engine import _engine

    table = getattr(mapper, "table", None)
    nodemap = None
    if table is not None:
        nodemap = _engine.NodeMap()
        nodemap.swap([(h.encode(), p, b"%s:%d" % (a.encode(), ap))
                      for (h, p), (a, ap) in table.items()])
    fr = _engine.Framer(nodemap)
    remap = Remapper(mapper, (HOST, upstream), by_id=by_id)
    fr.feed_request(sent)
    out = []
    for chunk in chunks:
        for ev in fr.feed_reply(chunk):
            assert ev[0] != "error"
            if ev[0] == "ask":
                new = rewrite_asked(ev[2], ev[1], ev[3], remap)
                out.append(ev[2] if new is None else new)
            else:
                out.append(ev[1])
    return b"".join(out)


def _record(port: int, *steps: tuple[bytes, int]) -> tuple[bytes, bytes]:
    conn = RawConnection(port)
    try:
        for data, replies in steps:
            conn.call(data, replies)
        return bytes(conn.sent), bytes(conn.received)
    finally:
        conn.close()


def _rewrite(sent: bytes, received: bytes, mapper: Callable[[str, int], tuple[str, int] | None],
             upstream: int, rng: random.Random | None = None,
             by_id: Callable[[str], tuple[str, int] | None] | None = None,
             ) -> tuple[bytes, ClusterRewriter]:
    rw = ClusterRewriter(mapper, (HOST, upstream), by_id=by_id)
    assert rw.feed_request(sent) is sent
    if rng is None:
        return bytes(rw.feed_reply(received)), rw
    cut = [rng.randrange(len(received) + 1) for _ in range(rng.randrange(1, 30))]
    return b"".join(bytes(rw.feed_reply(c)) for c in splits(received, cut)), rw


def _frames(stream: bytes) -> list[bytes]:
    reader = Reader()
    reader.feed(stream)
    out = []
    while (raw := reader.next_raw()) is not None:
        out.append(raw)
    assert reader.buffered == 0
    return out


def _same_whole_and_split(sent: bytes, received: bytes, mapper: Callable[[str, int], tuple[
        str, int] | None], upstream: int,
        by_id: Callable[[str], tuple[str, int] | None] | None = None) -> bytes:
    whole, rw = _rewrite(sent, received, mapper, upstream, by_id=by_id)
    assert not rw.conversation.pending and rw.request_error is None
    rng = random.Random(11)
    for _ in range(25):
        assert _rewrite(sent, received, mapper, upstream, rng, by_id)[0] == whole
    if native_available():  # the engine's framer must agree, whole and split
        assert _native(sent, [received], mapper, upstream, by_id) == whole
        for _ in range(10):
            cut = [rng.randrange(len(received) + 1) for _ in range(rng.randrange(1, 30))]
            assert _native(sent, list(splits(received, cut)), mapper, upstream, by_id) == whole
    return whole


def _endpoints(topo: Topology) -> set[tuple[str, int]]:
    return {(n.host, n.port) for n in topo.nodes}


def _shape(topo: Topology) -> set[tuple[str, str, str, tuple[tuple[int, int], ...]]]:
    return {(n.node_id, n.role, n.master_id, n.slots) for n in topo.nodes}


# --------------------------------------------------------------------------- topology


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_real_shards_slots_and_nodes_give_the_same_topology(cluster: Cluster,
                                                            resp3: bool) -> None:
    hello = [(command("HELLO", 3), 1)] if resp3 else []
    _, received = _record(cluster.ports[0], *hello, (command("CLUSTER", "SHARDS"), 1),
                          (command("CLUSTER", "SLOTS"), 1), (command("CLUSTER", "NODES"), 1))
    raws = _frames(received)[len(hello):]
    shards = parse_topology(raws[0], "shards", HOST)
    slots = parse_topology(raws[1], "slots", HOST)
    nodes = parse_topology(raws[2], "nodes", HOST)
    assert len(shards.nodes) == 6 and len(shards.masters) == 3
    assert _endpoints(shards) == _endpoints(slots) == _endpoints(nodes) == {
        (HOST, p) for p in cluster.ports}
    assert _shape(shards) == _shape(slots) == _shape(nodes)
    assert {n.node_id for n in shards.nodes} == set(cluster.ids.values())
    covered = sorted(r for m in shards.masters for r in m.slots)
    assert covered[0][0] == 0 and covered[-1][1] == 16383
    assert all(n.health == "online" for n in shards.nodes)
    assert shards.owner(0) is not None and shards.owner(16383) is not None


def test_topology_errors_say_what_failed(redis_server: ServerProcess) -> None:
    """A standalone server: cluster support disabled."""
    conn = RawConnection(redis_server.port)
    reply = conn.call(command("CLUSTER", "SHARDS"))[0]
    conn.close()
    with pytest.raises(TopologyError, match="CLUSTER SHARDS failed: ERR This instance has "
                                            "cluster support disabled"):
        parse_topology(reply, "shards", HOST)
    with pytest.raises(TopologyError, match="not RESP"):
        parse_topology(b"garbage\r\n", "slots", HOST)
    with pytest.raises(TopologyError, match="fields"):
        topology_from_nodes(b"abc 127.0.0.1:1@2 master\n", HOST)


# --------------------------------------------------------------------------- rewriting


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_real_node_lists_are_rewritten_with_correct_lengths(cluster: Cluster,
                                                            resp3: bool) -> None:
    hello = [(command("HELLO", 3), 1)] if resp3 else []
    master = cluster.masters()[0]
    local = next(k for k in (f"key{i}" for i in range(100)) if cluster.owner_port(k) == master)
    sent, received = _record(
        master, *hello, (command("SET", local, "-MOVED 1 10.0.0.1:6379\r\n"), 1),
        (command("CLUSTER", "SHARDS") + command("CLUSTER", "SLOTS")
         + command("CLUSTER", "NODES") + command("cluster", "replicas", cluster.ids[master])
         + command("CLUSTER", "INFO"), 5))
    mapper = _mapper(cluster)
    out = _frames(_same_whole_and_split(sent, received, mapper, master))
    before = _frames(received)
    n = len(hello) + 1
    assert out[:n] == before[:n]  # HELLO and SET untouched
    announced = {mapper(HOST, p) for p in cluster.ports}
    for i, cmd in enumerate(["shards", "slots", "nodes"]):
        old = parse_topology(before[n + i], cmd, HOST)  # type: ignore[arg-type]
        new = parse_topology(out[n + i], cmd, HOST)  # type: ignore[arg-type]
        assert _endpoints(new) == announced
        assert _shape(new) == _shape(old)
        assert out[n + i] != before[n + i]
    nodes_text = parse_one(out[n + 2]).bytes_value
    assert nodes_text is not None and HOST.encode() not in nodes_text
    replicas = parse_one(out[n + 3]).to_py()
    assert len(replicas) == 1 and ANNOUNCE.encode() in replicas[0]
    assert out[n + 4] == before[n + 4]  # CLUSTER INFO has no endpoint


def test_real_moved_is_rewritten_and_a_stored_moved_text_is_not(cluster: Cluster) -> None:
    master = cluster.masters()[0]
    foreign = next(k for k in (f"key{i}" for i in range(100)) if cluster.owner_port(k) != master)
    local = next(k for k in (f"key{i}" for i in range(100)) if cluster.owner_port(k) == master)
    text = f"-MOVED 3999 {HOST}:{master}\r\n".encode()
    sent, received = _record(master, (command("SET", local, text) + command("GET", local)
                                      + command("GET", foreign), 3))
    mapper = _mapper(cluster)
    out = _frames(_same_whole_and_split(sent, received, mapper, master))
    frames = _frames(received)
    assert out[1] == frames[1] == b"$%d\r\n%s\r\n" % (len(text), text)
    moved = parse_redirect(frames[2])
    assert moved is not None and moved.kind == "MOVED" and moved.host == HOST
    assert out[2] == b"-MOVED %d %s:%d\r\n" % (moved.slot, ANNOUNCE.encode(),
                                                mapper(HOST, moved.port)[1])  # type: ignore[index]


def test_real_ask_is_rewritten(cluster: Cluster) -> None:
    key = "ask-me"
    source = cluster.owner_port(key)
    target = next(p for p in cluster.masters() if p != source)
    slot = int(cluster.client(source).execute_command("CLUSTER", "KEYSLOT", key))
    src, dst = cluster.client(source), cluster.client(target)
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.ids[source])
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.ids[target])
    try:
        sent, received = _record(source, (command("GET", key), 1))
    finally:
        src.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
    assert received == b"-ASK %d %s:%d\r\n" % (slot, HOST.encode(), target)
    out = _same_whole_and_split(sent, received, _mapper(cluster), source)
    assert out == b"-ASK %d %s:%d\r\n" % (slot, ANNOUNCE.encode(),
                                          _mapper(cluster)(HOST, target)[1])  # type: ignore[index]


def test_real_empty_host_redirect_means_this_upstream(cluster: Cluster) -> None:
    """cluster-preferred-endpoint-type unknown-endpoint: -MOVED <slot> :<port>, NULL in SLOTS."""
    master = cluster.masters()[0]
    foreign = next(k for k in (f"key{i}" for i in range(100)) if cluster.owner_port(k) != master)
    with preferred_endpoint([master], "unknown-endpoint"):
        sent, received = _record(master, (command("GET", foreign), 1),
                                 (command("CLUSTER", "SLOTS"), 1), (command("HELLO", 3), 1),
                                 (command("CLUSTER", "SLOTS"), 1))
    frames = _frames(received)
    assert frames[0].startswith(b"-MOVED ") and b" :" in frames[0]
    assert b"$-1\r\n" in frames[1] and b"*4\r\n_\r\n" in frames[3]
    mapper = _mapper(cluster)
    out = _frames(_same_whole_and_split(sent, received, mapper, master))
    moved = parse_redirect(frames[0])
    assert moved is not None
    assert out[0] == b"-MOVED %d %s:%d\r\n" % (moved.slot, ANNOUNCE.encode(),
                                                mapper(HOST, moved.port)[1])  # type: ignore[index]
    for i in (1, 3):
        assert _endpoints(parse_topology(out[i], "slots", "unused")) == {
            mapper(HOST, p) for p in cluster.masters() + [
                n.port for n in cluster.topology().nodes if n.role == "replica"]}


def test_real_hostnames_are_rewritten_everywhere(cluster: Cluster) -> None:
    """cluster-announce-hostname set on every node, hostname as the preferred endpoint."""
    names = {p: f"node{i}.cache.internal" for i, p in enumerate(cluster.ports)}
    for p, name in names.items():
        cluster.client(p).config_set("cluster-announce-hostname", name)
    master = cluster.masters()[0]
    try:
        def gossiped() -> bool:
            text = cluster.client(master).execute_command("CLUSTER", "NODES")
            return all(f",{n}" in text for n in names.values())

        wait_until(gossiped, 15, 0.05, "every hostname gossiped to one node")
        cluster.client(master).config_set("cluster-preferred-endpoint-type", "hostname")
        foreign = next(k for k in (f"key{i}" for i in range(100))
                       if cluster.owner_port(k) != master)
        sent, received = _record(master, (command("GET", foreign), 1), (
            command("CLUSTER", "SHARDS") + command("CLUSTER", "SLOTS")
            + command("CLUSTER", "NODES"), 3))
    finally:
        cluster.client(master).config_set("cluster-preferred-endpoint-type", "ip")
        for p in cluster.ports:
            cluster.client(p).config_set("cluster-announce-hostname", "")
    frames = _frames(received)
    assert b".cache.internal:" in frames[0]  # MOVED names the hostname
    assert b"hostname" in frames[1] and b"cache.internal" in frames[2]
    mapper = _mapper(cluster, {names[p]: HOST for p in cluster.ports})
    whole = _same_whole_and_split(sent, received, mapper, master)
    assert b"cache.internal" not in whole and b"127.0.0.1" not in whole
    out = _frames(whole)
    assert out[0].startswith(b"-MOVED ") and ANNOUNCE.encode() in out[0]
    for i, cmd in enumerate(["shards", "slots", "nodes"], start=1):
        topo = parse_topology(out[i], cmd, HOST)  # type: ignore[arg-type]
        assert _endpoints(topo) == {mapper(HOST, p) for p in cluster.ports}
        assert {n.hostname for n in topo.nodes} == {ANNOUNCE}


def test_real_unmapped_nodes_are_reported(cluster: Cluster) -> None:
    master = cluster.masters()[0]
    known = _mapper(cluster)
    missing = cluster.masters()[1]
    seen: list[tuple[str, int]] = []
    sent, received = _record(master, (command("CLUSTER", "SLOTS"), 1))
    rw = ClusterRewriter(lambda h, p: None if p == missing else known(h, p), (HOST, master),
                         on_unmapped=lambda h, p: seen.append((h, p)))
    rw.feed_request(sent)
    topo = parse_topology(rw.feed_reply(received), "slots", HOST)
    assert (HOST, missing) in _endpoints(topo)  # left as it was
    assert seen == [(HOST, missing)] and rw.unmapped == {(HOST, missing)}
    assert rewrite_redirect(b"-MOVED 1 127.0.0.1:%d\r\n" % missing, rw.remap) is None
    assert rewrite_redirect(b"-ASK 1 127.0.0.1:%d\r\n" % missing, rw.remap,
                            tryagain=True) == (
        b"-TRYAGAIN cacheport has no port for that node yet, retry\r\n")


def test_real_cluster_reply_inside_multi_is_rewritten_in_exec(cluster: Cluster) -> None:
    master = cluster.masters()[0]
    sent, received = _record(master, (
        command("MULTI") + command("CLUSTER", "SLOTS") + command("PING")
        + command("CLUSTER", "NODES") + command("EXEC"), 5))
    out = _frames(_same_whole_and_split(sent, received, _mapper(cluster), master))
    assert out[:4] == [b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n"]
    results = parse_one(out[4]).items
    assert results[1].value == b"PONG"
    assert HOST.encode() not in out[4] and ANNOUNCE.encode() in out[4]
    assert len(parse_topology(b"*0\r\n", "slots", HOST).nodes) == 0
    assert len(results) == 3


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_real_sharded_pubsub_redirect_then_matching_stays_in_step(cluster: Cluster,
                                                                 resp3: bool) -> None:
    master = cluster.masters()[0]
    foreign = next(c for c in (f"ch{i}" for i in range(100)) if cluster.owner_port(c) != master)
    local = next(c for c in (f"ch{i}" for i in range(100)) if cluster.owner_port(c) == master)
    conn = RawConnection(master)
    if resp3:
        conn.call(command("HELLO", 3))
    conn.call(command("SSUBSCRIBE", foreign) + command("SSUBSCRIBE", local)
              + command("SUBSCRIBE", "plain"), 3)
    cluster.client(master).execute_command("SPUBLISH", local, "-MOVED 5 1.2.3.4:5")
    conn.read_frames(1)
    conn.call(command("SUNSUBSCRIBE") + command("UNSUBSCRIBE") + command("CLUSTER", "SLOTS"), 3)
    conn.close()
    sent, received = bytes(conn.sent), bytes(conn.received)
    out = _frames(_same_whole_and_split(sent, received, _mapper(cluster), master))
    frames = _frames(received)
    first = 1 if resp3 else 0
    assert frames[first].startswith(b"-MOVED ") and out[first].startswith(b"-MOVED ")
    assert ANNOUNCE.encode() in out[first]
    assert out[first + 3] == frames[first + 3]  # the published message is untouched
    assert _endpoints(parse_topology(out[-1], "slots", HOST)) == {
        _mapper(cluster)(HOST, p) for p in cluster.ports}


def test_real_blocking_command_and_large_value_pass_through(cluster: Cluster) -> None:
    master = cluster.masters()[0]
    key = next(k for k in (f"big{i}" for i in range(100)) if cluster.owner_port(k) == master)
    big = bytes(random.Random(3).randbytes(3 << 20))
    conn = RawConnection(master)
    conn.call(command("SET", key, big) + command("GET", key), 2)
    conn.send(command("BLPOP", "{" + key + "}l", 5) + command("CLUSTER", "SLOTS"))
    cluster.client(master).rpush("{" + key + "}l", "v")
    conn.read_frames(2)
    conn.close()
    sent, received = bytes(conn.sent), bytes(conn.received)
    rw = ClusterRewriter(_mapper(cluster), (HOST, master))
    rw.feed_request(sent)
    # The 3 MB reply is forwarded chunk by chunk, never held.
    head = len(b"+OK\r\n") + len(b"$%d\r\n" % len(big))
    chunks = splits(received, range(head, head + len(big), 65536))
    out = [rw.feed_reply(c) for c in chunks]
    assert all(o is c for o, c in zip(out[1:-1], chunks[1:-1], strict=True))
    assert b"".join(out[:-1]) == b"".join(chunks[:-1])
    assert ANNOUNCE.encode() in out[-1]


# --------------------------------------------------------------------------- blank endpoints


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A one-node cluster without cluster-announce-ip: it lists itself with an empty host."""
    node = start_lone_node(tmp_path_factory.mktemp("lone"))
    try:
        yield node
    finally:
        node.stop()


# cluster-preferred-endpoint-type -> the endpoint a node that does not know its own address
# gives in CLUSTER SLOTS (RESP2, RESP3) and CLUSTER SHARDS.
_BLANK = {"ip": (b"", b"", b""), "unknown-endpoint": (None, None, b""),
          "hostname": (b"?", b"?", b"?")}


def _record_lone(lone: ServerProcess, endpoint_type: str, resp3: bool) -> tuple[bytes, bytes]:
    with preferred_endpoint([lone.port], endpoint_type):
        hello = [(command("HELLO", 3), 1)] if resp3 else []
        return _record(lone.port, *hello, (
            command("CLUSTER", "SHARDS") + command("CLUSTER", "SLOTS")
            + command("CLUSTER", "NODES") + command("CLUSTER", "MYID"), 4))


@pytest.mark.parametrize("endpoint_type", list(_BLANK))
@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_real_blank_endpoints_are_mapped_by_node_id(lone: ServerProcess, endpoint_type: str,
                                                    resp3: bool) -> None:
    """A lone node without cluster-announce-ip: its SLOTS, SHARDS and NODES entries name no
    host, and must leave with the announced address and mapped port, never its own port."""
    sent, received = _record_lone(lone, endpoint_type, resp3)
    before = _frames(received)[1 if resp3 else 0:]
    node_id = (parse_one(before[3]).bytes_value or b"").decode()
    slots_blank, _, shards_blank = _BLANK[endpoint_type]
    # What the node really says: no host anywhere, only its own port and its id.
    (entry,) = parse_one(before[1]).items[0].items[2:]
    assert entry.items[0].value == slots_blank and entry.items[2].value == node_id.encode()
    assert (b"\r\n$%d\r\n%s\r\n" % (len(shards_blank), shards_blank)) in before[0]
    assert b"%s :%d@" % (node_id.encode(), lone.port) in before[2]
    ids = {node_id: (ANNOUNCE, 41000)}
    whole = _same_whole_and_split(sent, received, lambda h, p: None, lone.port, ids.get)
    out = _frames(whole)[1 if resp3 else 0:]
    for i, cmd in enumerate(["shards", "slots", "nodes"]):
        topo = parse_topology(out[i], cmd, "unused")  # type: ignore[arg-type]
        assert _endpoints(topo) == {(ANNOUNCE, 41000)}
        assert [n.node_id for n in topo.nodes] == [node_id]
        assert b"%d" % lone.port not in out[i]
    assert out[3] == before[3]  # CLUSTER MYID


@pytest.mark.parametrize("endpoint_type", list(_BLANK))
def test_real_blank_endpoint_without_an_id_map_is_the_node_this_connection_reached(
        lone: ServerProcess, endpoint_type: str) -> None:
    """A mapper that knows only the address cacheport dials: that is the node that lists
    itself without a host (a node learns every peer's address from the peer's connection)."""
    sent, received = _record_lone(lone, endpoint_type, resp3=False)
    table = {(HOST, lone.port): (ANNOUNCE, 41000)}
    out = _frames(_same_whole_and_split(sent, received, lambda h, p: table.get((h, p)),
                                        lone.port))
    for i, cmd in enumerate(["shards", "slots", "nodes"]):
        topo = parse_topology(out[i], cmd, "unused")  # type: ignore[arg-type]
        assert _endpoints(topo) == {(ANNOUNCE, 41000)}


def _slots_node(endpoint: bytes | None, port: int, node_id: bytes, ip: bytes = b"",
                resp3: bool = False) -> bytes:
    head = (b"_\r\n" if resp3 else b"$-1\r\n") if endpoint is None else (
        b"$%d\r\n%s\r\n" % (len(endpoint), endpoint))
    meta = (b"%1\r\n" if resp3 else b"*2\r\n") + b"$2\r\nip\r\n$%d\r\n%s\r\n" % (len(ip), ip)
    return b"*4\r\n%s:%d\r\n$%d\r\n%s\r\n%s" % (head, port, len(node_id), node_id, meta)


@pytest.mark.parametrize("endpoint", [b"", None, b"?"], ids=["empty", "null", "question"])
@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_blank_slots_entries_of_two_nodes_on_one_port_go_by_id(endpoint: bytes | None,
                                                               resp3: bool) -> None:
    """Two nodes on different hosts, both on 6379, neither with a host in the entry: only the
    id tells them apart (the port alone would send both clients to one node)."""
    reply = (b"*2\r\n*3\r\n:0\r\n:8191\r\n" + _slots_node(endpoint, 6379, b"aaa", resp3=resp3)
             + b"*3\r\n:8192\r\n:16383\r\n" + _slots_node(endpoint, 6379, b"bbb", resp3=resp3))
    ids = {"aaa": ("nat", 7001), "bbb": ("nat", 7002)}
    rw = ClusterRewriter(lambda h, p: ("nat", 7001) if (h, p) == ("10.0.0.5", 6379) else None,
                         ("10.0.0.5", 6379), by_id=ids.get)
    rw.feed_request(command("CLUSTER", "SLOTS"))
    topo = parse_topology(rw.feed_reply(reply), "slots", "unused")
    assert {(n.node_id, n.host, n.port) for n in topo.nodes} == {
        ("aaa", "nat", 7001), ("bbb", "nat", 7002)}
    assert not rw.unmapped


@pytest.mark.parametrize("endpoint", [b"", b"?"], ids=["empty", "question"])
@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_blank_shards_entry_maps_port_and_tls_port_by_id(endpoint: bytes, resp3: bool) -> None:
    pairs = [(b"id", b"$3\r\nccc\r\n"), (b"port", b":6379\r\n"), (b"tls-port", b":6380\r\n"),
             (b"ip", b"$0\r\n\r\n"),
             (b"endpoint", b"$%d\r\n%s\r\n" % (len(endpoint), endpoint)),
             (b"role", b"$6\r\nmaster\r\n"), (b"health", b"$6\r\nonline\r\n")]
    node = (b"%%%d\r\n" % len(pairs) if resp3 else b"*%d\r\n" % (2 * len(pairs))) + b"".join(
        b"$%d\r\n%s\r\n%s" % (len(k), k, v) for k, v in pairs)
    shard = (b"%2\r\n" if resp3 else b"*4\r\n") + (
        b"$5\r\nslots\r\n*2\r\n:0\r\n:16383\r\n$5\r\nnodes\r\n*1\r\n" + node)
    rw = ClusterRewriter(lambda h, p: None, ("10.0.0.5", 6379),
                         by_id={"ccc": ("nat", 7003)}.get)
    rw.feed_request(command("CLUSTER", "SHARDS"))
    (n,) = parse_topology(rw.feed_reply(b"*1\r\n" + shard), "shards", "unused").nodes
    assert (n.host, n.port, n.tls_port, n.ip) == ("nat", 7003, 7003, "nat")


def test_empty_ip_nodes_line_maps_by_the_id_column() -> None:
    remap = Remapper(lambda h, p: None, ("10.0.0.5", 6379), by_id={"07c3": ("nat", 7004)}.get)
    line = b"07c3 :6379@16379,,tls-port=6390 myself,master - 0 0 0 connected 0-16383"
    assert rewrite_node_line(line, remap) == (
        b"07c3 nat:7004@16379,,tls-port=7004 myself,master - 0 0 0 connected 0-16383")
    assert not remap.unmapped


def test_blank_entry_of_an_unknown_node_is_reported_and_left() -> None:
    """The id is not mapped yet (a node cacheport has not discovered): the refresh it asks for
    gives it a port; until then the entry stays as the node wrote it."""
    seen: list[tuple[str, int]] = []
    rw = ClusterRewriter(lambda h, p: None, ("10.0.0.5", 6379), by_id=lambda i: None,
                         on_unmapped=lambda h, p: seen.append((h, p)))
    rw.feed_request(command("CLUSTER", "SLOTS"))
    reply = b"*1\r\n*3\r\n:0\r\n:16383\r\n" + _slots_node(b"", 6379, b"ddd")
    assert rw.feed_reply(reply) == reply
    assert seen == [("10.0.0.5", 6379)]


# --------------------------------------------------------------------------- end to end


class RewritingProxy:
    """A test-only threaded proxy: one port per node, a ClusterRewriter per connection."""

    def __init__(self, cluster: Cluster) -> None:
        self.listeners: dict[int, socket.socket] = {}
        for port in cluster.ports:
            s = socket.socket()
            s.bind((HOST, 0))
            s.listen(64)
            self.listeners[port] = s
        self.map = {(HOST, up): (HOST, s.getsockname()[1]) for up, s in self.listeners.items()}
        self.unmapped: list[tuple[str, int]] = []
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self.closing = False
        for up, s in self.listeners.items():
            self._start(self._accept, s, up)

    def _start(self, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self.threads.append(t)
        t.start()

    def _accept(self, lsock: socket.socket, upstream: int) -> None:
        while True:
            try:
                client, _ = lsock.accept()
            except OSError:
                return
            server = socket.create_connection((HOST, upstream), timeout=10)
            self.sockets += [client, server]
            rw = ClusterRewriter(lambda h, p: self.map.get((h, p)), (HOST, upstream),
                                 on_unmapped=lambda h, p: self.unmapped.append((h, p)))
            lock = threading.Lock()
            self._start(self._pump, client, server, rw.feed_request, lock)
            self._start(self._pump, server, client, rw.feed_reply, lock)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket,
              fn: Callable[[bytes], bytes | bytearray], lock: threading.Lock) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with lock:
                    out = fn(data)
                dst.sendall(out)
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in [*self.listeners.values(), *self.sockets]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self.threads:
            t.join(5)
        assert not any(t.is_alive() for t in self.threads)


@pytest.mark.timeout(60)
def test_redis_py_cluster_client_works_through_rewriting_ports_only(cluster: Cluster) -> None:
    proxy = RewritingProxy(cluster)
    seed = proxy.map[(HOST, cluster.masters()[0])]
    rc = RedisCluster(startup_nodes=[PyClusterNode(*seed)], decode_responses=True,
                      socket_timeout=5)
    try:
        proxy_ports = {p for _, p in proxy.map.values()}
        assert {n.port for n in rc.get_nodes()} == proxy_ports
        for i in range(300):
            rc.set(f"k{i}", f"v{i}-MOVED 1 10.0.0.1:6379")
        assert all(rc.get(f"k{i}") == f"v{i}-MOVED 1 10.0.0.1:6379" for i in range(300))
        pipe = rc.pipeline()
        for i in range(100):
            pipe.incr(f"counter{i}")
        assert pipe.execute() == [1] * 100
        rc.mset_nonatomic({f"{{tag}}m{i}": str(i) for i in range(20)})
        assert rc.mget([f"{{tag}}m{i}" for i in range(20)]) == [str(i) for i in range(20)]
        # A client that lands on the wrong node follows a rewritten MOVED.
        direct = redis.Redis(host=HOST, port=seed[1], decode_responses=True, socket_timeout=5)
        foreign = next(k for k in (f"k{i}" for i in range(300))
                       if cluster.owner_port(k) != cluster.masters()[0])
        with pytest.raises(redis.exceptions.ResponseError, match=rf"^\d+ {HOST}:\d+$") as info:
            direct.get(foreign)
        assert int(str(info.value).rsplit(":", 1)[1]) in proxy_ports
        direct.close()
        assert {n.port for n in rc.get_nodes()} == proxy_ports
        assert not proxy.unmapped
    finally:
        rc.close()
        proxy.close()


# --------------------------------------------------------------------------- pure vectors


def test_cluster_nodes_lines_keep_bus_port_flags_and_aux_fields() -> None:
    remap = Remapper(lambda h, p: ("203.0.113.9", p + 100) if h == "10.0.0.5" else None,
                     ("10.0.0.5", 6379))
    line = (b"07c3 10.0.0.5:6379@16379,node-a.internal,tls-port=6390,shard-id=ab "
            b"myself,master - 0 0 1 connected 0-5460 [5461->-e7d1]")
    assert rewrite_node_line(line, remap) == (
        b"07c3 203.0.113.9:6479@16379,203.0.113.9,tls-port=6490,shard-id=ab "
        b"myself,master - 0 0 1 connected 0-5460 [5461->-e7d1]")
    noaddr = b"e7d1 :0@0 master,noaddr - 0 0 0 disconnected"
    assert rewrite_node_line(noaddr, remap) == noaddr
    ipv6 = Remapper(lambda h, p: ("nat", 7000) if h == "2001:db8::5" else None, ("x", 1))
    assert rewrite_node_line(b"a 2001:db8::5:6379@16379 master - 0 0 1 connected", ipv6) == (
        b"a nat:7000@16379 master - 0 0 1 connected")


def test_shards_with_tls_ports_map_each_port() -> None:
    reply = (b"*1\r\n%2\r\n$5\r\nslots\r\n*2\r\n:0\r\n:16383\r\n$5\r\nnodes\r\n*1\r\n%8\r\n"
             b"$2\r\nid\r\n$2\r\nn1\r\n$4\r\nport\r\n:6379\r\n$8\r\ntls-port\r\n:6380\r\n"
             b"$2\r\nip\r\n$8\r\n10.0.0.5\r\n$8\r\nendpoint\r\n$8\r\n10.0.0.5\r\n"
             b"$8\r\nhostname\r\n$6\r\nnode-a\r\n$4\r\nrole\r\n$6\r\nmaster\r\n"
             b"$6\r\nhealth\r\n$6\r\nonline\r\n")
    rw = ClusterRewriter(lambda h, p: ("nat", p + 1000) if h == "10.0.0.5" else None,
                         ("10.0.0.5", 6379))
    rw.feed_request(command("CLUSTER", "SHARDS"))
    topo = parse_topology(rw.feed_reply(reply), "shards", "x")
    (node,) = topo.nodes
    assert (node.host, node.port, node.tls_port, node.ip, node.hostname) == (
        "nat", 7379, 7380, "nat", "nat")
    assert node.slots == ((0, 16383),)


_redirect_targets = st.sampled_from([b"10.0.0.5:6379", b":6380", b"10.0.0.6:6379",
                                     b"node-a.internal:6379", b"[bad"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("get"), st.binary(max_size=40)),
    st.tuples(st.just("moved"), _redirect_targets),
    st.tuples(st.just("slots"), st.just(b"")),
    st.tuples(st.just("push"), st.binary(max_size=20)),
    st.tuples(st.just("attr"), st.binary(max_size=20)),
    st.tuples(st.just("big"), st.integers(1, 200_000).map(lambda n: b"m" * n)),
), min_size=1, max_size=12), st.lists(st.integers(0, 3000), max_size=10))
def test_rewriter_output_does_not_depend_on_how_replies_are_split(
        ops: list[tuple[str, bytes]], cut: list[int]) -> None:
    """Synthetic traffic: values that look like redirects stay, real redirects change."""
    table = {("10.0.0.5", 6379): ("nat", 7001), ("10.0.0.5", 6380): ("nat", 7002),
             ("node-a.internal", 6379): ("nat", 7001)}
    requests, replies, expected = bytearray(), bytearray(), bytearray()
    for kind, arg in ops:
        if kind == "get":
            requests += command("GET", "k")
            value = b"-MOVED 1 10.0.0.5:6379\r\n" + arg
            replies += b"$%d\r\n%s\r\n" % (len(value), value)
            expected += b"$%d\r\n%s\r\n" % (len(value), value)
        elif kind == "moved":
            requests += command("GET", "k")
            replies += b"-MOVED 12 %s\r\n" % arg
            host, _, port = arg.rpartition(b":")
            mapped = table.get((host.decode() or "10.0.0.5", int(port))) if port.isdigit() \
                else None
            expected += (b"-MOVED 12 %s:%d\r\n" % (mapped[0].encode(), mapped[1]) if mapped
                         else b"-MOVED 12 %s\r\n" % arg)
        elif kind == "push":  # RESP3 client-tracking invalidation: no command
            push = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$%d\r\n%s\r\n" % (len(arg), arg)
            replies += push
            expected += push
        elif kind == "attr":  # RESP3 attribute before the reply
            requests += command("GET", "k")
            reply = b"|1\r\n+key-popularity\r\n:1\r\n$%d\r\n%s\r\n" % (len(arg), arg)
            replies += reply
            expected += reply
        elif kind == "big":
            requests += command("GET", "big")
            reply = b"$%d\r\n%s\r\n" % (len(arg), arg)
            replies += reply
            expected += reply
        else:
            requests += command("CLUSTER", "SLOTS")
            replies += (b"*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$8\r\n10.0.0.5\r\n:6379\r\n"
                        b"$2\r\nn1\r\n")
            expected += b"*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$3\r\nnat\r\n:7001\r\n$2\r\nn1\r\n"
    rw = ClusterRewriter(lambda h, p: table.get((h, p)), ("10.0.0.5", 6379))
    rw.feed_request(bytes(requests))
    # bytes and bytearray chunks alike (a relay may hand either)
    out = b"".join(bytes(rw.feed_reply(bytearray(c) if i % 2 else c))
                   for i, c in enumerate(splits(bytes(replies), cut)))
    assert out == bytes(expected)
    assert Framer().feed(out)[-1][1] == len(out)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=20),
       st.lists(st.integers(0, 8000), max_size=10))
def test_traffic_with_nothing_to_rewrite_passes_byte_exact(values: list[bytes],
                                                           cut: list[int]) -> None:
    requests, replies = bytearray(), bytearray()
    for i, v in enumerate(values):
        requests += command("SET", f"k{i}", v) + command("GET", f"k{i}") + command("DEL", "x")
        replies += b"+OK\r\n$%d\r\n%s\r\n:0\r\n" % (len(v), v)
    rw = ClusterRewriter(lambda h, p: ("nat", 1), ("10.0.0.5", 6379))
    req_chunks = splits(bytes(requests), cut)
    assert all(rw.feed_request(c) is c for c in req_chunks)
    chunks = splits(bytes(replies), cut)
    out = [rw.feed_reply(c) for c in chunks]
    assert all(o is c for o, c in zip(out, chunks, strict=True))  # never copied
    assert not rw.conversation.pending


def test_a_client_sending_garbage_stops_matching_but_not_redirects() -> None:
    rw = ClusterRewriter(lambda h, p: ("nat", 7001), ("10.0.0.5", 6379))
    rw.feed_request(command("GET", "a") + b"*1\r\n:bad\r\n")
    assert rw.request_error is not None and "expected '$'" in rw.request_error
    out = rw.feed_reply(b"-MOVED 1 10.0.0.5:6379\r\n-ERR Protocol error: expected '$'\r\n")
    assert out == b"-MOVED 1 nat:7001\r\n-ERR Protocol error: expected '$'\r\n"


def test_monitor_passes_the_rest_untouched() -> None:
    rw = ClusterRewriter(lambda h, p: ("nat", 7001), ("10.0.0.5", 6379))
    rw.feed_request(command("MONITOR"))
    data = b'+OK\r\n+1700000000.1 [0 10.0.0.5:1] "get" "-MOVED 1 10.0.0.5:6379"\r\n'
    assert rw.feed_reply(data) is data and rw.opaque
