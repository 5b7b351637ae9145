"""Two cacheport hosts behind a load balancer: losing one costs only its connections.

::

    clients 127.0.0.1x --> HAProxy (mode tcp, send-proxy-v2, GET /readyz every 200ms,
                              |     fall 2 rise 2, no retry elsewhere: as an NLB)
                              |-- cacheport A (127.0.0.2) --+
                              +-- cacheport B (127.0.0.3) --+--> redis-server

Both hosts run ``cacheport run`` with one YAML; ``${CP_HOST}`` and ``${CP_ADMIN}`` come
from each one's environment. Each client is a tiny RESP client bound to its own source
address, so /status on each host (by the PROXY header) tells which host serves whom.
A client that fails opens a new connection and carries on; a write counts as
acknowledged only when +OK came back, and every acknowledged write must be readable.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from proxy.admin import fetch_status
from proxy.config import Address
from tests.lbkit import Backend, haproxy, quiet_port
from tests.support import CacheportProcess, ServerProcess, wait_until

pytestmark = pytest.mark.timeout(60)

YAML = """\
admin: {listen: "${CP_ADMIN}"}
drain_delay: 2s
drain_timeout: 10s
defaults: {health: off}
listeners:
  - name: cache
    listen: ${CP_HOST}:%(port)d
    upstream: %(upstream)s
    protocol: redis
    allow: [127.0.0.0/8]
    proxy_protocol: v2
    proxy_protocol_from: [127.0.0.1/32]
