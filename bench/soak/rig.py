"""The processes of a soak: Redis primary and replica behind a DNS name, memcached, a
3-master Redis Cluster (and a 4th node on demand), a black hole, and cacheport itself
(``workers: 2``, a lowered RLIMIT_NOFILE, its own /etc/hosts), all on loopback and
all stopped by PID through one ``Reaper``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ..procs import BenchError, Proc, Reaper, wait_port
from ..sidebyside import bindable

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
NAME = "primary.soak.test"  # the Redis upstream's DNS name, from cacheport's own hosts file
REDIS_IPS = ("127.0.0.2", "127.0.0.3")
FAST = ["--repl-diskless-sync-delay", "0", "--shutdown-timeout", "0", "--save", "",
        "--appendonly", "no", "--loglevel", "warning"]


class Ports:
    """Free loopback ports below the ephemeral range, never the same one twice in a run.

    Below it, because some are bound late (the listener a reload adds, a restarted
    memcached): an ephemeral port may meanwhile be the local end of one of the many
    client connections, and the bind would fail with EADDRINUSE.
    """

    def __init__(self) -> None:
        self.used: set[int] = set()
        self.next = 21000 + os.getpid() % 5000

    def one(self, *hosts: str) -> int:
        return self.span(1, *hosts)

    def span(self, count: int, *hosts: str) -> int:
        while self.next + count < 32700:
            base = self.next
            self.next += count
            if bindable(range(base, base + count), hosts or (HOST,)):
                self.used.update(range(base, base + count))
                return base
        raise BenchError(f"no {count} consecutive free ports below 32700")


class BlackHole:
    """Accepts and never answers (reads and drops, so the peer never blocks on send)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server((HOST, port))
        self.port = port
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True, name="blackhole").start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns = [c for c in self.conns if c.fileno() >= 0] + [conn]
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass
        conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


@dataclass
class MapState:
    """What the port map says now; reloads edit it, faults too (the black hole)."""

    spare_upstream: str = ""
    idle: str = "5m"
    extra: bool = False
    drain: str = "2s"


