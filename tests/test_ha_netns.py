"""Two cacheport hosts behind a load balancer, in the NAT topology of network namespaces.

::

    ns cli: redis-py and pymemcache clients, each from its own 198.51.100.2x
      |
    ns nat: HAProxy 198.51.100.1 (mode tcp, send-proxy-v2, GET /readyz every 200 ms,
      |       fall 2 rise 2, no retry elsewhere: as an NLB target group)
      |-- cacheport A 198.51.100.11 --+
      +-- cacheport B 198.51.100.12 --+--> ns vpc: redis-server 192.0.2.11:6379,
                                              memcached 192.0.2.12:11211

The clients cannot reach the cache nodes (no route); the only way is the balancer.
Both hosts run one YAML; ``${CP_HOST}`` differs. tests/test_ha.py is the same on
loopback with raw RESP clients; this one uses the client libraries operators run.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from pymemcache.client.base import Client as MemcacheClient
from redis.connection import Connection, ConnectionPool

from proxy.admin import fetch_status
from proxy.config import Address
from tests.netns_lab import NAT_IP, NamespaceUnavailable, NetnsLab, NsThread, _ip
from tests.support import CacheportProcess, require_binary, wait_until
from tests.test_protocols_proxy_header import v2_tcp4

pytestmark = pytest.mark.timeout(90)

HOSTS = ("198.51.100.11", "198.51.100.12")
CLIENT_IPS = tuple(f"198.51.100.{21 + i}" for i in range(4))
OUTSIDE_IP = "198.51.100.40"  # outside every allow-list
REDIS_PORT, MC_PORT = 7000, 7001  # on the balancer and on every host
ALLOW_ONE_PORT = 7002  # a listener that admits only CLIENT_IPS[0]
ADMIN_PORT = 9000
MAX_OPS = 3000  # per client: the load is bounded in count as well as in time

YAML = f"""\
admin: {{listen: "${{CP_HOST}}:{ADMIN_PORT}"}}
drain_delay: 2s
drain_timeout: 10s
defaults:
  health: off
  proxy_protocol: v2
  proxy_protocol_from: [{NAT_IP}/32]
  allow: [198.51.100.16/28]
listeners:
  - name: redis
    listen: ${{CP_HOST}}:{REDIS_PORT}
    upstream: %(redis)s
    protocol: redis
  - name: memcached
    listen: ${{CP_HOST}}:{MC_PORT}
    upstream: %(memcached)s
    protocol: memcached
  - name: one-client
    listen: ${{CP_HOST}}:{ALLOW_ONE_PORT}
    upstream: %(redis)s
    protocol: redis
    allow: [{CLIENT_IPS[0]}/32]
%(clusters)s"""
SEED_PORT, NODE_PORTS = 7010, (7011, 7022)
CLUSTER_YAML = f"""\
clusters:
  - name: rc
    engine: redis-cluster
    seed: %(seed)s
    announce: {NAT_IP}   # the balancer's address: what cluster clients are told
    listen: ${{CP_HOST}}
    ports: {NODE_PORTS[0]}-{NODE_PORTS[1]}
    seed_port: {SEED_PORT}
    refresh: 1s
    allow: [198.51.100.0/24]  # RedisCluster binds no source: the client's own 198.51.100.2
