"""The native relay engine (proxy/relay/engine.c, proxy/relay/engine.py): that it is taken, and its
copy rules. Byte-exactness, half-close, reset, backpressure and idle timeouts run on it
in test_relay.py (the ``native-*`` copy modes) and, as the default, everywhere else."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import socket
import subprocess
import sys
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

import proxy.relay.engine as native_mod
from proxy.config import ConfigError
from proxy.process import WORKERS_ENV
from proxy.relay.engine import NativeRelay, hub_for, native_available
from proxy.relay.splice import SpliceRelay
from tests.support import (
    ROOT,
    ServerProcess,
    make_config,
    only_relay,
    running_proxy,
    tcp_listener,
    wait_until,
)
from tests.upstreams import echo, pattern, tcp_upstream

needs_native = pytest.mark.skipif(not native_available(),
                                  reason="the native relay engine was not built here")


def detail(proxy: Any, relay: NativeRelay) -> dict[str, int]:
    return proxy.call(relay.detail)  # type: ignore[no-any-return]


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` from a thread and read as many bytes back (an echo upstream)."""
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    chunks = []
    got = 0
    while got < len(payload):
        chunk = sock.recv(1 << 20)
        assert chunk, "closed early"
        chunks.append(chunk)
        got += len(chunk)
    sender.join(15)
    return b"".join(chunks)


@needs_native
def test_plain_listeners_hand_their_connections_to_the_engine(
        loop_kind: str, redis_server: ServerProcess) -> None:
    """The default (relay: auto) for tcp and for protocol listeners; relay: python opts out."""
    with tcp_upstream(echo) as port, running_proxy([
            *tcp_listener(port),
            {"name": "r", "listen": "127.0.0.1:0", "upstream": redis_server.address,
             "protocol": "redis"},
            {"name": "p", "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{port}",
             "relay": "python"}], loop_kind) as proxy:
        socks = {}
        for name in ("t", "r", "p"):
            socks[name] = socket.create_connection(("127.0.0.1", proxy.port(name)), timeout=10)
            socks[name].sendall(b"PING\r\n")
            assert socks[name].recv(64) in (b"PING\r\n", b"+PONG\r\n")
        kinds = {name: type(only_relay(proxy, name)) for name in socks}
        for sock in socks.values():
            sock.close()
    assert kinds == {"t": NativeRelay, "r": NativeRelay, "p": SpliceRelay}


@needs_native
def test_auto_copies_small_reads_and_splices_bulk(loop_kind: str) -> None:
    """The engine's own counts: request/response bytes go through its buffer, a bulk
    transfer through pooled pipes -- and back to the buffer when the bulk is over."""
    payload = pattern(4 << 20)
    with tcp_upstream(echo) as port, running_proxy(tcp_listener(port), loop_kind) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=15) as sock:
        for _ in range(20):
            sock.sendall(b"GET key\r\n")
            assert sock.recv(64) == b"GET key\r\n"
        relay = only_relay(proxy)
        small = detail(proxy, relay)
        assert small["copied_up"] == small["copied_down"] == 180
        assert small["leases_up"] == small["leases_down"] == 0
        assert exchange(sock, payload) == payload
        bulk = detail(proxy, relay)
        assert bulk["leases_up"] >= 1 and bulk["leases_down"] >= 1
        assert bulk["copied_up"] + bulk["copied_down"] < len(payload) // 2, "bulk did not splice"
        for _ in range(10):
            sock.sendall(b"small\r\n")
            assert sock.recv(64) == b"small\r\n"
        after = detail(proxy, relay)
        stats = proxy.call(lambda: hub_for(proxy.loop).stats())  # type: ignore[arg-type]
    assert (after["bulk_up"], after["bulk_down"]) == (0, 0)
    # The first SMALL_READS (2) small reads of each direction may still splice: a lone
    # small read is usually the tail of a large reply.
    copied = after["copied_up"] + after["copied_down"] - bulk["copied_up"] - bulk["copied_down"]
    assert 140 - 2 * 2 * 7 <= copied <= 140
    assert 1 <= stats["pipes_created"] <= 2 and stats["pipes_live"] == stats["pipes_created"]


@needs_native
@pytest.mark.parametrize("copy", ["splice", "buffer"])
def test_copy_splice_always_splices_and_copy_buffer_never_does(copy: str) -> None:
    payload = pattern(1 << 20)
    with tcp_upstream(echo) as port, \
            running_proxy(tcp_listener(port, copy=copy, relay="native")) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=15) as sock:
        sock.sendall(b"hello")
        assert sock.recv(64) == b"hello"
        assert exchange(sock, payload) == payload
        seen = detail(proxy, only_relay(proxy))
    copied = seen["copied_up"] + seen["copied_down"]
    leases = seen["leases_up"] + seen["leases_down"]
    if copy == "splice":
        assert copied == 0 and leases >= 2
    else:
        assert copied == 2 * (len(payload) + 5) and leases == 0