@dataclass
class Rig:
    work: Path
    nofile: int
    reaper: Reaper = field(init=False)
    ports: Ports = field(default_factory=Ports)
    redis: dict[str, Proc] = field(default_factory=dict)  # ip -> server
    primary_ip: str = REDIS_IPS[0]
    redis_port: int = 0
    mc: Proc | None = None
    mc_port: int = 0
    nodes: list[tuple[int, Proc]] = field(default_factory=list)
    blackhole: BlackHole | None = None
    cacheport: Proc | None = None
    listen: dict[str, int] = field(default_factory=dict)
    admin: int = 0
    cluster_low: int = 0
    seed_port: int = 0
    state: MapState = field(default_factory=MapState)
    reload_lock: threading.Lock = field(default_factory=threading.Lock)
    cluster_lock: threading.Lock = field(default_factory=threading.Lock)
    exclusive: threading.Lock = field(default_factory=threading.Lock)
    hosts: Path = field(init=False)

    def __post_init__(self) -> None:
        self.reaper = Reaper(self.work)
        self.hosts = self.work / "hosts"

    # -- upstreams -----------------------------------------------------------------------

    def start_redis_pair(self) -> None:
        self.redis_port = self.ports.one(*REDIS_IPS)
        for ip in REDIS_IPS:
            folder = self.work / f"redis-{ip}"
            folder.mkdir()
            extra = [] if ip == REDIS_IPS[0] else ["--replicaof", REDIS_IPS[0],
                                                  str(self.redis_port)]
            self.redis[ip] = self.reaper.spawn(f"redis-{ip}", [
                "redis-server", "--port", str(self.redis_port), "--bind", ip, "--dir",
                str(folder), *FAST, *extra])
            wait_port(ip, self.redis_port, self.redis[ip], 10)
        self.wait_replica_synced(REDIS_IPS[1])

    def redis_cli(self, ip: str, *args: str, port: int | None = None) -> str:
        out = subprocess.run(["redis-cli", "-h", ip, "-p", str(port or self.redis_port),
                              *args], capture_output=True, text=True, timeout=60)
        return out.stdout + out.stderr

    def wait_replica_synced(self, ip: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while "master_link_status:up" not in self.redis_cli(ip, "INFO", "replication"):
            if time.monotonic() > deadline:
                raise BenchError(f"replica {ip} did not sync within {timeout}s")
            time.sleep(0.1)

    def start_memcached(self) -> None:
        self.mc_port = self.mc_port or self.ports.one()
        user = ["-u", "root"] if os.geteuid() == 0 else []
        self.mc = self.reaper.spawn("memcached", ["memcached", *user, "-l", HOST, "-p",
                                                  str(self.mc_port), "-U", "0", "-m", "256",
                                                  "-I", "2m", "-c", "4096"])
        wait_port(HOST, self.mc_port, self.mc, 10)

    def start_node(self) -> tuple[int, Proc]:
        port = self.ports.one()
        folder = self.work / f"node-{port}"
        folder.mkdir()
        proc = self.reaper.spawn(f"node-{port}", [
            "redis-server", "--port", str(port), "--bind", HOST, "--dir", str(folder), *FAST,
            "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{uuid.uuid4().hex}.conf",
            "--cluster-port", str(self.ports.one()), "--cluster-node-timeout", "3000"])
        wait_port(HOST, port, proc, 10)
        return port, proc

    def start_cluster(self) -> None:
        self.nodes = [self.start_node() for _ in range(3)]
        out = subprocess.run(["redis-cli", "--cluster", "create",
                              *[f"{HOST}:{p}" for p, _ in self.nodes], "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise BenchError(f"redis-cli --cluster create: {out.stdout}{out.stderr}")
        self.wait_cluster_settled(30)

    def cluster_settled(self) -> bool:
        """Every node says ok and knows every other, and redis-cli's check finds no open
        slot: what ``--cluster reshard`` needs (a node just added says CLUSTERDOWN until
        gossip has told it who owns every slot)."""
        for port, proc in self.nodes:
            info = self.redis_cli(HOST, "CLUSTER", "INFO", port=port)
            if proc.alive() and ("cluster_state:ok" not in info
                                 or f"cluster_known_nodes:{len(self.nodes)}" not in info):
                return False
        out = subprocess.run(["redis-cli", "--cluster", "check", f"{HOST}:{self.nodes[0][0]}"],
                             capture_output=True, text=True, timeout=30)
        text = out.stdout + out.stderr
        return out.returncode == 0 and "[ERR]" not in text and "[WARNING]" not in text

    def wait_cluster_settled(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.cluster_settled():
            if time.monotonic() > deadline:
                raise BenchError(f"the cluster did not settle within {timeout}s")
            time.sleep(0.3)

    # -- cacheport -----------------------------------------------------------------------

    def write_hosts(self, ip: str) -> None:
        with self.hosts.open("w") as f:  # in place: the bind mount follows the inode
            f.write(f"127.0.0.1 localhost\n{ip} {NAME}\n")

    def map_text(self, state: MapState | None = None, bad: str = "") -> str:
        s = state or self.state
        listeners = [
            {"name": "rd", "listen": f"{HOST}:{self.listen['rd']}", "protocol": "redis",
             "upstream": f"{NAME}:{self.redis_port}", "dns_ttl": "200ms",
             "connect_timeout": "1s"},
            {"name": "mc", "listen": f"{HOST}:{self.listen['mc']}", "protocol": "memcached",
             "upstream": f"{HOST}:{self.mc_port}", "connect_timeout": "1s"},
            {"name": "spare", "listen": f"{HOST}:{self.listen['spare']}", "protocol": "tcp",
             "upstream": s.spare_upstream, "idle_timeout": s.idle, "connect_timeout": "1s"},
        ]
        if s.extra:
            listeners.append({"name": "extra", "listen": f"{HOST}:{self.listen['extra']}",
                              "upstream": f"{HOST}:{self.mc_port}", "protocol": "memcached"})
        if bad == "bad-port":
            listeners.append({"name": "bad", "listen": f"{HOST}:70000",
                              "upstream": f"{HOST}:{self.mc_port}"})
        doc = {
            "workers": 2, "drain_timeout": s.drain, "drain_delay": "off",
            "admin": {"listen": f"{HOST}:{self.admin}"}, "defaults": {"health": False},
            "listeners": listeners,
            "clusters": [{"name": "rc", "engine": "redis-cluster",
                          "seed": f"{HOST}:{self.nodes[0][0]}", "announce": HOST,
                          "listen": HOST, "ports": f"{self.cluster_low}-{self.cluster_low + 5}",
                          "seed_port": self.seed_port, "refresh": "1s",
                          "retire_grace": "2s"}],
        }
        text = yaml.safe_dump(doc, sort_keys=False)
        return text + "listeners: [unclosed\n" if bad == "bad-yaml" else text

    @property
    def map_path(self) -> Path:
        return self.work / "soak.yaml"

    def start_cacheport(self) -> None:
        for name in ("rd", "mc", "spare", "extra"):
            self.listen[name] = self.ports.one()
        self.admin = self.ports.one()
        self.cluster_low = self.ports.span(6)
        self.seed_port = self.ports.one()
        self.blackhole = BlackHole(self.ports.one())
        self.state.spare_upstream = f"{HOST}:{self.mc_port}"
        self.write_hosts(self.primary_ip)
        resolv = self.work / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        self.map_path.write_text(self.map_text())
        mount = (f'mount --bind "{self.hosts}" /etc/hosts && '
                 f'mount --bind "{resolv}" /etc/resolv.conf && exec "$@"')
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.cacheport = self.reaper.spawn("cacheport", [
            "prlimit", f"--nofile={self.nofile}:{self.nofile}", "--",
            "unshare", "--mount", "--", "sh", "-c", mount, "sh",
            sys.executable, "-m", "proxy", "run", "-c", str(self.map_path)], env=env, cwd=ROOT)
        deadline = time.monotonic() + 40
        while "serving with 2 workers" not in self.log():
            if not self.cacheport.alive() or time.monotonic() > deadline:
                raise BenchError(f"cacheport did not start:\n{self.cacheport.log_tail(30)}")
            time.sleep(0.1)
        for port in (self.listen["rd"], self.listen["mc"], self.seed_port):
            wait_port(HOST, port, self.cacheport, 20)

    def log(self) -> str:
        path = self.work / "cacheport.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def workers(self) -> list[int]:
        assert self.cacheport is not None
        pids = []
        for child in psutil.Process(self.cacheport.pid).children():
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE and "--reuse-port" in child.cmdline():
                    pids.append(child.pid)
        return sorted(pids)

    def tree(self) -> list[int]:
        assert self.cacheport is not None
        return [self.cacheport.pid, *self.workers()]

    def fds(self) -> int:
        """Sockets and files of the supervisor and workers (pipes and anon inodes left out:
        pooled splice pipes and engine eventfds come and go with load, as in test_faults)."""
        count = 0
        for pid in self.tree():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for entry in os.scandir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(FileNotFoundError):
                        count += not os.readlink(entry.path).startswith(("pipe:", "anon_inode:"))
        return count

    def worker_fds(self) -> dict[int, int]:
        out = {}
        for pid in self.workers():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                out[pid] = len(os.listdir(f"/proc/{pid}/fd"))
        return out

    def rss_mb(self) -> float:
        total = 0
        for pid in self.tree():
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(pid).memory_info().rss
        return total / 2**20

    # -- admin ---------------------------------------------------------------------------

    def http(self, method: str, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection(HOST, self.admin, timeout=15)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def reload(self, edit: Callable[[MapState], MapState],
               bad: str = "") -> tuple[int, str]:
        """Write the map as ``edit`` makes it (``bad``: an invalid one) and POST /-/reload;
        the edit sees the current state under the lock, so concurrent edits never undo
        each other. An invalid map is put back to the valid one right after."""
        with self.reload_lock:
            state = edit(dataclasses.replace(self.state))
            self.map_path.write_text(self.map_text(state, bad))
            code, body = self.http("POST", "/-/reload")
            if bad or code != 200:
                self.map_path.write_text(self.map_text())
            else:
                self.state = state
            return code, body

    def metrics(self) -> dict[tuple[str, str, str], float]:
        """(sample name, listener, direction) -> value, summed over workers and reasons:
        matched by family name, not by exact label sets (labels may grow)."""
        _code, text = self.http("GET", "/metrics")
        out: dict[tuple[str, str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, s.labels.get("listener", ""), s.labels.get("direction", ""))
                out[key] = out.get(key, 0.0) + s.value
        return out

    def close(self) -> list[str]:
        if self.blackhole is not None:
            self.blackhole.close()
        return self.reaper.close()


def prerequisites() -> list[str]:
    """What this machine lacks for a soak (empty: all there)."""
    missing = [t for t in ("redis-server", "redis-cli", "memcached", "prlimit", "unshare")
               if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root (cacheport gets a private /etc/hosts through unshare --mount)")
    return missing
