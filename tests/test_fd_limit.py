"""At the open-files limit: new clients get a clean close and a count, live ones go on.

cacheport runs under ``prlimit --nofile=N:N`` in front of a real redis-server and is
filled with held connections until it runs out of descriptors.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from tests.support import CacheportProcess, ServerProcess, free_port, require_binary, wait_until

NOFILE = 200  # cacheport's limit: about 80 connections after its own descriptors
PING = b"*1\r\n$4\r\nPING\r\n"


def _ping(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Send PING and return what came back (b"" on EOF; raises on a reset or a hang)."""
    sock.settimeout(timeout)
    sock.sendall(PING)
    return sock.recv(64)


def _open(port: int) -> tuple[socket.socket, bytes]:
    """A new client and what its first PING got: +PONG when relayed, b"" or an error
    (a reset) when cacheport closed it. A hang raises TimeoutError and fails the test."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        return sock, _ping(sock)
    except (ConnectionResetError, BrokenPipeError):
        return sock, b""


def _refused(admin: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read()
    found = re.findall(rb'cacheport_connections_refused_total\{[^}]*reason="fd_limit"[^}]*\} (\d+)',
                       text)
    return sum(int(n) for n in found)


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU of a process and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in USER_HZ ticks


@pytest.fixture(params=["native", "python"])
def limited(request: pytest.FixtureRequest, tmp_path: Path,
            redis_server: ServerProcess) -> Iterator[tuple[CacheportProcess, int, int]]:
    """cacheport with RLIMIT_NOFILE NOFILE (soft and hard), relay native or python."""
    prlimit = require_binary("prlimit")
    port, admin = free_port(), free_port()
    config = tmp_path / "cacheport.yaml"
    config.write_text(
        f"admin: {{listen: '127.0.0.1:{admin}'}}\n"
        "listeners:\n"
        f"  - {{name: r, listen: '127.0.0.1:{port}', upstream: '{redis_server.address}', "
        f"protocol: redis, relay: {request.param}}}\n")
    proc = CacheportProcess(config, prefix=(prlimit, f"--nofile={NOFILE}:{NOFILE}", "--"))
    try:
        proc.wait_serving()
        yield proc, port, admin
    finally:
        proc.stop()


def test_at_the_fd_limit_new_clients_are_closed_and_live_ones_go_on(
        limited: tuple[CacheportProcess, int, int]) -> None:
    proc, port, admin = limited
    held: list[socket.socket] = []
    refused: list[socket.socket] = []
    try:
        # Fill: each client is either relayed (PONG) or closed at once; a hang fails here.
        while len(refused) < 20:
            assert len(held) < NOFILE, "cacheport never ran out of descriptors"
            sock, reply = _open(port)
            if reply == b"+PONG\r\n":
                held.append(sock)
                continue
            assert reply == b"", reply
            refused.append(sock)
        assert 40 < len(held) < NOFILE // 2, len(held)

        # Every connection open before the limit still answers.
        for sock in held:
            assert _ping(sock) == b"+PONG\r\n"

        # Clients closed at the limit cost no CPU spin: the listener is not left polling
        # an accept that keeps failing.
        for sock in refused:
            sock.close()
        refused.clear()
        before = _cpu_seconds(proc.pid)
        extra = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
        time.sleep(2.0)
        assert _cpu_seconds(proc.pid) - before < 0.5
        for sock in extra:
            sock.settimeout(5)
            with suppress(ConnectionResetError):
                assert sock.recv(16) == b""  # closed, not left in the backlog
            sock.close()

        # One log line says why, not one per refused client: later refusals are summed up
        # at most once per 10 s (a loaded machine can take that long to get here).
        log = proc.log()
        said = [line for line in log.splitlines() if "out of file descriptors" in line]
        assert 1 <= len(said) <= 3, log  # of 25 refused clients
        assert all("more since the last report" in line for line in said[1:]), log
        assert "RLIMIT_NOFILE" in log
        assert "DOWN" not in log  # a check short of descriptors blames no upstream

        # Room again: after some clients leave, new ones are relayed (and /metrics,
        # which needs a descriptor too, answers).
        for sock in held[:10]:
            sock.close()
        del held[:10]

        def relayed() -> bool:
            sock, reply = _open(port)
            if reply == b"+PONG\r\n":
                held.append(sock)
                return True
            sock.close()
            return False

        wait_until(relayed, 10, interval=0.2, message="a new client to be relayed")
        assert _refused(admin) >= 25
    finally:
        for sock in held + refused:
            sock.close()
