"""The splice path: it is taken, pipes are pooled, refusals fall back, resets never hang.

Relay-level tests drive a ``SpliceRelay`` on a loop of their own with real TCP
socket pairs, to set up exact kernel states (bytes and an RST queued before the
first read); listener-level tests go through a real cacheport.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import json
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import proxy.relay.splice as splice_mod
import proxy.relay.splice_hub as hub_mod
import proxy.relay.splice_way as way_mod
from proxy.config import ConfigError
from proxy.relay.buffered import BufferPool, Relay
from proxy.relay.pipes import SMALL_READS, PipePool, open_pipe
from proxy.relay.splice import SpliceRelay
from proxy.relay.splice_hub import SpliceHub, hub_for
from tests.support import (
    ROOT,
    ServerProcess,
    make_config,
    only_relay,
    running_proxy,
    start_server,
    wait_until,
)
from tests.support import tcp_listener as support_tcp_listener
from tests.upstreams import echo, pattern, tcp_upstream

_RST = struct.pack("ii", 1, 0)


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()  # type: ignore[no-any-return]
    return asyncio.new_event_loop()


def run_on(kind: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    loop = new_loop(kind)
    try:
        return loop.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        loop.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (the relay needs real TCP, not a socketpair)."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
    return a, b


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    sock.close()


def has_pending_error(sock: socket.socket) -> bool:
    """POLLERR without consuming the error (SO_ERROR would)."""
    poller = select.poll()
    poller.register(sock, 0)
    return any(events & select.POLLERR for _, events in poller.poll(0))


@contextmanager
def relay_pair(hub: SpliceHub, loop: asyncio.AbstractEventLoop,
               closed: asyncio.Event) -> Iterator[tuple[SpliceRelay, socket.socket,
                                                         socket.socket]]:
    """A splice relay between two fresh pairs; yields (relay, client peer, upstream peer)."""
    client_peer, client_end = tcp_pair()
    upstream_end, upstream_peer = tcp_pair()
    for s in (client_end, upstream_end, client_peer, upstream_peer):
        s.setblocking(False)
    relay = SpliceRelay(hub, BufferPool(1 << 16), lambda _r: closed.set())
    relay.attach(loop, client_end, upstream_end)
    try:
        yield relay, client_peer, upstream_peer
    finally:
        relay.abort()
        client_peer.close()
        upstream_peer.close()


async def closes_within(closed: asyncio.Event, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            await closed.wait()
    except TimeoutError:
        return False
    return True


# -- uvloop's dropped watchers -------------------------------------------------------


@pytest.mark.parametrize("watchdog", [True, False], ids=["watchdog", "no-watchdog"])
def test_reset_queued_behind_data_closes_the_relay(loop_kind: str, watchdog: bool) -> None:
    """Bytes and then an RST wait in the upstream socket before the relay's first read.

    The first read gets the bytes, not the error. On uvloop the poll handle saw EPOLLERR,
    ran the callback once and closed, so no loop watcher would ever read the socket
    again: the watchdog probes the relay that moved bytes, and without it the relay
    still parks on the next idle tick, where the hub's epoll set reports the error.
    asyncio polls again.
    """

    async def main() -> tuple[bool, bytes]:
        loop = asyncio.get_running_loop()
        hub = SpliceHub(loop, watchdog=watchdog)
        closed = asyncio.Event()
        with relay_pair(hub, loop, closed) as (relay, client_peer, upstream_peer):
            upstream_peer.setblocking(True)
            upstream_peer.sendall(b"a reply that arrives just before the reset")
            reset(upstream_peer)
            deadline = time.monotonic() + 5
            while not has_pending_error(relay.upstream_sock):  # type: ignore[arg-type]
                assert time.monotonic() < deadline, "the RST never arrived"
                await asyncio.sleep(0.005)
            relay.start()
            done = await closes_within(closed, 3.0)
            got = b""
            try:
                got = await loop.sock_recv(client_peer, 1024)
            except OSError:
                pass
            return done, got

    done, got = run_on(loop_kind, main)
    assert done, "the relay never noticed the upstream's reset"
    assert got in (b"", b"a reply that arrives just before the reset")


def test_socket_numbers_reused_after_a_dropped_watcher_still_relay(loop_kind: str) -> None:
    """The relay unregisters before closing, so a new socket on the same number works."""

    async def main() -> tuple[set[int], set[int], bytes, bytes]:
        loop = asyncio.get_running_loop()
        hub = SpliceHub(loop, watchdog=True)
        closed = asyncio.Event()
        with relay_pair(hub, loop, closed) as (relay, _client_peer, upstream_peer):
            old = set(relay.fds)
            upstream_peer.setblocking(True)
            upstream_peer.sendall(b"x" * 1000)
            reset(upstream_peer)
            deadline = time.monotonic() + 5
            while not has_pending_error(relay.upstream_sock):  # type: ignore[arg-type]
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            relay.start()
            assert await closes_within(closed, 3)
        closed2 = asyncio.Event()
        with relay_pair(hub, loop, closed2) as (relay2, client_peer, upstream_peer):
            new = set(relay2.fds)
            relay2.start()
            await loop.sock_sendall(client_peer, b"ping")
            up = await asyncio.wait_for(loop.sock_recv(upstream_peer, 10), 5)
            await loop.sock_sendall(upstream_peer, b"pong")
            down = await asyncio.wait_for(loop.sock_recv(client_peer, 10), 5)
        return old, new, up, down

    old, new, up, down = run_on(loop_kind, main)
    assert (up, down) == (b"ping", b"pong")
    if not old & new:
        # Another thread (or a socket awaiting collection) took the freed numbers first;
        # the relay still worked, but this run could not show the reuse case.
        pytest.skip(f"no descriptor number was reused ({old} vs {new})")


def test_loop_report_of_a_closed_watcher_probes_every_relay(
        loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop versions that report the poll error to the loop's exception handler
    (a bare ``{'exception': OSError(EBADF)}``) get every relay probed at once."""
    monkeypatch.setattr(hub_mod, "PARK_TICK", 60.0)  # only the report may act
    forwarded: list[dict[str, Any]] = []

    async def main() -> tuple[bool, int]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: forwarded.append(ctx))
        hub = SpliceHub(loop, watchdog=True)
        closed = asyncio.Event()
        with relay_pair(hub, loop, closed) as (relay, _client_peer, upstream_peer):
            relay.start()
            for fd in relay.fds:  # as if the loop had silently dropped the watchers
                loop.remove_reader(fd)
            upstream_peer.setblocking(True)
            reset(upstream_peer)
            deadline = time.monotonic() + 5
            while not has_pending_error(relay.upstream_sock):  # type: ignore[arg-type]
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            assert not closed.is_set()
            loop.call_exception_handler({"exception": OSError(errno.EBADF, "bad fd")})
            cut = closed.is_set()
            loop.call_exception_handler({"message": "someone else's problem"})
            return cut, hub.loop_reports

    cut, reports = run_on(loop_kind, main)
    assert cut and reports == 1
    assert forwarded == [{"message": "someone else's problem"}]


