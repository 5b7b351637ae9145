"""Helpers for the cluster tests (no tests here): free port ranges, an ElastiCache-style
configuration endpoint, a lone Redis Cluster node, async waits with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis

from tests.support import (
    ServerProcess,
    free_port,
    require_binary,
    start_server,
    wait_until,
)
from tests.support import (
    free_range as free_range,  # the cluster tests' port ranges, kept importable from here
)

HOST = "127.0.0.1"


async def async_wait(predicate: Callable[[], Awaitable[Any] | Any], deadline_s: float,
                     message: str = "condition", interval: float = 0.05) -> Any:
    """``wait_until`` for coroutines: poll until truthy, fail with ``message`` at the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {message}")
        await asyncio.sleep(interval)


def redis_cluster_entry(seed: str, nodes: int, **extra: Any) -> dict[str, Any]:
    """A ``clusters:`` entry named ``rc`` for a Redis Cluster seeded at ``seed``: a free
    seed port and ``nodes`` node ports on loopback, no refresh unless asked."""
    base = free_range(nodes + 1)
    return {"name": "rc", "engine": "redis-cluster", "seed": seed, "announce": "127.0.0.1",
            "listen": "127.0.0.1", "ports": f"{base + 1}-{base + nodes}", "seed_port": base,
            "refresh": "1h", **extra}


def start_cluster_node(workdir: Path) -> ServerProcess:
    """One redis-server with cluster mode on, not yet part of any cluster."""
    return start_server("redis", [
        "--cluster-enabled", "yes", "--dir", str(workdir),
        "--cluster-config-file", f"nodes-{uuid.uuid4().hex}.conf",
        "--cluster-port", str(free_port()), "--cluster-node-timeout", "2000"])


@contextlib.contextmanager
def three_masters(workdir: Path) -> Iterator[list[ServerProcess]]:
    """A real 3-master Redis Cluster on loopback, every node seeing all three; stopped after."""
    nodes: list[ServerProcess] = []
    try:
        for _ in range(3):
            nodes.append(start_cluster_node(workdir))
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


def start_lone_node(workdir: Path) -> ServerProcess:
    """A one-node Redis Cluster holding every slot, with no ``cluster-announce-ip``.

    No peer ever told it its address, so it lists itself with an empty endpoint
    (``["", port, id]`` in CLUSTER SLOTS, ``:port@cport`` in CLUSTER NODES).
    """
    node = start_server("redis", [
        "--cluster-enabled", "yes", "--dir", str(workdir),
        "--cluster-config-file", f"nodes-{uuid.uuid4().hex}.conf",
        "--cluster-port", str(free_port())])
    try:
        with redis.Redis(port=node.port, socket_timeout=5, decode_responses=True) as r:
            r.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            wait_until(lambda: r.cluster("info").get("cluster_state") == "ok", 15, 0.05,
                       "cluster_state:ok on the lone node")
    except BaseException:
        node.stop()
        raise
    return node


@contextlib.contextmanager
def preferred_endpoint(ports: Sequence[int], endpoint_type: str) -> Iterator[list[redis.Redis]]:
    """cluster-preferred-endpoint-type set on these nodes for the block, and "ip" (the
    default the other tests expect) again after it; yields a client of each node."""
    admins = [redis.Redis(host=HOST, port=port, socket_timeout=5) for port in ports]
    try:
        for admin in admins:
            admin.config_set("cluster-preferred-endpoint-type", endpoint_type)
        yield admins
    finally:
        for admin in admins:
            admin.config_set("cluster-preferred-endpoint-type", "ip")
            admin.close()


def ad_reply(version: int, nodes: list[tuple[str, str, int]], form: str = "config") -> bytes:
    """The exact ElastiCache reply: version line ends LF, node line LF, then CRLF, END."""
    block = b"%d\n%s\n" % (version, b" ".join(f"{h}|{ip}|{p}".encode() for h, ip, p in nodes))
    head = b"CONFIG cluster" if form == "config" else b"VALUE AmazonElastiCache:cluster"
    return b"%s 0 %d\r\n%s\r\nEND\r\n" % (head, len(block), block)


class ConfigEndpoint:
    """A test ElastiCache configuration endpoint in front of a real memcached.

    Answers ``config get cluster`` (or, as an engine older than 1.4.14, ``ERROR`` to it and
    the cluster under ``get AmazonElastiCache:cluster``) from its node list; every other
    command goes to the real memcached, as on ElastiCache, where the configuration
    endpoint is one of the nodes.
    """

    def __init__(self, backend: int, nodes: list[tuple[str, str, int]],
                 old_engine: bool = False) -> None:
        self.backend = backend
        self.nodes = list(nodes)
        self.version = 1
        self.old_engine = old_engine
        self.queries = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._spawn(self._accept)

    def set_nodes(self, nodes: list[tuple[str, str, int]]) -> None:
        """A node list change: ElastiCache bumps the config version."""
        with self._lock:
            self.nodes = list(nodes)
            self.version += 1

    def _spawn(self, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            self._spawn(self._serve, conn)

    def _answer(self, line: bytes) -> bytes | None:
        with self._lock:
            if line == b"config get cluster":
                self.queries += 1
                return b"ERROR\r\n" if self.old_engine else ad_reply(self.version, self.nodes)
            if line == b"get AmazonElastiCache:cluster" and self.old_engine:
                self.queries += 1
                return ad_reply(self.version, self.nodes, "get")
        return None

    def _serve(self, conn: socket.socket) -> None:
        backend: socket.socket | None = None
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                nl = data.find(b"\r\n")
                answer = self._answer(data[:nl]) if nl >= 0 else None
                if answer is not None:
                    conn.sendall(answer)
                    data = data[nl + 2:]
                    if not data:
                        continue
                if backend is None:
                    backend = socket.create_connection(("127.0.0.1", self.backend), timeout=10)
                    self._conns.append(backend)
                    self._spawn(self._pump, backend, conn)
                backend.sendall(data)
        conn.close()
        if backend is not None:
            with contextlib.suppress(OSError):
                backend.shutdown(socket.SHUT_WR)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    def close(self) -> None:
        self._closed = True
        for s in [self._sock, *self._conns]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(5)
