"""The soak's clients, each a thread bounded in count and time, all through cacheport.

Every failure is recorded in ``Errors`` with its time, then the client reconnects and
carries on; every acknowledged write goes into the ``Ledger``.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from pymemcache.client.base import Client as Memcache
from redis.backoff import NoBackoff
from redis.retry import Retry

from .ledger import Errors, Ledger
from .rig import HOST, Rig

SIZES = (8, 100, 1_000, 10_000, 100_000, 1_000_000)
WEIGHTS = (40, 30, 15, 10, 4, 1)
MC_SIZES = (8, 100, 1_000, 10_000, 100_000)
MAX_OPS = 2_000_000  # per client: bounded in count as well as by the run's deadline


def no_retry() -> Retry:
    """redis-py retries by default; the soak counts every error the application would see."""
    return Retry(NoBackoff(), 0)


def value_of(rng: random.Random, sizes: tuple[int, ...] = SIZES,
             weights: tuple[int, ...] = WEIGHTS) -> bytes:
    size = rng.choices(sizes, weights[:len(sizes)])[0]
    return rng.randbytes(min(size, 64)) * (size // 64 + 1)


@dataclass
class Load:
    rig: Rig
    ledger: Ledger
    errors: Errors
    seed: int
    deadline: float
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    published: int = 0
    received: int = 0

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def spawn(self, name: str, fn: Callable[[str, random.Random], None]) -> None:
        rng = random.Random(f"{self.seed}:{name}")
        t = threading.Thread(target=self._guard, args=(fn, name, rng), name=name, daemon=True)
        self.threads.append(t)
        t.start()

    def _guard(self, fn: Callable[[str, random.Random], None], name: str,
               rng: random.Random) -> None:
        try:
            fn(name, rng)
        except Exception as exc:  # a client bug must show, not end the thread quietly
            self.errors.add(name, f"client crashed: {type(exc).__name__}: {exc}")

    def start(self, scale: int = 1) -> None:
        for i in range(2 * scale):
            self.spawn(f"kv{i}", self.kv)
        self.spawn("pipeline0", self.pipeline)
        for i in range(scale):
            self.spawn(f"cluster{i}", self.cluster)
        for i in range(2 * scale):
            self.spawn(f"mc{i}", self.memcached)
        self.spawn("spare0", self.spare)
        self.spawn("sub0", self.subscriber)
        self.spawn("pub0", self.publisher)
        self.spawn("idle0", self.idle)
        self.spawn("slow0", self.slow_reader)

    def finish(self, timeout: float = 30) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)

    # -- redis ---------------------------------------------------------------------------

    def _redis(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.rig.listen["rd"], socket_timeout=3,
                           socket_connect_timeout=3, retry=no_retry())

    def kv(self, name: str, rng: random.Random) -> None:
        r = self._redis()
        for n in range(MAX_OPS):
            if not self.running():
                break
            key = f"kv:{name}:{rng.randrange(50)}"
            value = value_of(rng) + b"%d" % n
            try:
                if rng.random() < 0.6:
                    r.set(key, value)
                    self.ledger.acked_write("redis", key, value)
                else:
                    r.get(key)
                    value = b""
                self.errors.count("redis")
            except redis.RedisError as exc:
                if value:
                    self.ledger.failed_write("redis", key, value)
                self.errors.add(name, exc)
                r.close()
                r = self._redis()
                time.sleep(0.05)
            time.sleep(0.004)
        r.close()

    def pipeline(self, name: str, rng: random.Random) -> None:
        r = self._redis()
        for n in range(MAX_OPS):
            if not self.running():
                break
            batch = [(f"pl:{name}:{rng.randrange(200)}", b"p%d-%d" % (n, i) * rng.randrange(1, 50))
                     for i in range(20)]
            try:
                pipe = r.pipeline(transaction=False)
                for key, value in batch:
                    pipe.set(key, value)
                pipe.execute()
                for key, value in batch:
                    self.ledger.acked_write("redis", key, value)
                self.errors.count("redis", len(batch))
            except redis.RedisError as exc:
                for key, value in batch:
                    self.ledger.failed_write("redis", key, value)
                self.errors.add(name, exc)
                r.close()
                r = self._redis()
                time.sleep(0.05)
            time.sleep(0.01)
        r.close()

    def subscriber(self, name: str, rng: random.Random) -> None:
        while self.running():
            r = self._redis()
            ps = r.pubsub()
            try:
                ps.subscribe("soak")
                while self.running():
                    msg = ps.get_message(timeout=1.0)
                    if msg and msg["type"] == "message":
                        self.received += 1
            except redis.RedisError as exc:
                self.errors.add(name, exc)
                time.sleep(0.1)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    ps.close()
                r.close()

    def publisher(self, name: str, rng: random.Random) -> None:
        r = self._redis()
        for n in range(MAX_OPS):
            if not self.running():
                break
            try:
                r.publish("soak", b"m%d" % n)
                self.published += 1
                self.errors.count("pubsub")
            except redis.RedisError as exc:
                self.errors.add(name, exc)
                r.close()
                r = self._redis()
            time.sleep(0.05)
        r.close()

    def cluster(self, name: str, rng: random.Random) -> None:
        def connect() -> redis.RedisCluster:
            return redis.RedisCluster(host=HOST, port=self.rig.seed_port, socket_timeout=3,
                                      socket_connect_timeout=3)

        rc: redis.RedisCluster | None = None
        for n in range(MAX_OPS):
            if not self.running():
                break
            key = f"cl:{name}:{rng.randrange(300)}"
            value = value_of(rng, SIZES[:4]) + b"%d" % n
            try:
                if rc is None:
                    rc = connect()
                if rng.random() < 0.6:
                    rc.set(key, value)
                    self.ledger.acked_write("cluster", key, value)
                else:
                    rc.get(key)
                    value = b""
                self.errors.count("cluster")
            except (redis.RedisError, IndexError, KeyError) as exc:
                if value:
                    self.ledger.failed_write("cluster", key, value)
                self.errors.add(name, exc)
                time.sleep(0.1)
            time.sleep(0.004)
        if rc is not None:
            rc.close()

    # -- memcached -----------------------------------------------------------------------

    def _mc_ops(self, name: str, rng: random.Random, port: int, timeout: float,
                per_connection: int, store_prefix: str) -> None:
        client: Memcache | None = None
        for n in range(MAX_OPS):
            if not self.running():
                break
            key = f"{store_prefix}:{name}:{rng.randrange(100)}"
            value = value_of(rng, MC_SIZES) + b"%d" % n
            try:
                if client is None:
                    client = Memcache((HOST, port), connect_timeout=timeout, timeout=timeout)
                if rng.random() < 0.6:
                    if not client.set(key, value, noreply=False):
                        raise ConnectionError("set not stored")
                    self.ledger.acked_write("memcached", key, value)
                else:
                    client.get(key)
                    value = b""
                self.errors.count("memcached")
                if n % per_connection == per_connection - 1:
                    client.close()
                    client = None
            except (OSError, Exception) as exc:  # pymemcache raises its own and socket errors
                if value:
                    self.ledger.failed_write("memcached", key, value)
                self.errors.add(name, exc)
                if client is not None:
                    client.close()
                client = None
                time.sleep(0.05)
            time.sleep(0.004)
        if client is not None:
            client.close()

    def memcached(self, name: str, rng: random.Random) -> None:
        self._mc_ops(name, rng, self.rig.listen["mc"], 3.0, 10_000, "mc")

    def spare(self, name: str, rng: random.Random) -> None:
        """Through the listener the black-hole fault retargets: short timeouts and a new
        connection every few requests, so the retarget shows and then heals."""
        self._mc_ops(name, rng, self.rig.listen["spare"], 1.0, 5, "sp")

    # -- idle and slow -------------------------------------------------------------------

    def idle(self, name: str, rng: random.Random, count: int = 40) -> None:
        """Connections held open throughout (half on rd, half on mc), each checked every
        few seconds with one request; a dead one is an error, then replaced."""
        probes = {"rd": (b"PING\r\n", b"+PONG\r\n"), "mc": (b"version\r\n", b"VERSION ")}
        held: list[tuple[str, socket.socket | None]] = [("rd" if i % 2 else "mc", None)
                                                        for i in range(count)]
        while self.running():
            for i, (listener, sock) in enumerate(held):
                ask, want = probes[listener]
                try:
                    if sock is None:
                        sock = socket.create_connection((HOST, self.rig.listen[listener]), 3)
                        sock.settimeout(3)
                    sock.sendall(ask)
                    if not sock.recv(64).startswith(want):
                        raise ConnectionError("idle connection closed or bad reply")
                    self.errors.count("idle")
                except OSError as exc:
                    self.errors.add(name, exc)
                    if sock is not None:
                        sock.close()
                    sock = None
                held[i] = (listener, sock)
            self.stop.wait(2.0)
        for _, sock in held:
            if sock is not None:
                sock.close()

    def slow_reader(self, name: str, rng: random.Random) -> None:
        """GET a 1 MB value and read it 4 kB at a time with pauses: the proxy must hold
        back, not buffer without bound or drop bytes."""
        key = f"big:{name}"
        value = rng.randbytes(1 << 20)
        r = self._redis()
        try:
            r.set(key, value)
            self.ledger.acked_write("redis", key, value)
        except redis.RedisError as exc:
            self.errors.add(name, exc)
        finally:
            r.close()
        want = b"$%d\r\n%s\r\n" % (len(value), value)
        while self.running():
            try:
                with socket.create_connection((HOST, self.rig.listen["rd"]), 5) as s:
                    s.settimeout(5)
                    s.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key.encode()))
                    got = bytearray()
                    while len(got) < len(want):
                        chunk = s.recv(4096)
                        if not chunk:
                            raise ConnectionError("closed mid-reply")
                        got += chunk
                        time.sleep(0.001)
                    if bytes(got) != want:
                        raise ConnectionError(f"slow read: {len(got)} bytes, not the value")
                    self.errors.count("slow")
            except OSError as exc:
                self.errors.add(name, exc)
            self.stop.wait(0.5)
