"""Relay behaviour with raw sockets: half-close, reset, backpressure, dead upstreams, idle.

The core behaviours run on both copy paths (``copy: splice`` and ``copy: buffer``)
and both event loops.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time
from pathlib import Path

import psutil
import pytest

from proxy.relay.engine import NativeRelay
from proxy.relay.pipes import PIPE_SIZE
from proxy.relay.splice import SpliceRelay
from tests.support import (
    CacheportProcess,
    copy_fields,
    free_port,
    running_proxy,
    tcp_listener,
    until_closed,
    wait_until,
)
from tests.upstreams import (
    echo_until_eof_then_reply,
    pattern,
    push,
    reset_after_partial_reply,
    reset_immediately,
    talk_after_our_eof,
    tcp_upstream,
)


def connect(port: int, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


def test_client_half_close_reaches_upstream_and_reply_still_arrives(
        loop_kind: str, copy_mode: str) -> None:
    payload = pattern(3 << 20)
    with tcp_upstream(echo_until_eof_then_reply) as port, \
            running_proxy(tcp_listener(port, copy=copy_mode), loop_kind) as proxy:
        sock = connect(proxy.port("t"))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # upstream must see EOF after the last byte
        reply = read_to_eof(sock)
        sock.close()
    assert reply == b"got %d bytes;" % len(payload) + payload[-16:] + b";bye"


def test_upstream_half_close_reaches_client_which_can_still_send(
        loop_kind: str, copy_mode: str) -> None:
    with tcp_upstream(talk_after_our_eof) as port, \
            running_proxy(tcp_listener(port, copy=copy_mode), loop_kind) as proxy:
        sock = connect(proxy.port("t"))
        assert read_to_eof(sock) == b"hello-then-fin"  # EOF passed through
        sock.sendall(b"still talking after the upstream's FIN")  # our direction stays open
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        assert sock.recv(10) == b""
        sock.close()
        wait_until(lambda: proxy.server.active == 0, 5, message="relay to close")


def test_upstream_reset_closes_client(loop_kind: str, copy_mode: str) -> None:
    with tcp_upstream(reset_after_partial_reply) as port, \
            running_proxy(tcp_listener(port, copy=copy_mode), loop_kind) as proxy:
        sock = connect(proxy.port("t"))
        sock.sendall(b"request")
        received = b""
        with pytest.raises(ConnectionResetError):
            while True:
                data = sock.recv(1024)
                if not data:  # a FIN instead of an RST would end here
                    raise AssertionError(f"expected a reset, got a clean close after {received!r}")
                received += data
        sock.close()
        assert received in (b"", b"partial")
        wait_until(lambda: proxy.server.active == 0, 5, message="relay to close")


def test_upstream_that_resets_at_once_closes_client(loop_kind: str, copy_mode: str) -> None:
    with tcp_upstream(reset_immediately) as port, \
            running_proxy(tcp_listener(port, copy=copy_mode), loop_kind) as proxy:
        assert until_closed(proxy.port("t")) == b""  # a reset or a close, nothing relayed
        wait_until(lambda: proxy.server.active == 0, 5, message="relay to close")


def test_client_reset_closes_upstream(loop_kind: str, copy_mode: str) -> None:
    upstream_saw: list[str] = []

    def handler(conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            while conn.recv(1024):
                pass
            upstream_saw.append("eof")
        except ConnectionResetError:
            upstream_saw.append("reset")

    with tcp_upstream(handler) as port, \
            running_proxy(tcp_listener(port, copy=copy_mode), loop_kind) as proxy:
        sock = connect(proxy.port("t"))
        sock.sendall(b"some request bytes")
        wait_until(lambda: proxy.server.active == 1 and proxy.server.listeners["t"].relays, 5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        wait_until(lambda: upstream_saw, 10, message="upstream to see the client go")
        wait_until(lambda: proxy.server.active == 0, 5, message="relay to close")
    assert upstream_saw == ["reset"]


def test_upstream_refused_closes_client_within_connect_timeout(loop_kind: str) -> None:
    dead_port = free_port()  # nothing listens here
    with running_proxy(tcp_listener(dead_port, connect_timeout="1s"), loop_kind) as proxy:
        sock = connect(proxy.port("t"))
        sock.settimeout(5)
        start = time.monotonic()
        assert sock.recv(10) == b""
        assert time.monotonic() - start < 1 + 1
        sock.close()
        assert proxy.server.listeners["t"].stats.refused == {"upstream_connect_failed": 1}


def test_upstream_that_never_answers_closes_client_at_connect_timeout() -> None:
    """A listening socket with a full backlog never completes the handshake (SYNs dropped)."""
    backlog = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    backlog.bind(("127.0.0.1", 0))
    backlog.listen(0)
    port = backlog.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue; later SYNs are dropped, not refused
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.2)
        with running_proxy(tcp_listener(port, connect_timeout="1s")) as proxy:
            sock = connect(proxy.port("t"))
            sock.settimeout(5)
            start = time.monotonic()
            assert sock.recv(10) == b""
            elapsed = time.monotonic() - start
            sock.close()
        assert 0.8 <= elapsed < 2.0, elapsed
    finally:
        for s in fillers:
            s.close()
        backlog.close()


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_backpressure_bounds_memory_and_delivers_200mb_intact(
        tmp_path: Path, copy_mode: str) -> None:
    size = 200 << 20
    expected = hashlib.sha256(pattern(size)).hexdigest()
    with tcp_upstream(push(size)) as port:
        config = tmp_path / "bp.yaml"
        proxy_port = free_port()
        fields = copy_fields(copy_mode)
        config.write_text(
            f"listeners:\n  - {{name: bp, listen: '127.0.0.1:{proxy_port}', "
            f"upstream: '127.0.0.1:{port}', copy: {fields['copy']}, "
            f"relay: {fields['relay']}}}\n")
        proc = CacheportProcess(config)
        try:
            proc.wait_serving()
            rss_before = psutil.Process(proc.pid).memory_info().rss
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            sock.settimeout(60)
            sock.connect(("127.0.0.1", proxy_port))
            # The client reads nothing while the upstream pushes; give it time to fill
            # every buffer on the way, then check cacheport did not take the rest in.
            time.sleep(2.0)
            rss_stalled = psutil.Process(proc.pid).memory_info().rss
            digest = hashlib.sha256()
            received = 0
            while chunk := sock.recv(1 << 20):
                digest.update(chunk)
                received += len(chunk)
            sock.close()
            rss_after = psutil.Process(proc.pid).memory_info().rss
        finally:
            proc.stop()
    assert received == size
    assert digest.hexdigest() == expected
    growth = rss_stalled - rss_before
    assert growth < 8 << 20, f"cacheport grew {growth >> 20} MiB while the client stalled"
    assert rss_after - rss_before < 16 << 20


def test_stalled_direction_holds_at_most_one_buffer_or_one_pipe(
        loop_kind: str, copy_mode: str) -> None:
    """cacheport's own count: a stalled direction holds at most one buffer_size chunk
    (buffer) or one pipe (splice, auto: in kernel pages), and stops reading the upstream."""
    size = 64 << 20
    buffered = copy_mode.endswith("buffer")
    bound = 64 << 10 if buffered else PIPE_SIZE
    with tcp_upstream(push(size)) as port, \
            running_proxy(tcp_listener(port, buffer_size="64k", copy=copy_mode),
                          loop_kind) as proxy:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.settimeout(60)
        sock.connect(("127.0.0.1", proxy.port("t")))
        listener = proxy.server.listeners["t"]

        def stalled_pending() -> int:
            relays = list(listener.relays)
            return relays[0].pending_downstream if relays else 0

        pending = wait_until(lambda: proxy.call(stalled_pending), 10,
                             message="the downstream direction to stall")
        assert 0 < pending <= bound
        moved = proxy.call(lambda: next(iter(listener.relays)).bytes_downstream)
        time.sleep(0.3)
        assert proxy.call(lambda: next(iter(listener.relays)).bytes_downstream) == moved
        assert moved < size  # it stopped reading the upstream
        kind = proxy.call(lambda: type(next(iter(listener.relays))))
        if copy_mode.startswith("native-"):
            assert kind is NativeRelay
        else:
            assert (kind is SpliceRelay) == (not buffered)
        received = 0
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
        sock.close()
    assert received == size


def test_idle_timeout_closes_idle_client(loop_kind: str, copy_mode: str) -> None:
    def silent(conn: socket.socket) -> None:
        conn.settimeout(10)
        while conn.recv(1024):
            pass

    with tcp_upstream(silent) as port, \
            running_proxy(tcp_listener(port, idle_timeout="500ms", copy=copy_mode),
                          loop_kind) as proxy:
        sock = connect(proxy.port("t"))
        sock.settimeout(5)
        start = time.monotonic()
        assert sock.recv(10) == b""
        elapsed = time.monotonic() - start
        sock.close()
        assert 0.45 <= elapsed < 1.5, elapsed
        # Counted when the relay has closed, a moment after the client saw the EOF.
        wait_until(lambda: proxy.server.listeners["t"].stats.idle_closed == 1, 5)


def test_without_idle_timeout_idle_connection_stays_open() -> None:
    def echo(conn: socket.socket) -> None:
        conn.settimeout(10)
        while data := conn.recv(1024):
            conn.sendall(data)

    with tcp_upstream(echo) as port, running_proxy(tcp_listener(port)) as proxy:
        sock = connect(proxy.port("t"))
        sock.settimeout(0.01)
        time.sleep(1.0)  # idle, well past the 500ms of the test above
        sock.settimeout(5)
        sock.sendall(b"ping")
        assert sock.recv(10) == b"ping"
        sock.close()


def test_socket_options_on_both_legs(copy_mode: str) -> None:
    seen: dict[str, int] = {}

    def inspect(conn: socket.socket) -> None:
        conn.settimeout(10)
        conn.recv(10)
        conn.sendall(b"ok")

    with tcp_upstream(inspect) as port, \
            running_proxy(tcp_listener(port, copy=copy_mode)) as proxy:
        sock = connect(proxy.port("t"))
        sock.sendall(b"x")
        assert sock.recv(10) == b"ok"

        def options() -> None:
            relay = next(iter(proxy.server.listeners["t"].relays))
            if isinstance(relay, NativeRelay):  # the engine owns them: look through copies
                detail = relay.detail()
                dups = [socket.socket(fileno=os.dup(detail[f"{name}_fd"]))
                        for name in ("client", "upstream")]
                legs = dict(zip(("client", "upstream"), dups, strict=True))
            elif isinstance(relay, SpliceRelay):
                legs = {"client": relay.client_sock, "upstream": relay.upstream_sock}
            else:
                legs = {name: side.transport.get_extra_info("socket")  # type: ignore[union-attr]
                        for name, side in (("client", relay.client),
                                           ("upstream", relay.upstream))}
            for name, s in legs.items():
                assert s is not None
                seen[f"{name}_nodelay"] = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                seen[f"{name}_keepalive"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                if isinstance(relay, NativeRelay):
                    s.close()

        proxy.call(options)
        sock.close()
    assert len(seen) == 4 and all(value for value in seen.values()), seen
