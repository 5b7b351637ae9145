"""The engine with a framed (Redis Cluster) connection, driven over socket pairs:

::

    test (client) <-TCP-> Engine [resp_framer] <-TCP-> test (node)

Redirects rewritten in the thread from the node map, node lists handed to Python
(asks/answer) while the rest of the chunk waits, a broken stream closed cleanly, and the
close rule of issue 33 on a framed connection. (The same paths through real clusters are
test_cluster_redis.py, test_cluster_redis_netns.py and test_last_reply.py with
``relay: native``.)
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.relay.engine import _engine, native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="the engine is not built here")


def cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on loopback (a reset is a reset, unlike a socketpair)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


class Pair:
    def __init__(self, engine: Any, nodemap: Any) -> None:
        self.client, c_engine = tcp_pair()
        self.node, n_engine = tcp_pair()
        for s in (self.client, self.node):
            s.settimeout(5)
        c_engine.setblocking(False)
        n_engine.setblocking(False)
        self.engine = engine
        self.slot = engine.add(c_engine.detach(), n_engine.detach(), 2, 65536, 65536, nodemap)

    def read(self, sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.client.close()
        self.node.close()


LINGER_RST = struct.pack("ii", 1, 0)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


@pytest.fixture
def engine() -> Iterator[Any]:
    e = _engine.Engine()
    yield e
    e.stop()


@pytest.fixture
def nodemap() -> Any:
    nm = _engine.NodeMap()
    nm.swap([(b"10.0.0.2", 6379, b"nat.example:7002")])
    return nm


@pytest.mark.parametrize(("relay", "tls", "want"), [
    ("auto", False, ("engine", "buffered")), ("native", False, ("engine", "buffered")),
    ("python", False, ("buffered",)), ("auto", True, ("buffered",))])
def test_cluster_listeners_are_framed_in_the_engine_unless_relay_python(
        relay: str, tls: bool, want: tuple[str, ...]) -> None:
    """The default (auto) is the engine since Redis's suite passes through it
    (bench/conformance.py native-cluster); python stays selectable; TLS stays Python's."""
    from proxy.relay.choose import relay_order
    from tests.support import make_config

    listener: dict[str, Any] = {"name": "n", "listen": "127.0.0.1:1",
                                "upstream": "127.0.0.1:2", "relay": relay}
    if tls:
        listener["upstream_tls"] = True
    (lc,) = make_config([listener]).listeners
    assert [k.value for k in relay_order(lc, rewriting=True, framed=True)] == list(want)
    assert [k.value for k in relay_order(lc, rewriting=True, framed=False)] == ["buffered"]


def asks(engine: Any, want: int = 1, timeout: float = 5) -> list[tuple[Any, ...]]:
    got: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        assert time.monotonic() < deadline, f"asks: {got}"
        select.select([engine.notify_fd], [], [], 0.05)
        got += engine.asks()
    return got


def test_a_redirect_is_rewritten_in_the_engine_and_counted(engine: Any, nodemap: Any) -> None:
    p = Pair(engine, nodemap)
    sent = cmd(b"GET", b"k") + cmd(b"GET", b"v")
    p.client.sendall(sent)
    assert p.read(p.node, len(sent)) == sent
    value = b"$22\r\n-MOVED 1 10.0.0.2:6379\r\n"  # a stored value: untouched
    p.node.sendall(b"-MOVED 3999 10.0.0.2:6379\r\n" + value)
    want = b"-MOVED 3999 nat.example:7002\r\n" + value
    assert p.read(p.client, len(want)) == want
    assert asks(engine) == [(p.slot, 0, 1, None)]  # one redirect, told to Python
    p.close()