"""


def haproxy_cfg() -> str:
    servers = "\n".join(
        f"    server h{i} {ip} send-proxy-v2 check port {ADMIN_PORT} inter 200ms fall 2 rise 2"
        for i, ip in enumerate(HOSTS))
    return (
        "global\n    maxconn 512\n"
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n"
        "    timeout server 30s\n    retries 0\n"
        f"frontend fe\n    bind {NAT_IP}:{REDIS_PORT}-{NODE_PORTS[1]}\n    default_backend be\n"
        # Port 0 on a server: dialled on the port the client connected to. The header's
        # sender is the balancer's own address, as an NLB's is in the VPC.
        f"backend be\n    balance roundrobin\n    source {NAT_IP}\n"
        "    option httpchk GET /readyz\n    http-check expect status 200\n"
        + servers.replace(" send-proxy", ":0 send-proxy") + "\n")


def listening_in(pid: int, ip: str, port: int) -> bool:
    """Whether ``ip:port`` listens in the network namespace of process ``pid``."""
    wanted = f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            return any(line.split()[1] == wanted and line.split()[3] == "0A"
                       for line in f.readlines()[1:])
    except OSError:
        return False


@dataclass
class Lab:
    net: NetnsLab
    vpc: NsThread
    nat: NsThread
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    hosts: list[CacheportProcess] = field(default_factory=list)

    @property
    def redis_ip(self) -> str:
        return self.net.vpc_ips[0]

    @property
    def memcached_ip(self) -> str:
        return self.net.vpc_ips[1]

    def admin(self, n: int) -> Address:
        return Address(HOSTS[n], ADMIN_PORT)

    def status(self, n: int) -> dict[str, Any]:
        return self.nat.run(lambda: fetch_status(self.admin(n)))

    def clients_on(self, n: int) -> set[str]:
        return {ip for listener in self.status(n)["listeners"] for ip in listener["clients"]}

    def spawn(self, ns: str, *argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*self.net.prefix(ns), *argv], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    yield from make_lab(tmp_path, cluster=False)


@pytest.fixture
def cluster_lab(tmp_path: Path) -> Iterator[Lab]:
    yield from make_lab(tmp_path, cluster=True)


def start_cluster(lab: Lab) -> str:
    """Three masters on 192.0.2.13-15, every one on 6379 as on ElastiCache; the seed."""
    ips = lab.net.vpc_ips[2:5]
    pids = [lab.spawn(lab.net.vpc, require_binary("redis-server"), "--bind", ip,
                      "--bind-source-addr", ip, "--port", "6379", "--protected-mode", "no",
                      "--cluster-enabled", "yes", "--dir", str(lab.workdir),
                      "--cluster-config-file", f"nodes-{ip}.conf", "--save", "",
                      "--appendonly", "no", "--logfile", "").pid for ip in ips]
    wait_until(lambda: all(listening_in(p, ip, 6379) for p, ip in zip(pids, ips, strict=True)),
               10, message="three cluster nodes")
    subprocess.run([*lab.net.prefix(lab.net.vpc), require_binary("redis-cli"), "--cluster",
                    "create", *[f"{ip}:6379" for ip in ips], "--cluster-yes"],
                   check=True, capture_output=True, timeout=30)

    def ok() -> bool:
        infos = [redis.Redis(host=ip, socket_timeout=2).cluster("info") for ip in ips]
        return all(i.get("cluster_state") == "ok" and int(i.get("cluster_known_nodes", 0)) == 3
                   for i in infos)
    wait_until(lambda: lab.vpc.run(ok), 30, 0.1, "cluster_state:ok")
    return f"{ips[0]}:6379"


def make_lab(tmp_path: Path, cluster: bool) -> Iterator[Lab]:
    try:
        net = NetnsLab(vpc_hosts=5 if cluster else 2).create()
    except NamespaceUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
    lab = Lab(net, net.thread(net.vpc), net.thread(net.nat), tmp_path)
    try:
        for ip in HOSTS:
            _ip("-n", net.nat, "addr", "add", f"{ip}/24", "dev", "nat1")
        for ip in (*CLIENT_IPS, OUTSIDE_IP):
            _ip("-n", net.cli, "addr", "add", f"{ip}/24", "dev", "cli0")
        redis_pid = lab.spawn(net.vpc, require_binary("redis-server"), "--bind", lab.redis_ip,
                              "--port", "6379", "--protected-mode", "no", "--save", "",
                              "--appendonly", "no", "--logfile", "").pid
        mc_pid = lab.spawn(net.vpc, require_binary("memcached"), "-l", lab.memcached_ip,
                           "-p", "11211", "-U", "0", "-u", "root").pid
        wait_until(lambda: listening_in(redis_pid, lab.redis_ip, 6379)
                   and listening_in(mc_pid, lab.memcached_ip, 11211), 10,
                   message="redis-server and memcached in vpc")
        clusters = CLUSTER_YAML % {"seed": start_cluster(lab)} if cluster else ""
        config = tmp_path / "ports.yaml"
        config.write_text(YAML % {"redis": f"{lab.redis_ip}:6379",
                                  "memcached": f"{lab.memcached_ip}:11211",
                                  "clusters": clusters})
        for n, ip in enumerate(HOSTS):
            folder = tmp_path / f"host{n}"
            folder.mkdir()
            (folder / "ports.yaml").write_text(config.read_text())
            lab.hosts.append(CacheportProcess(folder / "ports.yaml", prefix=(
                *net.prefix(net.nat), "env", f"CP_HOST={ip}")))
        for host in lab.hosts:
            host.wait_serving()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_cfg())
        lb = lab.spawn(net.nat, require_binary("haproxy"), "-db", "-f", str(cfg))
        wait_until(lambda: lb.poll() is not None or listening_in(lb.pid, NAT_IP, REDIS_PORT),
                   10, message="haproxy to listen")
        assert lb.poll() is None, "haproxy exited: check the config"
        wait_until(lambda: all(lab.status(n)["ready"] for n in (0, 1)), 10,
                   message="both hosts ready")
        yield lab
    finally:
        lab.stop()
        net.close()


# -- clients that bind their own source address ---------------------------------------


def redis_client(source: str) -> redis.Redis:
    """redis-py through the balancer, its sockets bound to ``source`` (so /status on each
    host, which reads the PROXY header, tells which host serves this client)."""

    class Bound(Connection):
        def _connect(self) -> socket.socket:
            sock = socket.create_connection((self.host, self.port),
                                            timeout=self.socket_connect_timeout,
                                            source_address=(source, 0))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.socket_timeout)
            return sock

    pool = ConnectionPool(connection_class=Bound, host=NAT_IP, port=REDIS_PORT,
                          socket_timeout=3, socket_connect_timeout=2)
    return redis.Redis(connection_pool=pool)


def memcache_client(source: str) -> MemcacheClient:
    """pymemcache through the balancer from ``source`` (its ``socket_module`` hook)."""

    def bound_socket(family: int, kind: int, proto: int = 0) -> socket.socket:
        sock = socket.socket(family, kind, proto)
        sock.bind((source, 0))
        return sock

    module = SimpleNamespace(**{k: getattr(socket, k) for k in dir(socket)
                                if not k.startswith("__")})
    module.socket = bound_socket
    # default_noreply=False: a set counts only once memcached said STORED.
    return MemcacheClient((NAT_IP, MC_PORT), connect_timeout=2, timeout=3,
                          socket_module=module, default_noreply=False)


@dataclass
class Worker:
    """Writes key -> n in a loop through the balancer from one source address; a write
    counts as acknowledged only when the library returned success."""

    kind: str  # "redis" or "memcached"
    source: str
    rotate_every: int | None = None  # drop the connection every N writes (pool max age)
    acked: dict[str, bytes] = field(default_factory=dict)
    errors: list[float] = field(default_factory=list)
    ok_times: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client: Any = (redis_client(self.source) if self.kind == "redis"
                       else memcache_client(self.source))
        set_: Callable[[str, bytes], Any] = client.set
        reset = (client.connection_pool.disconnect if self.kind == "redis" else client.close)
        deadline = time.monotonic() + 30
        try:
            for n in range(MAX_OPS):
                if self.stop.is_set() or time.monotonic() > deadline:
                    break
                if self.rotate_every and n % self.rotate_every == 0:
                    reset()
                key, value = f"{self.kind}-{self.source}-{n}", b"%d" % n
                try:
                    if not set_(key, value):
                        raise ConnectionError("not stored")
                except (OSError, redis.RedisError, Exception):  # any client-visible failure
                    self.errors.append(time.monotonic())
                    reset()
                    time.sleep(0.01)
                    continue
                self.acked[key] = value
                self.ok_times.append(time.monotonic())
                time.sleep(0.002)
        finally:
            reset()

    def outage(self, since: float) -> float:
        """The longest pause between two acknowledged writes that spans a failure seen
        after ``since`` (0 if none): the failover time as this client saw it."""
        gaps = [0.0]
        for e in (t for t in self.errors if t >= since):
            before = [x for x in self.ok_times if x <= e]
            after = [x for x in self.ok_times if x > e]
            gaps.append(after[0] - before[-1] if before and after else float("inf"))
        return max(gaps)


def run_load(lab: Lab, fault: Callable[[], None], rotate_every: int | None,
             settle: float = 2.5) -> tuple[list[Worker], float]:
    workers = [Worker("redis" if i % 2 == 0 else "memcached", ip, rotate_every)
               for i, ip in enumerate(CLIENT_IPS)]
    threads = [lab.net.thread(lab.net.cli) for _ in workers]
    futures = [t.submit(w.run) for t, w in zip(threads, workers, strict=True)]
    try:
        wait_until(lambda: all(len(w.acked) >= 50 for w in workers), 15,
                   message="every client writing")
        at = time.monotonic()
        fault()
        time.sleep(settle)
    finally:
        for w in workers:
            w.stop.set()
        for f in futures:
            f.result(40)
    return workers, at


def all_readable(lab: Lab, workers: list[Worker]) -> int:
    def check() -> int:
        r = redis.Redis(host=lab.redis_ip, port=6379)
        mc = MemcacheClient((lab.memcached_ip, 11211), timeout=5)
        missing = []
        for w in workers:
            keys = list(w.acked)
            for start in range(0, len(keys), 200):
                chunk = keys[start:start + 200]
                got = (dict(zip(chunk, r.mget(chunk), strict=True)) if w.kind == "redis"
                       else mc.get_many(chunk))
                missing += [k for k in chunk if got.get(k) != w.acked[k]]
        r.close()
        mc.close()
        assert missing == [], f"{len(missing)} acknowledged writes are gone: {missing[:5]}"
        return sum(len(w.acked) for w in workers)
    return lab.vpc.run(check, timeout=30)


def test_sigkill_of_one_host_fails_only_its_clients_and_they_carry_on(lab: Lab) -> None:
    on_victim: set[str] = set()

    def kill() -> None:
        on_victim.update(lab.clients_on(0))
        lab.hosts[0].signal(signal.SIGKILL)

    workers, killed_at = run_load(lab, kill, rotate_every=None)
    failed = {w.source for w in workers if w.errors}
    sources = {w.source for w in workers}
    assert on_victim and on_victim != sources, "round robin put clients on both hosts"
    assert failed <= on_victim, (failed, on_victim)
    for w in workers:
        assert any(t > killed_at for t in w.ok_times), f"{w.kind} {w.source} never resumed"
        assert all(t - killed_at < 2.0 for t in w.errors), "errors outside the fault"
    gaps = [w.outage(killed_at) for w in workers]
    assert max(gaps) < 2.0, f"failover seen by a client took {max(gaps):.3f} s"
    total = all_readable(lab, workers)
    print(f"\nnetns SIGKILL: {sum(len(w.errors) for w in workers)} client-visible errors on "
          f"{len(on_victim)} of {len(workers)} clients (redis-py and pymemcache); longest "
          f"pause {max(gaps) * 1000:.0f} ms; {total} acknowledged writes all readable")


def test_sigterm_of_one_host_is_invisible_to_clients(lab: Lab) -> None:
    workers, _ = run_load(lab, lambda: lab.hosts[0].signal(signal.SIGTERM),
                          rotate_every=25, settle=3.0)
    assert {w.source: w.errors for w in workers} == {w.source: [] for w in workers}
    assert lab.hosts[0].wait(15) == 0
    log = lab.hosts[0].log()
    assert "still accepting for drain_delay 2s" in log
    assert " 0 cut" in log, log[-2000:]
    total = all_readable(lab, workers)
    print(f"\nnetns SIGTERM: 0 client-visible errors, {total} acknowledged writes readable")


def _ping_from(source: str, port: int, host: str = NAT_IP, prefix: bytes = b"") -> bytes:
    with socket.create_connection((host, port), timeout=3,
                                  source_address=(source, 0)) as sock:
        sock.sendall(prefix + b"*1\r\n$4\r\nPING\r\n")
        try:
            return sock.recv(64)
        except (ConnectionResetError, TimeoutError):
            return b""


def test_allow_list_reads_the_header_and_hosts_refuse_clients_around_the_balancer(
        lab: Lab) -> None:
    cli = lab.net.thread(lab.net.cli)
    allowed, other, outside = CLIENT_IPS[0], CLIENT_IPS[1], OUTSIDE_IP
    spoof = v2_tcp4(allowed, HOSTS[0], 40000, REDIS_PORT)
    for _ in range(2):  # round robin: both hosts
        assert cli.run(_ping_from, allowed, ALLOW_ONE_PORT) == b"+PONG\r\n"
        assert cli.run(_ping_from, other, ALLOW_ONE_PORT) == b""  # by the header's address
        assert cli.run(_ping_from, other, REDIS_PORT) == b"+PONG\r\n"
        assert cli.run(_ping_from, outside, REDIS_PORT) == b""  # outside defaults' allow
    for host in HOSTS:
        # Straight to a host: no header, then a spoofed one from a client's own address.
        assert cli.run(_ping_from, allowed, REDIS_PORT, host) == b""
        assert cli.run(_ping_from, allowed, REDIS_PORT, host, spoof) == b""
    refused = [line for n in (0, 1) for line in lab.hosts[n].log().splitlines()
               if "refused" in line or "PROXY" in line]
    assert refused, "refusals are logged"


def node_ports(lab: Lab, n: int) -> dict[str, int]:
    (cluster,) = lab.status(n)["clusters"]
    return {node["id"]: node["port"] for node in cluster["nodes"]}


def test_a_cluster_client_in_the_client_namespace_uses_both_hosts_through_the_balancer(
        cluster_lab: Lab) -> None:
    """redis-py RedisCluster at the balancer's address, no address_remap: both hosts,
    started without state, give every node the same port, so any redirect either host
    writes leads the client to the same node through either host."""
    lab = cluster_lab
    wait_until(lambda: len(node_ports(lab, 0)) == 3 and len(node_ports(lab, 1)) == 3, 15,
               message="both hosts to list 3 nodes")
    ports = node_ports(lab, 0)
    assert ports == node_ports(lab, 1)
    cli = lab.net.thread(lab.net.cli)

    def use() -> set[tuple[str, int]]:
        client = redis.RedisCluster(host=NAT_IP, port=SEED_PORT, socket_timeout=3)
        try:
            for i in range(300):
                client.set(f"key-{i}", i)
            assert [int(client.get(f"key-{i}") or -1) for i in range(300)] == list(range(300))
            return {(n.host, n.port) for n in client.get_nodes()}
        finally:
            client.close()

    assert cli.run(use) == {(NAT_IP, p) for p in ports.values()}
    # A command asked of the wrong node: the MOVED names the same port whichever host
    # answers (round robin alternates hosts connection by connection).
    slot = redis.cluster.key_slot(b"key-0")
    (cluster,) = lab.status(0)["clusters"]
    right = next(int(n["port"]) for n in cluster["nodes"]
                 if any(a <= slot <= b for a, b in n["slots"]))
    wrong = next(p for p in ports.values() if p != right)

    def ask_wrong() -> bytes:
        with socket.create_connection((NAT_IP, wrong), timeout=3,
                                      source_address=(CLIENT_IPS[0], 0)) as sock:
            sock.sendall(b"*2\r\n$3\r\nGET\r\n$5\r\nkey-0\r\n")
            return sock.recv(128)
    answers = {cli.run(ask_wrong) for _ in range(4)}
    assert answers == {b"-MOVED %d %s:%d\r\n" % (slot, NAT_IP.encode(), right)}
    for n in (0, 1):  # each host wrote (and counted, a moment after) some of those redirects
        wait_until(lambda n=n: lab.status(n)["clusters"][0]["stats"]["redirects"] >= 1, 5,
                   message=f"host {n} to count the redirects it rewrote")
    print(f"\nnetns cluster: both hosts map {len(ports)} nodes to ports {sorted(ports.values())}")
