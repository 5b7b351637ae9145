"""copy: sockmap -- the kernel forwards (BPF sockmap); real clients and servers through it.

The byte-exact, half-close, reset and backpressure tests of the core run over
``copy: sockmap`` too (the ``copy_mode`` fixture); these check what is
particular to it: that the kernel path is really the one taken, that a stalled
reader holds the sender back (the kernel's redirect has no backpressure of its
own), and that a connection the kernel won't take still works.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pymemcache.client.base
import pytest
import redis

from proxy import sockmap
from tests.support import ServerProcess, running_proxy
from tests.upstreams import tcp_upstream


def _kernel() -> sockmap.Kernel:
    kernel = sockmap.kernel_for_process()
    if kernel is None:
        pytest.skip("the kernel refused the BPF program (needs CAP_BPF and CAP_NET_ADMIN)")
    return kernel


def _listener(upstream: str, **extra: object) -> list[dict[str, object]]:
    return [{"name": "k", "listen": "127.0.0.1:0", "upstream": upstream, "copy": "sockmap",
             "health": "off", **extra}]


def test_verdict_program_jumps_land_inside_it() -> None:
    """The hand-assembled program: every jump lands on an instruction (no kernel needed)."""
    code = sockmap.verdict_program(3, 4, 5)
    count = len(code) // 8
    jumps = 0
    for at in range(count):
        op = code[at * 8]
        off = int.from_bytes(code[at * 8 + 2:at * 8 + 4], "little", signed=True)
        if op & 0x07 == 0x05 and op not in (0x85, 0x95):  # BPF_JMP class, not call/exit
            jumps += 1
            assert 0 <= at + 1 + off < count, f"instruction {at} jumps out"
    assert jumps == 6
    assert code[-8] == 0x95  # it ends in exit


@pytest.mark.timeout(60)
def test_redis_traffic_goes_through_the_kernel_not_this_process(
        redis_server: ServerProcess) -> None:
    kernel = _kernel()
    with running_proxy(_listener(redis_server.address, protocol="redis")) as proxy:
        r = redis.Redis(port=proxy.port("k"), socket_timeout=30)
        assert r.set("greeting", "hello")
        pipe = r.pipeline(transaction=False)
        for i in range(5_000):
            pipe.set(f"k{i}", i)
        assert all(pipe.execute())
        assert [r.get(f"k{i}") for i in range(200)] == [str(i).encode() for i in range(200)]
        assert r.get("greeting") == b"hello"
        relay = proxy.call(lambda: next(iter(proxy.server.listeners["k"].relays)))
        assert isinstance(relay, sockmap.SockmapRelay) and relay.inner is None
        # Python took only what arrived before the pairing (the hello); the kernel the rest.
        taken = relay.up.py_read + relay.down.py_read
        up, down = proxy.call(lambda: (relay.bytes_upstream, relay.bytes_downstream))
        assert up > 100_000 and down > 20_000
        assert taken <= 1024, f"Python copied {taken} of {up + down} bytes"
        r.close()
    assert kernel.paired >= 1


@pytest.mark.timeout(60)
def test_memcached_large_values_through_the_kernel(memcached: ServerProcess) -> None:
    _kernel()
    with running_proxy(_listener(memcached.address, protocol="memcached")) as proxy:
        mc = pymemcache.client.base.Client(("127.0.0.1", proxy.port("k")), timeout=30)
        values = {f"v{i}": os.urandom(100_000 + i) for i in range(40)}
        for key, value in values.items():
            assert mc.set(key, value)
        for key, value in values.items():
            assert mc.get(key) == value
        mc.close()


@pytest.mark.timeout(60)
def test_stalled_server_holds_the_client_back_and_nothing_is_lost() -> None:
    """The kernel's redirect alone let one client push 1.7 GB at a server that read
    nothing (bench/sockmap_ab.py); with credit the sender stops, and every byte and
    the FIN arrive once the server reads."""
    kernel = _kernel()
    ready = threading.Event()
    state: dict[str, object] = {}

    def stalled(conn: socket.socket) -> None:
        ready.wait(30)
        digest, got = hashlib.sha256(), 0
        conn.settimeout(20)
        while chunk := conn.recv(1 << 20):
            digest.update(chunk)
            got += len(chunk)
        state["got"], state["digest"] = got, digest.hexdigest()
        conn.sendall(b"reply" * 100_000)

    with tcp_upstream(stalled) as port, running_proxy(_listener(f"127.0.0.1:{port}")) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port("k")))
        client.setblocking(False)
        block = os.urandom(65536)
        digest, sent, until = hashlib.sha256(), 0, time.monotonic() + 1.5
        while time.monotonic() < until and sent < (1 << 30):
            try:
                n = client.send(block)
            except BlockingIOError:
                time.sleep(0.005)
                continue
            digest.update(block[:n])
            sent += n
        assert sent < 64 << 20, f"{sent} bytes taken in while the server read nothing"
        stalled_at = sent
        ready.set()
        client.setblocking(True)
        for _ in range(200):  # and the stream carries on once the server reads
            client.sendall(block)
            digest.update(block)
            sent += len(block)
        client.shutdown(socket.SHUT_WR)
        client.settimeout(20)
        reply = b""
        while chunk := client.recv(1 << 20):
            reply += chunk
        client.close()
    assert state["got"] == sent and state["digest"] == digest.hexdigest()
    assert reply == b"reply" * 100_000
    assert stalled_at > sockmap.CREDIT  # the kernel did forward before it held back
    assert kernel.caught_up >= 1


@pytest.mark.timeout(60)
def test_client_that_shuts_down_before_the_pairing_still_gets_its_reply() -> None:
    """A request and a FIN at once (``printf ... | nc -N``): if the FIN lands before the
    pairing the kernel refuses the socket, and the connection runs on the splice path."""
    kernel = _kernel()

    def reply_at_eof(conn: socket.socket) -> None:
        conn.settimeout(10)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(data.upper())

    paired, fell_back = kernel.paired, kernel.fell_back
    with tcp_upstream(reply_at_eof) as port, \
            running_proxy(_listener(f"127.0.0.1:{port}")) as proxy:
        for i in range(30):
            sock = socket.create_connection(("127.0.0.1", proxy.port("k")))
            sock.sendall(b"get key%d\r\n" % i)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            sock.close()
            assert reply == b"GET KEY%d\r\n" % i
    assert (kernel.paired - paired) + (kernel.fell_back - fell_back) == 30