def test_a_node_list_waits_for_python_and_what_follows_keeps_its_order(
        engine: Any, nodemap: Any) -> None:
    p = Pair(engine, nodemap)
    sent = cmd(b"CLUSTER", b"NODES") + cmd(b"GET", b"k")
    p.client.sendall(sent)
    p.read(p.node, len(sent))
    nodes = b"$10\r\nabc 1:2@3\n\r\n"
    p.node.sendall(nodes + b"$3\r\nbar\r\n")
    [(slot, kind, frame, spec)] = asks(engine)
    assert (slot, kind, frame, spec) == (p.slot, 1, nodes, b"\x03")
    p.client.setblocking(False)
    with pytest.raises(BlockingIOError):
        p.client.recv(100)  # nothing passes the frame Python holds
    p.client.setblocking(True)
    assert engine.answer(slot, b"$9\r\nrewritten\r\n")
    assert p.read(p.client, 24) == b"$9\r\nrewritten\r\n$3\r\nbar\r\n"
    p.close()


def test_a_node_that_breaks_the_protocol_is_closed_and_counted(engine: Any,
                                                                nodemap: Any) -> None:
    p = Pair(engine, nodemap)
    p.client.sendall(cmd(b"GET", b"k"))
    p.read(p.node, len(cmd(b"GET", b"k")))
    # 8 MB of garbage: a line longer than 1 MiB. What came first is passed on as it
    # arrives (as the Python relay does), then both sides are reset.
    sender = threading.Thread(target=_send_quietly, args=(p.node, b"+" + b"x" * (8 << 20)))
    sender.start()
    received = 0
    with pytest.raises(ConnectionResetError):
        while chunk := p.client.recv(1 << 16):
            received += len(chunk)
    sender.join(10)
    assert received <= (1 << 20) + (1 << 16)
    assert (p.slot, 4, None, None) in asks(engine)
    assert engine.stats()["protocol_errors"] == 1
    assert [r[0] for r in engine.reap()] == [p.slot]
    q = Pair(engine, nodemap)  # the thread still serves
    q.client.sendall(cmd(b"PING"))
    q.read(q.node, len(cmd(b"PING")))
    q.node.sendall(b"+PONG\r\n")
    assert q.read(q.client, 7) == b"+PONG\r\n"
    p.close()
    q.close()


def test_a_client_gone_while_python_rewrites_leaves_nothing_behind(engine: Any,
                                                                   nodemap: Any) -> None:
    p = Pair(engine, nodemap)
    p.client.sendall(cmd(b"CLUSTER", b"SLOTS"))
    p.read(p.node, len(cmd(b"CLUSTER", b"SLOTS")))
    p.node.sendall(b"*0\r\n")
    [(slot, kind, _frame, _spec)] = asks(engine)
    assert kind == 1
    p.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    p.client.close()  # a reset: the way down has nowhere to go
    deadline = time.monotonic() + 5
    while not engine.reap():
        assert time.monotonic() < deadline
        select.select([engine.notify_fd], [], [], 0.05)
    assert engine.answer(slot, b"*0\r\n") is False  # ended meanwhile: dropped
    assert engine.stats()["live"] == 0
    p.node.close()


def test_the_nodes_last_reply_is_delivered_before_its_reset(engine: Any, nodemap: Any) -> None:
    """Issue 33 on a framed connection: the reply already sent comes before the reset."""
    p = Pair(engine, nodemap)
    p.client.sendall(cmd(b"GET", b"k"))
    p.read(p.node, len(cmd(b"GET", b"k")))
    p.node.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    p.node.sendall(b"-MOVED 1 10.0.0.2:6379\r\n")
    p.node.close()
    data = b""
    try:
        while chunk := p.client.recv(100):
            data += chunk
    except ConnectionResetError:
        pass
    assert data == b"-MOVED 1 nat.example:7002\r\n"
    p.client.close()


def test_a_client_half_close_still_gets_the_rewritten_reply_then_eof(
        engine: Any, nodemap: Any) -> None:
    p = Pair(engine, nodemap)
    sent = cmd(b"CLUSTER", b"SLOTS")
    p.client.sendall(sent)
    p.client.shutdown(socket.SHUT_WR)
    assert p.read(p.node, len(sent) + 1) == sent  # then the node sees the EOF
    p.node.sendall(b"*0\r\n")
    [(slot, _kind, _frame, _spec)] = asks(engine)
    assert engine.answer(slot, b"*1\r\n*0\r\n")
    p.node.close()
    assert p.read(p.client, 100) == b"*1\r\n*0\r\n"
    p.client.close()