@needs_native
def test_no_pipe_to_be_had_copies_through_the_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine with no pipe budget (MAX_PIPES 0, as when the kernel refuses) still
    moves every byte, by copying."""
    monkeypatch.setattr(native_mod, "MAX_PIPES", 0)
    payload = pattern(2 << 20)
    with tcp_upstream(echo) as port, \
            running_proxy(tcp_listener(port, copy="splice", relay="native")) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=15) as sock:
        assert exchange(sock, payload) == payload
        seen = detail(proxy, only_relay(proxy))
        stats = proxy.call(lambda: hub_for(proxy.loop).stats())  # type: ignore[arg-type]
    assert seen["copied_up"] == seen["copied_down"] == len(payload)
    assert stats["pipes_created"] == 0 and stats["pipe_busy"] >= 1


_UNPRIVILEGED = r"""
import json, os, socket, sys
sys.path.insert(0, sys.argv[1])
from proxy.relay.engine import hub_for
from tests.support import drop_to_uid_without_pipe_budget, running_proxy, tcp_listener
from tests.test_native import exchange
from tests.upstreams import echo, pattern, tcp_upstream

def run():
    payload = pattern(1 << 20)
    with tcp_upstream(echo) as port, \
            running_proxy(tcp_listener(port, copy="splice", relay="native")) as proxy:
        ok = True
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=15) as s:
                ok = ok and exchange(s, payload) == payload
        return ok, proxy.call(lambda: hub_for(proxy.loop).stats())

run()  # as root first: every lazy import happens while /root (0700) is still readable
uid = int(sys.argv[2])
held = drop_to_uid_without_pipe_budget(uid)
if held is None:
    print(json.dumps({"skip": "the kernel never refused a 1 MiB pipe"}))
    sys.exit(0)
ok, stats = run()
print(json.dumps({"ok": ok, **stats}))
"""


@needs_native
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as a spare uid")
def test_kernel_refusing_large_pipes_to_an_unprivileged_user_falls_back(tmp_path: Path) -> None:
    """A real refusal: a child drops to a spare uid, uses up that uid's pipe budget
    (fs.pipe-user-pages-soft), then relays through the engine with copy: splice."""
    soft = Path("/proc/sys/fs/pipe-user-pages-soft").read_text().strip()
    if soft == "0":
        pytest.skip("fs.pipe-user-pages-soft is 0 (no per-user pipe budget)")
    uid = 65000 + os.getpid() % 500  # unused by anyone else (test_splice: 64000-64999)
    out = subprocess.run([sys.executable, "-c", _UNPRIVILEGED, str(ROOT), str(uid)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["ok"], result
    assert result["pipe_failures"] >= 1 and result["pipes_live"] == 0, result
    assert result["pipe_errno"] == errno.EPERM, result


@needs_native
def test_the_engine_owns_what_it_is_handed_even_when_it_refuses() -> None:
    engine = native_mod._engine.Engine()  # type: ignore[union-attr]
    a, b = socket.socketpair()
    fds = a.detach(), b.detach()
    with pytest.raises(ValueError, match="bad mode"):
        engine.add(*fds, 7, 65536, 16384)
    for fd in fds:
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF
    engine.stop()
    c, d = socket.socketpair()
    fds = c.detach(), d.detach()
    with pytest.raises(RuntimeError, match="closed"):
        engine.add(*fds, 0, 65536, 16384)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@needs_native
def test_a_stopped_proxy_resets_live_connections_and_ends_the_engine_thread() -> None:
    gc.collect()
    before = _threads()
    with tcp_upstream(echo) as port:
        with running_proxy(tcp_listener(port)) as proxy:
            sock = socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=10)
            sock.sendall(b"x")
            assert sock.recv(8) == b"x"
            engines = proxy.call(lambda: hub_for(asyncio.get_running_loop()).engines)
            assert len(engines) == 1  # one connection: one engine thread started
            assert _threads() >= before + 2  # the proxy's loop thread and the engine's
        try:
            assert sock.recv(8) == b""  # stop closes what is left
        except ConnectionResetError:
            pass
        sock.close()
        del proxy
        gc.collect()
        wait_until(lambda: engines[0].closed, 5, message="the engine to stop with its loop")
    wait_until(lambda: _threads() <= before, 5, message="the engine thread to end")


@needs_native
def test_many_connections_open_and_close_while_others_stream(loop_kind: str) -> None:
    """Slots are reused while a neighbour streams: no connection sees another's bytes."""
    payload = pattern(1 << 20)
    with tcp_upstream(echo) as port, running_proxy(tcp_listener(port), loop_kind) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=15) as big:
        got: list[bytes] = []
        streamer = threading.Thread(target=lambda: got.append(exchange(big, payload * 8)))
        streamer.start()
        for i in range(200):
            with socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=10) as s:
                msg = f"hello {i}\r\n".encode()
                s.sendall(msg)
                assert s.recv(64) == msg
        streamer.join(30)
        assert got == [payload * 8]
        wait_until(lambda: proxy.call(
            lambda: len(proxy.server.listeners["t"].relays)) == 1, 5,
            message="the short connections to be reaped")