# -- idle relays park in the hub's epoll set ---------------------------------------------


async def until(predicate: Callable[[], object], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {seconds}s waiting for {what}"
        await asyncio.sleep(0.01)


def loop_watches(hub: SpliceHub, fd: int) -> bool:
    """Whether an epoll set other than the hub's (the loop's own) watches ``fd``: the
    kernel lists every registered descriptor in /proc/self/fdinfo, for both loop kinds."""
    for entry in os.listdir("/proc/self/fd"):
        if int(entry) == hub.epoll.fileno():
            continue
        try:
            if os.readlink(f"/proc/self/fd/{entry}") != "anon_inode:[eventpoll]":
                continue
            info = Path(f"/proc/self/fdinfo/{entry}").read_text()
        except OSError:
            continue
        if any(line.split()[1] == str(fd) for line in info.splitlines()
               if line.startswith("tfd:")):
            return True
    return False


def test_an_idle_relay_parks_and_wakes_for_either_side(loop_kind: str) -> None:
    """No bytes for a tick: both sockets leave the loop's watchers for the hub's epoll
    set; a byte from either peer wakes the relay and arrives, and it parks again."""

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        hub = SpliceHub(loop)
        closed = asyncio.Event()
        got = []
        with relay_pair(hub, loop, closed) as (relay, client_peer, upstream_peer):
            relay.start()
            assert not relay.parked and relay in hub.live
            # (libuv hands a new watcher to the kernel on the loop's next round)
            await until(lambda: all(loop_watches(hub, fd) for fd in relay.fds), 0.2,
                        "the loop to watch both sockets")
            for sender, receiver, payload in ((client_peer, upstream_peer, b"GET k\r\n"),
                                              (upstream_peer, client_peer, b"VALUE k\r\n")):
                await until(lambda: relay.parked, 3, "the relay to park")
                assert not any(loop_watches(hub, fd) for fd in relay.fds)
                assert relay not in hub.live and set(hub.parked) == set(relay.fds)
                await loop.sock_sendall(sender, payload)
                got.append(await asyncio.wait_for(loop.sock_recv(receiver, 100), 5))
                assert not relay.parked and relay in hub.live
            # (libuv hands a new watcher to the kernel on the loop's next round)
            await until(lambda: all(loop_watches(hub, fd) for fd in relay.fds), 0.2,
                        "the loop to watch both sockets")
            await until(lambda: relay.parked, 3, "the relay to park again")
            client_peer.shutdown(socket.SHUT_WR)  # a FIN wakes it too, and passes through
            got.append(await asyncio.wait_for(loop.sock_recv(upstream_peer, 100), 5))
            assert not closed.is_set()
        assert hub.parks >= 3 and not hub.parked
        return got

    assert run_on(loop_kind, main) == [b"GET k\r\n", b"VALUE k\r\n", b""]


def test_a_burst_of_parked_relays_hands_the_heap_back(
        loop_kind: str, memcached: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many relays parking in one tick trim the C heap (their watchers' memory), and
    every connection still works afterwards."""
    if hub_mod._MALLOC_TRIM is None:
        pytest.skip("this C library has no malloc_trim")
    monkeypatch.setattr(hub_mod, "TRIM_PARKS", 8)  # 40 relays park in a tick or three
    count = 40
    with running_proxy([{"name": "m", "listen": "127.0.0.1:0", "upstream": memcached.address,
                         "protocol": "memcached", "relay": "python"}], loop_kind) as proxy:
        port = proxy.port("m")
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5)
                 for _ in range(count)]
        try:
            for sock in socks:
                sock.sendall(b"version\r\n")
            assert all(sock.recv(100).startswith(b"VERSION") for sock in socks)

            def hub() -> SpliceHub:
                return hub_for(asyncio.get_running_loop())

            wait_until(lambda: proxy.call(lambda: len(hub().parked)) == 2 * count, 5,
                       message="every relay to park")
            assert proxy.call(lambda: hub().heap_trims) >= 1
            for sock in socks:
                sock.sendall(b"version\r\n")
            assert all(sock.recv(100).startswith(b"VERSION") for sock in socks)
        finally:
            for sock in socks:
                sock.close()


def test_a_parked_relay_notices_a_reset(loop_kind: str) -> None:
    async def main() -> bool:
        loop = asyncio.get_running_loop()
        hub = SpliceHub(loop, watchdog=False)  # only the epoll set may see it
        closed = asyncio.Event()
        with relay_pair(hub, loop, closed) as (relay, client_peer, upstream_peer):
            relay.start()
            await until(lambda: relay.parked, 3, "the relay to park")
            reset(upstream_peer)
            done = await closes_within(closed, 3)
            with pytest.raises(OSError):  # the client got an RST, not a clean FIN
                client_peer.setblocking(True)
                client_peer.settimeout(5)
                if not client_peer.recv(10):
                    raise AssertionError("a FIN instead of a reset")
            return done

    assert run_on(loop_kind, main)


def test_a_stalled_relay_parks_and_resumes_when_the_reader_drains(loop_kind: str) -> None:
    """A client that stops reading: the relay stalls on it, parks waiting for
    writability, and delivers every byte once the client reads again."""
    payload = pattern(8 << 20)

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        hub = SpliceHub(loop)
        closed = asyncio.Event()
        with relay_pair(hub, loop, closed) as (relay, client_peer, upstream_peer):
            relay.start()
            upstream_peer.setblocking(True)
            sender = threading.Thread(target=upstream_peer.sendall, args=(payload,))
            sender.start()
            await until(lambda: relay.down.stalled and relay.parked, 5,
                        "the relay to stall on the client and park")
            assert relay.umask == 0  # not reading the upstream: backpressure holds
            chunks, got = [], 0
            while got < len(payload):
                chunk = await asyncio.wait_for(loop.sock_recv(client_peer, 1 << 20), 10)
                assert chunk, "closed early"
                chunks.append(chunk)
                got += len(chunk)
            await asyncio.to_thread(sender.join, 10)
            return b"".join(chunks)

    assert hashlib.sha256(run_on(loop_kind, main)).digest() == hashlib.sha256(payload).digest()


# -- the path is taken, pipes are pooled ------------------------------------------------


def tcp_listener(port: int, **extra: object) -> list[dict[str, object]]:
    """``tests.support.tcp_listener`` on the Python relays, which this file tests, unless
    ``copy`` names another (a ``copy_mode`` name)."""
    if "copy" not in extra:
        extra.setdefault("relay", "python")
    return support_tcp_listener(port, **extra)


def exchange(port: int, payload: bytes,
             before_close: Callable[[], object] | None = None) -> bytes:
    """Send ``payload`` and read the same number of bytes back (an echo upstream)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        chunks, got = [], 0
        while got < len(payload):
            chunk = sock.recv(1 << 20)
            assert chunk, "closed early"
            chunks.append(chunk)
            got += len(chunk)
        sender.join(15)
        if before_close is not None:
            before_close()
        return b"".join(chunks)


def test_auto_copies_small_reads_and_splices_bulk(
        loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default for a tcp listener: request/response bytes go through the buffer,
    a bulk transfer through pipes (counted through the ``_splice`` seam)."""
    calls = [0]
    real = way_mod._splice

    def counting(*args: Any) -> int:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(way_mod, "_splice", counting)
    payload = pattern(4 << 20)
    with tcp_upstream(echo) as port, running_proxy(tcp_listener(port), loop_kind) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=15) as sock:
            for _ in range(20):
                sock.sendall(b"GET key\r\n")
                assert sock.recv(64) == b"GET key\r\n"
            small = only_relay(proxy)
            assert isinstance(small, SpliceRelay)
            assert small.bytes_buffered == small.bytes_total == 360
            assert calls[0] == 0 and small.pipe_leases == 0
        bulk: list[SpliceRelay] = []
        assert exchange(proxy.port("t"), payload,
                        lambda: bulk.append(only_relay(proxy))) == payload
        pipes = proxy.call(lambda: hub_for(proxy.loop).pipes)  # type: ignore[arg-type]
        assert pipes.created >= 1
    assert calls[0] >= 4
    assert bulk[0].bytes_buffered < bulk[0].bytes_total // 4, "bulk did not splice"


def test_auto_goes_back_to_copying_when_the_bulk_is_over(loop_kind: str) -> None:
    payload = pattern(2 << 20)
    with tcp_upstream(echo) as port, running_proxy(tcp_listener(port), loop_kind) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=15) as sock:
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            got = 0
            while got < len(payload):
                got += len(sock.recv(1 << 20))
            sender.join(15)
            relay = only_relay(proxy)
            before = proxy.call(lambda: relay.bytes_buffered)
            for _ in range(10):
                sock.sendall(b"small\r\n")
                assert sock.recv(64) == b"small\r\n"
            after = proxy.call(lambda: (relay.bytes_buffered, relay.up.bulk, relay.down.bulk))
    assert before < len(payload) // 2
    # The first SMALL_READS small reads of each direction may still splice (a lone small
    # read is usually the tail of a large reply); every one after them is copied.
    spliced = 2 * SMALL_READS * 7
    assert before + 140 - spliced <= after[0] <= before + 140
    assert after[1:] == (False, False)


def test_copy_splice_splices_every_byte(loop_kind: str) -> None:
    payload = pattern(1 << 20)
    with tcp_upstream(echo) as port, \
            running_proxy(tcp_listener(port, copy="splice"), loop_kind) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=15) as sock:
            sock.sendall(b"hello")
            assert sock.recv(10) == b"hello"
            small = only_relay(proxy)
        relays: list[SpliceRelay] = []
        assert exchange(proxy.port("t"), payload,
                        lambda: relays.append(only_relay(proxy))) == payload
        created = proxy.call(lambda: hub_for(proxy.loop).pipes.created)  # type: ignore[arg-type]
    assert small.bytes_buffered == 0 and small.bytes_total == 10
    assert relays[0].bytes_buffered == 0 and relays[0].bytes_total == 2 << 20
    assert created >= 1


def test_copy_buffer_never_splices_and_protocol_listeners_do(redis_server: Any) -> None:
    """``protocol`` only picks the health check: a plain redis listener splices too."""
    with tcp_upstream(echo) as port, running_proxy(
            [*tcp_listener(port, copy="buffer"),
             {"name": "r", "listen": "127.0.0.1:0", "upstream": redis_server.address,
              "protocol": "redis", "relay": "python"}]) as proxy:
        for name, hello, kind in (("t", b"hi", Relay), ("r", b"PING\r\n", SpliceRelay)):
            with socket.create_connection(("127.0.0.1", proxy.port(name)), timeout=10) as s:
                s.sendall(hello)
                assert s.recv(10)
                assert type(only_relay(proxy, name)) is kind, name


def test_pipes_are_leased_per_burst_and_reused(loop_kind: str) -> None:
    """Thirty connections in a row and forty idle ones need only a couple of pipes,
    and an idle loop gives them back."""
    with tcp_upstream(echo) as port, running_proxy(tcp_listener(port), loop_kind) as proxy:
        pipes: PipePool = proxy.call(lambda: hub_for(proxy.loop).pipes)  # type: ignore[arg-type]
        assert pipes.live == 0  # created lazily
        payload = pattern(256 << 10)
        for _ in range(30):
            assert exchange(proxy.port("t"), payload) == payload
        idle = [socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=10)
                for _ in range(40)]
        try:
            for s in idle:
                s.sendall(b"ping")
                assert s.recv(10) == b"ping"
            state = proxy.call(lambda: (pipes.live, len(pipes.free), pipes.created))
        finally:
            for s in idle:
                s.close()
        # With no relay left the pool is handed back to the kernel (after IDLE_TRIM).
        wait_until(lambda: proxy.call(lambda: pipes.live) == 0, 5, message="an idle trim")
    live, free, created = state
    assert 1 <= created <= 4, state
    assert live == free == created, "an idle connection kept a pipe"


def test_refused_pipes_fall_back_to_the_buffer_logged_once(
        loop_kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """F_SETPIPE_SZ refused (seam): bytes still arrive, one warning, no client error."""

    def refuse(size: int) -> tuple[int, int]:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    payload = pattern(2 << 20)
    caplog.set_level(logging.WARNING, logger="cacheport.splice")
    with tcp_upstream(echo) as port, \
            running_proxy(tcp_listener(port, copy="splice"), loop_kind) as proxy:

        def install() -> None:
            hub_for(proxy.loop).pipes.opener = refuse  # type: ignore[arg-type]

        proxy.call(install)
        relays: list[SpliceRelay] = []
        for _ in range(3):
            assert exchange(proxy.port("t"), payload,
                            lambda: relays.append(only_relay(proxy))) == payload
        failures = proxy.call(lambda: hub_for(proxy.loop).pipes.failures)  # type: ignore[arg-type]
    warnings = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert failures == 1  # then it waits REFUSED_RETRY before asking the kernel again
    assert all(r.bytes_buffered == r.bytes_total == 2 * len(payload) for r in relays)


_UNPRIVILEGED = r"""
import json, os, socket, sys, threading
sys.path.insert(0, sys.argv[1])
from proxy.relay.splice_hub import hub_for
from tests.support import drop_to_uid_without_pipe_budget, running_proxy
from tests.test_splice import exchange, tcp_listener
from tests.upstreams import echo, pattern, tcp_upstream

def run():
    payload = pattern(1 << 20)
    with tcp_upstream(echo) as port, running_proxy(tcp_listener(port), sys.argv[2]) as proxy:
        ok = all(exchange(proxy.port("t"), payload) == payload for _ in range(3))
        return ok, proxy.call(lambda: hub_for(proxy.loop).pipes)

run()  # as root first: every lazy import happens while /root (0700) is still readable
uid = int(sys.argv[3])
held = drop_to_uid_without_pipe_budget(uid)
if held is None:
    print(json.dumps({"skip": "the kernel never refused a 1 MiB pipe"}))
    sys.exit(0)
ok, pipes = run()
print(json.dumps({"ok": ok, "held": len(held), "failures": pipes.failures,
                  "live": pipes.live, "refused": pipes.refused}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as a spare uid")
def test_kernel_refusing_large_pipes_to_an_unprivileged_user_falls_back(
        loop_kind: str, tmp_path: Path) -> None:
    """A real refusal: a child drops to a spare uid, uses up that uid's pipe budget
    (fs.pipe-user-pages-soft, per user), then runs cacheport and moves bytes."""
    soft = Path("/proc/sys/fs/pipe-user-pages-soft").read_text().strip()
    if soft == "0":
        pytest.skip("fs.pipe-user-pages-soft is 0 (no per-user pipe budget)")
    # Unused by anyone else, and apart from test_native's 65000-65499 (the budget is per
    # uid, machine-wide: two tests on one uid at once would share it).
    uid = 64000 + (os.getpid() % 500) * 2 + (loop_kind == "asyncio")
    out = subprocess.run(
        [sys.executable, "-c", _UNPRIVILEGED, str(ROOT), loop_kind, str(uid)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["ok"], result
    assert result["failures"] >= 1 and result["live"] == 0, result
    assert "not permitted" in (result["refused"] or "").lower(), result


def test_open_pipe_has_the_requested_size() -> None:
    import fcntl

    r, w = open_pipe(1 << 20)
    try:
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == 1 << 20
        assert os.get_blocking(r) is False and os.get_blocking(w) is False
    finally:
        os.close(r)
        os.close(w)


def test_pool_limit_and_trim() -> None:
    pool = PipePool(size=1 << 16, limit=2)
    a, b = pool.create(), pool.create()
    assert a is not None and b is not None
    assert pool.create() is None and pool.failures == 0 and pool.busy == 1  # not a refusal
    pool.free.extend([a, b])
    pool.trim()
    assert pool.live == 0 and not pool.free
    with pytest.raises(OSError):
        os.fstat(a[0])


def test_a_cut_relays_pipe_is_emptied_and_pooled_again() -> None:
    pool = PipePool(size=1 << 20)
    pipe = pool.create()
    assert pipe is not None
    os.write(pipe[1], b"z" * (300 << 10))  # bytes a cut relay left behind
    pool.recycle(pipe, memoryview(bytearray(64 << 10)))
    assert pool.free == [pipe] and pool.live == 1
    with pytest.raises(BlockingIOError):
        os.read(pipe[0], 1)  # empty
    pool.trim()


def open_pipes() -> set[str]:
    """``pipe:[inode]`` of every pipe this process has open."""
    links = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            links.add(os.readlink(f"/proc/self/fd/{fd}"))
    return {link for link in links if link.startswith("pipe:")}


def test_pooled_pipes_close_with_their_loop(loop_kind: str) -> None:
    """Nothing holds a loop for its hub: once the loop is gone, so are its pipes."""
    loop = new_loop(loop_kind)

    async def main() -> set[str]:
        running = asyncio.get_running_loop()
        hub = hub_for(running)
        closed = asyncio.Event()
        with relay_pair(hub, running, closed) as (relay, client, up):
            relay.start()
            await running.sock_sendall(client, b"ping" * 1000)
            got = 0
            while got < 4000:
                got += len(await asyncio.wait_for(running.sock_recv(up, 8192), 5))
        return {os.readlink(f"/proc/self/fd/{fd}") for pipe in hub.pipes.free for fd in pipe}

    pooled = loop.run_until_complete(main())
    assert pooled, "no pipe was pooled"
    loop.close()
    ref = weakref.ref(loop)
    del loop
    gc.collect()
    assert ref() is None, "something still holds the loop"
    assert not pooled & open_pipes()


# -- resets mid-transfer, byte-exactness, both paths --------------------------------------


def test_upstream_reset_mid_transfer_resets_the_client(loop_kind: str, copy_mode: str) -> None:
    """The upstream resets with bytes in flight everywhere on the way (its queue, ours,
    the pipe, the client's): the client gets an exact prefix and then a reset."""
    size = 32 << 20
    payload = pattern(size)
    cut: list[bool] = []  # whether the upstream reset with part of the payload unsent

    def push_then_reset(conn: socket.socket) -> None:
        conn.settimeout(0.5)
        try:
            conn.sendall(payload)  # the client does not read yet: this times out
            cut.append(False)  # (unless, on a loaded machine, this thread ran late)
        except TimeoutError:
            cut.append(True)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)

    with tcp_upstream(push_then_reset) as port, \
            running_proxy(tcp_listener(port, copy=copy_mode), loop_kind) as proxy:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", proxy.port("t")))
        wait_until(lambda: proxy.server.active == 1, 5)
        time.sleep(0.8)  # let the upstream give up and reset while everything is full
        received = bytearray()
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                received += chunk
            raise AssertionError(f"clean EOF after {len(received)} bytes, expected a reset")
        sock.close()
        wait_until(lambda: proxy.server.active == 0, 5, message="relay to close")
    assert 0 < len(received) and (len(received) < size or cut == [False])
    assert received == payload[:len(received)]


def test_client_reset_mid_transfer_resets_the_upstream(loop_kind: str, copy_mode: str) -> None:
    size = 32 << 20
    payload = pattern(size)
    seen: list[str] = []
    got = [0]

    def slow_reader(conn: socket.socket) -> None:
        conn.settimeout(10)
        time.sleep(0.6)  # let everything on the way fill up first
        try:
            while data := conn.recv(1 << 20):
                got[0] += len(data)
            seen.append("eof")
        except ConnectionResetError:
            seen.append("reset")

    with tcp_upstream(slow_reader) as port, \
            running_proxy(tcp_listener(port, copy=copy_mode), loop_kind) as proxy:
        sock = socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=10)
        sock.settimeout(0.3)
        cut = False  # the client reset with part of the payload still unsent
        try:
            sock.sendall(payload)
        except TimeoutError:
            cut = True
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        sock.close()
        wait_until(lambda: seen, 10, message="the upstream to see the client go")
        wait_until(lambda: proxy.server.active == 0, 5, message="relay to close")
    assert seen == ["reset"]
    # What the client's kernel took before the reset is delivered (docs/hot-loop.md, "When
    # a side fails"); on a loaded machine the reader may start before the sender is done.
    assert got[0] < size or not cut


def test_both_directions_at_once_arrive_byte_exact(loop_kind: str, copy_mode: str) -> None:
    payload = pattern(24 << 20, seed=3)
    with tcp_upstream(echo) as port, \
            running_proxy(tcp_listener(port, copy=copy_mode), loop_kind) as proxy:
        back = exchange(proxy.port("t"), payload)
    assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()


def test_closing_a_stalled_splice_relay_resets_instead_of_cutting_silently(
        loop_kind: str) -> None:
    """idle_timeout on a stalled download: bytes still in the pipe would be lost, so the
    client gets an RST, never a FIN that makes a cut stream look complete."""
    with tcp_upstream(lambda c: c.sendall(pattern(16 << 20))) as port, running_proxy(
            tcp_listener(port, copy="splice", idle_timeout="500ms"), loop_kind) as proxy:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", proxy.port("t")))
        wait_until(lambda: proxy.server.listeners["t"].stats.idle_closed == 1, 5,
                   message="the idle timeout")
        with pytest.raises(ConnectionResetError):
            while sock.recv(1 << 20):
                pass
        sock.close()


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "defaults", "expected"), [
    ({"protocol": "redis", "copy": "splice", "upstream_tls": True}, {},
     "TLS is encrypted and decrypted"),
    ({"protocol": "memcached", "upstream_tls": True}, {"copy": "splice"},
     "splice (set in defaults) needs"),
    ({"copy": "zerocopy"}, {}, "expected one of auto, splice, buffer"),
    ({"copy": "sockmap"}, {}, "expected one of auto, splice, buffer, got 'sockmap'"),
])
def test_copy_setting_is_validated(extra: dict[str, Any], defaults: dict[str, Any],
                                   expected: str) -> None:
    listener = {"name": "x", "listen": "127.0.0.1:7000", "upstream": "127.0.0.1:7001", **extra}
    top = {"defaults": defaults} if defaults else {}
    with pytest.raises(ConfigError) as info:
        make_config([listener], **top)
    assert "listener 'x': field 'copy'" in str(info.value)
    assert expected in str(info.value)


def test_copy_setting_defaults_and_inheritance() -> None:
    config = make_config([
        {"name": "a", "listen": "127.0.0.1:7000", "upstream": "127.0.0.1:7001"},
        {"name": "b", "listen": "127.0.0.1:7002", "upstream": "127.0.0.1:7003",
         "copy": "splice"},
        {"name": "c", "listen": "127.0.0.1:7004", "upstream": "127.0.0.1:7005",
         "protocol": "redis"},
    ], defaults={"copy": "buffer"})
    assert [lc.copy for lc in config.listeners] == ["buffer", "splice", "buffer"]
    assert make_config([{"name": "a", "listen": "127.0.0.1:7000",
                         "upstream": "127.0.0.1:7001"}]).listeners[0].copy == "auto"


def test_auto_buffers_where_splice_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config([
        {"name": "a", "listen": "127.0.0.1:7000", "upstream": "127.0.0.1:7001"},
        {"name": "r", "listen": "127.0.0.1:7002", "upstream": "127.0.0.1:7003",
         "protocol": "redis"},
        {"name": "b", "listen": "127.0.0.1:7004", "upstream": "127.0.0.1:7005",
         "copy": "buffer"},
    ])
    loop = asyncio.new_event_loop()
    try:
        auto, redis, buffer = config.listeners
        assert splice_mod.choose_hub(loop, auto) is hub_for(loop)
        # protocol only picks the health check: a plain redis listener splices too
        assert splice_mod.choose_hub(loop, redis) is hub_for(loop)
        assert splice_mod.choose_hub(loop, buffer) is None
        monkeypatch.setattr(splice_mod, "splice_supported", lambda: False)
        assert splice_mod.choose_hub(loop, auto) is None
    finally:
        loop.close()


def test_redis_through_a_splicing_tcp_listener(loop_kind: str) -> None:
    """Real traffic: redis-py through a plain tcp listener (which splices)."""
    import redis

    server = start_server("redis")
    try:
        with running_proxy([{"name": "t", "listen": "127.0.0.1:0",
                             "upstream": server.address, "protocol": "tcp",
                             "relay": "python"}],
                           loop_kind) as proxy:
            client = redis.Redis(host="127.0.0.1", port=proxy.port("t"), socket_timeout=10)
            big = os.urandom(3 << 20)
            for i in range(50):
                client.set(f"k{i}", b"v%d" % i)
            client.set("big", big)
            assert [client.get(f"k{i}") for i in range(50)] == [b"v%d" % i for i in range(50)]
            assert client.get("big") == big
            client.close()
            relay_kinds = proxy.call(
                lambda: {type(r).__name__ for r in proxy.server.listeners["t"].relays})
            assert relay_kinds <= {"SpliceRelay"}
    finally:
        server.stop()