def test_an_idle_framed_connection_holds_no_framing_state(engine: Any, nodemap: Any) -> None:
    """Memory: between requests a framed connection parks its state, as cheap as a plain
    one; it keeps it while its conversation is not a fresh one's (here: RESP3)."""
    p = Pair(engine, nodemap)
    assert engine.detail(p.slot)["framed"] == 1
    for request, reply in ((cmd(b"PING"), b"+PONG\r\n"), (cmd(b"HELLO", b"3"), b"%0\r\n")):
        p.client.sendall(request)
        p.read(p.node, len(request))
        deadline = time.monotonic() + 5
        while not engine.detail(p.slot)["framing_held"]:  # a reply is due
            assert time.monotonic() < deadline
            time.sleep(0.01)
        p.node.sendall(reply)
        assert p.read(p.client, len(reply)) == reply
    assert engine.detail(p.slot)["framing_held"] == 1  # RESP3 now: kept
    p.client.sendall(cmd(b"HELLO", b"2"))
    p.read(p.node, len(cmd(b"HELLO", b"2")))
    p.node.sendall(b"*0\r\n")
    assert p.read(p.client, 4) == b"*0\r\n"
    deadline = time.monotonic() + 5
    while engine.detail(p.slot)["framing_held"]:  # a fresh conversation again: parked
        assert time.monotonic() < deadline
        time.sleep(0.01)
    p.close()


def test_a_memcached_connection_hands_python_only_the_auto_discovery_unit(
        engine: Any) -> None:
    """NodeMap(memcache=True): values (one holding a lookalike) pass in the thread, the
    ``CONFIG cluster`` unit waits for Python while the rest of the chunk keeps its place,
    a value line without a length closes both sides, and between requests the connection
    holds no framing state."""
    p = Pair(engine, _engine.NodeMap(memcache=True))
    fake = b"CONFIG cluster 0 4\r\n1\nx\n\r\nEND\r\n"
    value = b"VALUE k 0 %d\r\n%s\r\nEND\r\n" % (len(fake), fake)
    p.client.sendall(b"get k\r\n")
    p.read(p.node, 7)
    p.node.sendall(value)
    assert p.read(p.client, len(value)) == value
    deadline = time.monotonic() + 5
    while engine.detail(p.slot)["framing_held"]:  # between requests: parked
        assert time.monotonic() < deadline
        time.sleep(0.01)
    p.client.sendall(b"config get cluster\r\nget k\r\n")
    p.read(p.node, 27)
    unit = b"CONFIG cluster 0 30\r\n3\nn1|10.0.0.1|11211 n2||11211\n\r\n"
    p.node.sendall(unit + b"END\r\n" + value)
    [(slot, kind, frame, spec)] = asks(engine)
    assert (slot, kind, frame, spec) == (p.slot, 5, unit, b"")
    assert engine.answer(slot, b"CONFIG cluster 0 7\r\n3\nnew\n\r\n")
    want = b"CONFIG cluster 0 7\r\n3\nnew\n\r\nEND\r\n" + value
    assert p.read(p.client, len(want)) == want
    p.client.sendall(b"get k\r\n")
    p.read(p.node, 7)
    p.node.sendall(b"VALUE k 0 five\r\n")
    assert asks(engine) == [(p.slot, 4, None, None)]  # broken: told, and closed
    p.client.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert p.client.recv(100) == b""
    assert engine.stats()["protocol_errors"] == 1
    p.close()