@pytest.mark.parametrize(("extra", "defaults", "expected"), [
    ({"relay": "c"}, {}, "field 'relay': expected one of auto, native, python, got 'c'"),
])
def test_relay_setting_is_validated(extra: dict[str, Any],
                                    defaults: dict[str, Any], expected: str) -> None:
    listener = {"name": "x", "listen": "127.0.0.1:7000", "upstream": "127.0.0.1:7001", **extra}
    top = {"defaults": defaults} if defaults else {}
    with pytest.raises(ConfigError) as info:
        make_config([listener], **top)
    assert "listener 'x'" in str(info.value)
    assert expected in str(info.value)


def test_relay_auto_falls_back_quietly_and_native_says_once_when_not_built(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(native_mod, "_engine", None)
    monkeypatch.setattr(native_mod, "_unavailable_logged", False)
    config = make_config([{"name": "a", "listen": "127.0.0.1:7000", "upstream": "127.0.0.1:7001"},
                          {"name": "n", "listen": "127.0.0.1:7002", "upstream": "127.0.0.1:7003",
                           "relay": "native"}])
    loop = asyncio.new_event_loop()
    try:
        for _ in range(2):
            for lc in config.listeners:
                assert native_mod.choose_native(loop, lc) is None
    finally:
        loop.close()
    said = [r.getMessage() for r in caplog.records if "not built" in r.getMessage()]
    assert len(said) == 1 and "listener n" in said[0]


def _lanes(proxy: Any) -> list[int]:
    """Live connections per engine thread of the proxy's hub."""
    return proxy.call(lambda: [len(lane.relays) for lane in hub_for(proxy.loop).lanes])  # type: ignore[no-any-return]


def _echoes(socks: list[socket.socket], payload: bytes) -> bool:
    return all(exchange(sock, payload) == payload for sock in socks)


@needs_native
def test_connections_spread_over_the_engine_threads() -> None:
    """engine_threads: 2 -- the second connection starts a second engine and each new
    one goes to the engine holding the fewest; every byte still arrives on each."""
    payload = pattern(256 << 10)
    with tcp_upstream(echo) as port, \
            running_proxy(tcp_listener(port), engine_threads=2) as proxy:
        socks = [socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=15)
                 for _ in range(5)]
        try:
            assert _echoes(socks, payload)
            assert sorted(_lanes(proxy)) == [2, 3]
            socks.pop(0).close()
            socks.pop(0).close()
            wait_until(lambda: sum(_lanes(proxy)) == 3, 5, message="two connections to end")
            socks += [socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=15)
                      for _ in range(3)]
            assert _echoes(socks, payload)
            assert sorted(_lanes(proxy)) == [3, 3]
            stats = proxy.call(lambda: hub_for(proxy.loop).stats())  # type: ignore[arg-type]
            assert stats["engines"] == 2 and stats["live"] == 6
        finally:
            for sock in socks:
                sock.close()


@needs_native
def test_one_engine_thread_holds_every_connection_when_so_configured() -> None:
    with tcp_upstream(echo) as port, \
            running_proxy(tcp_listener(port), engine_threads=1) as proxy:
        socks = [socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=15)
                 for _ in range(4)]
        try:
            assert _echoes(socks, b"ping\r\n" * 100)
            assert _lanes(proxy) == [4]
        finally:
            for sock in socks:
                sock.close()


