"""DNS-named upstreams: an address change reaches new connections without a restart.

cacheport runs in its own mount namespace with a private /etc/hosts bind-mounted
over the real one, so the test can change what the name resolves to (glibc reads
the hosts file on every lookup) without touching the machine's resolver.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support import (
    CacheportProcess,
    ServerProcess,
    free_port,
    start_server,
    wait_until,
)

NAME = "node-0001.cacheport.test"


def private_resolver(tmp_path: Path, hosts_text: str) -> tuple[Path, tuple[str, ...]]:
    """A hosts file and a resolv.conf that sends DNS only to 127.0.0.1 (where nothing
    answers), bind-mounted for cacheport alone: no lookup ever leaves the machine."""
    hosts = tmp_path / "hosts"
    hosts.write_text(hosts_text)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    script = (f'mount --bind "{hosts}" /etc/hosts && '
              f'mount --bind "{resolv}" /etc/resolv.conf && exec "$@"')
    return hosts, ("unshare", "--mount", "--", "sh", "-c", script, "sh")


def can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not can_unshare(), reason="needs root and unshare(1) to give cacheport a private /etc/hosts")


@pytest.fixture
def nodes_on_two_addresses() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two redis-servers on one port, at 127.0.0.2 and 127.0.0.3 (a node 'replaced')."""
    port = free_port("127.0.0.2")
    old = start_server("redis", host="127.0.0.2", port=port)
    try:
        new = start_server("redis", host="127.0.0.3", port=port)
    except BaseException:
        old.stop()
        raise
    try:
        redis.Redis(host="127.0.0.2", port=port).set("node", "old")
        redis.Redis(host="127.0.0.3", port=port).set("node", "new")
        yield old, new
    finally:
        old.stop()
        new.stop()


@pytest.mark.timeout(60)
def test_new_connections_follow_a_changed_address(
    tmp_path: Path, nodes_on_two_addresses: tuple[ServerProcess, ServerProcess]
) -> None:
    old, _new = nodes_on_two_addresses
    hosts, mount = private_resolver(tmp_path, f"127.0.0.1 localhost\n127.0.0.2 {NAME}\n")
    port = free_port()
    path = tmp_path / "dns.yaml"
    path.write_text(f"listeners:\n  - {{name: rd, listen: '127.0.0.1:{port}', "
                    f"upstream: '{NAME}:{old.port}', protocol: redis, dns_ttl: 200ms}}\n")
    proc = CacheportProcess(path, prefix=mount)
    try:
        proc.wait_serving()
        first = redis.Redis(port=port, socket_timeout=5, single_connection_client=True)
        assert first.get("node") == b"old"
        with hosts.open("w") as f:  # in place: the bind mount follows the inode
            f.write(f"127.0.0.1 localhost\n127.0.0.3 {NAME}\n")

        def reaches_new() -> bool:
            r = redis.Redis(port=port, socket_timeout=5)
            try:
                return r.get("node") == b"new"
            finally:
                r.close()

        wait_until(reaches_new, 10, interval=0.1, message="a new connection to reach 127.0.0.3")
        assert first.get("node") == b"old"  # the live connection stays where it was
        first.close()
        wait_until(lambda: f"upstream {NAME}:{old.port} now resolves to 127.0.0.3 "
                   "(was 127.0.0.2)" in proc.log(), 5, message="the change to be logged")
    finally:
        proc.stop()


@pytest.mark.timeout(60)
def test_unresolvable_name_closes_the_client_with_a_reason(tmp_path: Path) -> None:
    _, mount = private_resolver(tmp_path, "127.0.0.1 localhost\n")
    port = free_port()
    path = tmp_path / "nx.yaml"
    path.write_text(f"listeners:\n  - {{name: rd, listen: '127.0.0.1:{port}', "
                    f"upstream: 'missing.cacheport.test:6379', connect_timeout: 2s, "
                    # No checks: one that failed first would mark it DOWN, and a client
                    # would then be refused as upstream_down without a dial to log.
                    f"health: off}}\n")
    proc = CacheportProcess(path, prefix=mount)
    try:
        proc.wait_serving()
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client.sendall(b"PING\r\n")
                try:
                    assert client.recv(100) == b""  # closed, no answer
                except ConnectionResetError:
                    pass  # closed with our PING unread: the kernel sends an RST
        # "cannot resolve" when the resolver answers at once; "DNS lookup timed out" when a
        # loaded machine makes it outlast connect_timeout. Either names the upstream.
        wait_until(lambda: "cannot reach upstream missing.cacheport.test:6379" in proc.log(), 15,
                   message="the resolution failure to be logged")
        assert re.search(r"cannot resolve 'missing\.cacheport\.test'|DNS lookup timed out",
                         proc.log()), proc.log()[-2000:]
        assert proc.proc.poll() is None  # the listener survives
    finally:
        proc.stop()
    assert "Traceback" not in proc.log()