@pytest.mark.parametrize("framed", ["plain", "memcache"])
def test_a_slow_client_gets_every_byte_in_order_through_short_sends(
        engine: Any, framed: str) -> None:
    """A copying connection whose client reads slowly: what a short send left behind goes
    out from where the send stopped (the engine once resent it from its start)."""
    import os

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(server.getsockname())
        c_engine, _ = server.accept()
    node, n_engine = tcp_pair()
    c_engine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    c_engine.setblocking(False)
    n_engine.setblocking(False)
    nodemap = _engine.NodeMap(memcache=True) if framed == "memcache" else None
    engine.add(c_engine.detach(), n_engine.detach(), 2, 65536, 65536, nodemap)
    value = os.urandom(2 << 20)
    data = b"VALUE k 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)
    client.sendall(b"get k\r\n")
    node.settimeout(5)
    assert node.recv(16) == b"get k\r\n"
    sender = threading.Thread(target=lambda: (node.sendall(data), node.shutdown(socket.SHUT_WR)))
    sender.start()
    got = bytearray()
    client.settimeout(10)
    while chunk := client.recv(3000):
        got += chunk
        time.sleep(0.0002)
    sender.join(10)
    assert len(got) == len(data) and got == data
    client.close()
    node.close()


def _through_engine(engine: Any, ops: list[tuple[str, bytes]]) -> tuple[bytes, bool]:
    """A conversation through a framed engine connection: what the client receives, and
    whether the connection was reset (a broken stream)."""
    from proxy.protocols.redis_cluster import ClusterRewriter, rewrite_asked
    from tests.framer_diff import IDS, MAP, UPSTREAM, node_map

    rw = ClusterRewriter(lambda h, p: MAP.get((h, p)), UPSTREAM, unmapped_redirect="tryagain",
                         by_id=IDS.get)
    p = Pair(engine, node_map())
    p.client.setblocking(False)
    got = b""
    reset = False

    def pump(until: float) -> None:
        nonlocal got, reset
        while time.monotonic() < until and not reset:
            for slot, kind, frame, spec in engine.asks():
                if kind in (1, 2, 3):
                    new = rewrite_asked(frame, kind, spec, rw.remap, tryagain=True)
                    engine.answer(slot, frame if new is None else new)
            try:
                chunk = p.client.recv(1 << 16)
            except BlockingIOError:
                select.select([p.client, engine.notify_fd], [], [], 0.01)
                continue
            except ConnectionResetError:
                reset = True
                return
            if not chunk:
                return
            got += chunk

    for kind, data in ops:
        if kind == "req":
            p.client.sendall(data)
            assert p.read(p.node, len(data)) == data  # noted by the framer, then passed on
        else:
            try:
                p.node.sendall(data)
            except OSError:
                reset = True
            pump(time.monotonic() + 0.02)
    p.node.shutdown(socket.SHUT_WR)
    pump(time.monotonic() + 2)
    engine.reap()
    p.close()
    return got, reset


def test_conversations_through_the_engine_come_out_as_from_the_python_rewriter(
        engine: Any) -> None:
    """The framer's decisions carried out by the engine -- forwarding, sends cut short,
    frames handed to Python and answered while the rest waits -- give the client what
    the Python rewriter would, on coherent conversations cut at random points."""
    from hypothesis import HealthCheck, given, settings

    from tests.framer_diff import python_run
    from tests.test_framer_fuzz import coherent

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(coherent())
    def check(ops: list[tuple[str, bytes]]) -> None:
        want, err = python_run(ops)
        got, reset = _through_engine(engine, ops)
        if err is None:
            assert not reset and got == b"".join(want)
        else:
            assert reset and b"".join(want).startswith(got[:len(b"".join(want))])

    check()


@pytest.mark.timeout(120)
def test_the_framed_engine_under_address_sanitizer() -> None:
    """This file's socket tests against an ASan+UBSan build of the whole engine
    (scripts/asan.sh); skipped where gcc has no sanitizer runtime."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc})")
    lib = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True)
    if not os.path.isabs(lib.stdout.strip()):
        pytest.skip("gcc's AddressSanitizer runtime (libasan) is not installed")
    r = subprocess.run([str(root / "scripts" / "asan.sh"), "tests/test_native_cluster.py",
                        "-k", "not sanitizer and not conversations"],
                       capture_output=True, text=True, timeout=110,
                       env={**os.environ, "CACHEPORT_VENV": sys.prefix})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert " passed" in r.stdout