@needs_native
def test_a_reload_to_fewer_engine_threads_keeps_live_connections_and_stops_the_extra_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_mod, "IDLE_TRIM", 0.05)
    with tcp_upstream(echo) as port, ExitStack() as open_socks, \
            running_proxy(tcp_listener(port), engine_threads=2) as proxy:
        def connect() -> socket.socket:
            return open_socks.enter_context(
                socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=15))

        # One at a time: two connections opened together reach the engines in the
        # order their upstream connects finish, which need not be the order opened.
        socks = []
        for lanes in ([1], [1, 1]):
            socks.append(connect())
            assert _echoes(socks[-1:], b"x" * 1000)
            assert _lanes(proxy) == lanes
        second = proxy.call(lambda: hub_for(proxy.loop).engines[1])  # type: ignore[arg-type]
        proxy.call(lambda: proxy.server.reload(
            make_config(tcp_listener(port), engine_threads=1)))
        socks.append(connect())
        assert _echoes(socks, b"y" * 1000)  # the connection on engine 2 still relays
        assert _lanes(proxy) == [2, 1]
        socks.pop(1).close()  # the one on the second engine
        wait_until(lambda: second.closed, 5, message="the unused engine to stop")
        assert _lanes(proxy) == [2]
        assert _echoes(socks, b"z" * 1000)


def test_engine_threads_auto_shares_the_cpus_among_the_workers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    assert native_mod.engine_threads(None) == 4
    monkeypatch.setenv(WORKERS_ENV, "2")
    assert native_mod.engine_threads(None) == 2
    monkeypatch.setenv(WORKERS_ENV, "8")
    assert native_mod.engine_threads(None) == 1
    assert native_mod.engine_threads(3) == 3
    assert make_config(tcp_listener(7001), engine_threads="auto").engine_threads is None
    assert make_config(tcp_listener(7001), engine_threads=2).engine_threads == 2


@pytest.mark.parametrize("value", [0, 65, "many", True, 1.5])
def test_engine_threads_is_validated(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(tcp_listener(7001), engine_threads=value)
    assert "field 'engine_threads': expected a number of engine threads from 1 to 64 or auto" \
        in str(info.value)


def _engine_polls(proxy: Any) -> list[float]:
    return proxy.call(  # type: ignore[no-any-return]
        lambda: [lane.engine.busy_poll_us for lane in hub_for(proxy.loop).lanes])


@needs_native
@pytest.mark.parametrize("busy_poll", ["50us", "off"])
def test_busy_poll_on_and_off_relay_a_real_client_byte_exact(
        busy_poll: str, redis_server: ServerProcess) -> None:
    """The spin after a batch changes when the thread sleeps, not what it moves: redis-py's
    round trips and a 256 KiB value come back whole either way, and a reload takes the new
    setting into the live engine."""
    import redis

    listeners = [{"name": "r", "listen": "127.0.0.1:0", "upstream": redis_server.address,
                  "protocol": "redis"}]
    with running_proxy(listeners, busy_poll=busy_poll) as proxy:
        client = redis.Redis(host="127.0.0.1", port=proxy.port("r"), socket_timeout=10)
        try:
            value = pattern(256 << 10)
            for i in range(200):
                assert client.set(f"k{i}", value[i:i + 100])
                assert client.get(f"k{i}") == value[i:i + 100]
            assert client.set("big", value) and client.get("big") == value
            assert _engine_polls(proxy) == [50.0 if busy_poll == "50us" else 0.0]
            proxy.call(lambda: proxy.server.reload(make_config(listeners, busy_poll="200us")))
            assert _engine_polls(proxy) == [200.0]
            assert client.get("big") == value  # the live connection relays on
        finally:
            client.close()


def test_busy_poll_defaults_to_50us_and_parses_durations_and_off() -> None:
    assert make_config(tcp_listener(7001)).busy_poll_us == 50.0
    for value, us in [("50us", 50.0), ("50µs", 50.0), ("0.2ms", 200.0), ("1ms", 1000.0),
                      ("off", 0.0), (False, 0.0), (0, 0.0), ("0us", 0.0), (0.0001, 100.0)]:
        assert make_config(tcp_listener(7001), busy_poll=value).busy_poll_us == \
            pytest.approx(us), value


@pytest.mark.parametrize("value", ["2ms", 1, "fast", True, -5, [50]])
def test_busy_poll_is_validated(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(tcp_listener(7001), busy_poll=value)
    assert "field 'busy_poll': expected a duration up to 1000us" in str(info.value)


@needs_native
def test_the_engine_refuses_a_busy_poll_out_of_range() -> None:
    assert native_mod._engine is not None
    with pytest.raises(ValueError):
        native_mod._engine.Engine(busy_poll_us=1001.0)
    engine = native_mod._engine.Engine(busy_poll_us=20.0)
    try:
        assert engine.busy_poll_us == 20.0
        for bad in (-1.0, 5000.0, float("nan"), "x"):
            with pytest.raises((ValueError, TypeError)):
                engine.busy_poll_us = bad
        assert engine.busy_poll_us == 20.0
        engine.busy_poll_us = 0
        assert engine.busy_poll_us == 0.0
    finally:
        engine.stop()