"""
CLIENTS = 4
MAX_OPS = 4000  # per client: the load is bounded in count as well as in time
PAUSE = 0.002


@dataclass
class Client:
    """Writes k<i>-<n> = n in a loop through the balancer; reconnects on any error."""

    index: int
    port: int
    rotate_every: int | None = None  # open a new connection every N writes (pool max age)
    acked: list[str] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)  # monotonic times of failures
    recovered: list[float] = field(default_factory=list)  # first success after a failure
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def source(self) -> str:
        return f"127.0.0.{10 + self.index}"

    def _connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=3,
                                        source_address=(self.source, 0))

    def run(self) -> None:
        sock: socket.socket | None = None
        failed = False
        deadline = time.monotonic() + 30
        for n in range(MAX_OPS):
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            key = f"k{self.index}-{n}"
            try:
                if sock is None or (self.rotate_every and n % self.rotate_every == 0):
                    if sock is not None:
                        sock.close()
                    sock = self._connect()
                sock.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%d\r\n"
                             % (len(key), key.encode(), len(str(n)), n))
                reply = sock.recv(64)
                if reply != b"+OK\r\n":
                    raise ConnectionError(f"reply {reply!r}")
                self.acked.append(key)
                if failed:
                    self.recovered.append(time.monotonic())
                    failed = False
            except OSError:
                self.errors.append(time.monotonic())
                failed = True
                if sock is not None:
                    sock.close()
                sock = None
            time.sleep(PAUSE)
        if sock is not None:
            sock.close()


@dataclass
class Fleet:
    hosts: list[CacheportProcess]
    admins: list[Address]
    lb: int


@pytest.fixture
def fleet(tmp_path: Path, redis_server: ServerProcess) -> Iterator[Fleet]:
    port = quiet_port()
    hosts: list[CacheportProcess] = []
    admins: list[Address] = []
    try:
        for n, ip in enumerate(("127.0.0.2", "127.0.0.3")):
            admin = Address(ip, quiet_port(ip))
            folder = tmp_path / f"host{n}"
            folder.mkdir()
            config = folder / "ports.yaml"
            config.write_text(YAML % {"port": port, "upstream": redis_server.address})
            hosts.append(CacheportProcess(config, prefix=(
                "env", f"CP_HOST={ip}", f"CP_ADMIN={admin}")))
            admins.append(admin)
        for host in hosts:
            host.wait_serving()
        backends = [Backend(a.host, port, a.port) for a in admins]
        with haproxy(tmp_path, backends) as lb:
            yield Fleet(hosts, admins, lb)
    finally:
        for host in hosts:
            host.stop()


def clients_of(admin: Address) -> set[str]:
    (listener,) = fetch_status(admin)["listeners"]
    return set(listener["clients"])


def run_load(fleet: Fleet, event: threading.Event, rotate_every: int | None,
             settle: float = 2.0) -> list[Client]:
    clients = [Client(i, fleet.lb, rotate_every) for i in range(CLIENTS)]
    threads = [threading.Thread(target=c.run) for c in clients]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(len(c.acked) >= 50 for c in clients), 10,
                   message="every client writing")
        event.set()
        time.sleep(settle)
    finally:
        for c in clients:
            c.stop.set()
        for t in threads:
            t.join(35)
    return clients


def all_readable(redis_server: ServerProcess, clients: list[Client]) -> None:
    r = redis.Redis(port=redis_server.port)
    keys = [k for c in clients for k in c.acked]
    values = []
    for start in range(0, len(keys), 500):
        values += r.mget(keys[start:start + 500])
    missing = [k for k, v in zip(keys, values, strict=True) if v is None]
    assert missing == [], f"{len(missing)} acknowledged writes are gone"


def test_sigkill_of_one_host_fails_only_its_connections_and_clients_carry_on(
        fleet: Fleet, redis_server: ServerProcess) -> None:
    wait_until(lambda: all(fetch_status(a)["ready"] for a in fleet.admins), 5,
               message="both hosts ready")
    killed_at: list[float] = []
    on_victim: set[str] = set()
    go = threading.Event()

    def kill_when_told() -> None:
        go.wait(15)
        on_victim.update(clients_of(fleet.admins[0]))
        killed_at.append(time.monotonic())
        fleet.hosts[0].signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_when_told)
    killer.start()
    clients = run_load(fleet, go, rotate_every=None)
    killer.join(5)
    failed = {c.source for c in clients if c.errors}
    # Round robin put some clients on each host; only the victim's clients saw errors
    # (their connection, then reconnects balanced to the dead host until the checks
    # marked it down), and each wrote again afterwards through the other host.
    assert on_victim and on_victim != {c.source for c in clients}
    assert failed <= on_victim, (failed, on_victim)
    for c in clients:
        assert len(c.recovered) == (1 if c.errors else 0), c
        assert c.acked, c.source
    failover = max((r - killed_at[0] for c in clients for r in c.recovered), default=0.0)
    assert failover < 2.0, f"failover took {failover:.3f}s"
    all_readable(redis_server, clients)
    print(f"\nSIGKILL: {sum(len(c.errors) for c in clients)} client errors on "
          f"{len(on_victim)} victim client(s) of {CLIENTS}; failover seen by a client "
          f"{failover * 1000:.0f} ms; {sum(len(c.acked) for c in clients)} acked writes")


def test_sigterm_of_one_host_is_invisible_to_clients(
        fleet: Fleet, redis_server: ServerProcess) -> None:
    wait_until(lambda: all(fetch_status(a)["ready"] for a in fleet.admins), 5,
               message="both hosts ready")
    go = threading.Event()
    stopped: list[float] = []

    def stop_when_told() -> None:
        go.wait(15)
        stopped.append(time.monotonic())
        fleet.hosts[0].signal(signal.SIGTERM)

    stopper = threading.Thread(target=stop_when_told)
    stopper.start()
    # Clients renew connections (a pool's max age): those on the draining host move to
    # the other one within drain_timeout, so nothing is cut. HAProxy must mark the host
    # down (fall 2 at 200 ms, ~0.5 s) before drain_delay ends and its listener closes:
    # 2 s of drain_delay leave a loaded machine room for that.
    clients = run_load(fleet, go, rotate_every=25, settle=3.0)
    stopper.join(5)
    assert [c.errors for c in clients] == [[]] * CLIENTS
    assert fleet.hosts[0].wait(15) == 0
    log = fleet.hosts[0].log()
    assert "still accepting for drain_delay 2s" in log
    assert " 0 cut" in log, log[-2000:]
    all_readable(redis_server, clients)
    print(f"\nSIGTERM: 0 client errors, {sum(len(c.acked) for c in clients)} acked writes")
