"""Live operations: reload without dropping connections, graceful drain, --watch."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from proxy.config import Config
from proxy.reload import plan_reload
from tests.support import (
    CacheportProcess,
    ServerProcess,
    free_port,
    make_config,
    port_open,
    run_cli,
    start_server,
    wait_until,
)
from tests.upstreams import pattern, tcp_upstream


def listener(name: str, port: int, upstream: str, **extra: object) -> dict[str, object]:
    return {"name": name, "listen": f"127.0.0.1:{port}", "upstream": upstream,
            "protocol": "redis", **extra}


def test_plan_reload_sorts_listeners_by_what_changed() -> None:
    old = make_config([listener("keep", 7001, "10.0.0.1:6379"),
                       listener("move", 7002, "10.0.0.1:6379"),
                       listener("gone", 7003, "10.0.0.1:6379"),
                       listener("port", 7004, "10.0.0.1:6379")])
    new = make_config([listener("keep", 7001, "10.0.0.1:6379"),
                       listener("move", 7002, "10.0.0.2:6379"),
                       listener("port", 7014, "10.0.0.1:6379"),
                       listener("new", 7005, "10.0.0.2:6379")])
    plan = plan_reload(old, new)
    assert [lc.name for lc in plan.added] == ["port", "new"]
    assert [lc.name for lc in plan.removed] == ["gone", "port"]
    assert [lc.name for lc in plan.changed] == ["move"]
    assert plan.unchanged == ("keep",)
    assert plan_reload(old, old).empty


@pytest.fixture
def two_nodes() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    a, b = start_server("redis"), start_server("redis")
    try:
        redis.Redis(port=a.port).set("where", "A")
        redis.Redis(port=b.port).set("where", "B")
        yield a, b
    finally:
        a.stop()
        b.stop()


def write_map(path: Path, listeners: list[dict[str, object]], **top: object) -> None:
    import yaml

    path.write_text(yaml.safe_dump({"listeners": listeners, **top}))


def conn(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=5, single_connection_client=True)


def where(port: int) -> bytes | None:
    """GET ``where`` on a new connection, closed after: a client left to the garbage
    collector warns (unclosed socket) in whichever later test happens to collect it."""
    with conn(port) as client:
        value: bytes | None = client.get("where")
    return value


@pytest.mark.timeout(60)
def test_reload_adds_removes_retargets_and_keeps_open_connections(
    tmp_path: Path, two_nodes: tuple[ServerProcess, ServerProcess]
) -> None:
    a, b = two_nodes
    p_keep, p_move, p_gone, p_new = (free_port() for _ in range(4))
    path = tmp_path / "map.yaml"
    pid_path = tmp_path / "cacheport.pid"
    write_map(path, [listener("keep", p_keep, a.address), listener("move", p_move, a.address),
                     listener("gone", p_gone, a.address)])
    proc = CacheportProcess(path, "--pid-file", str(pid_path))
    try:
        proc.wait_serving()
        on_keep, on_move, on_gone = conn(p_keep), conn(p_move), conn(p_gone)
        ids = [c.client_id() for c in (on_keep, on_move, on_gone)]
        assert [c.get("where") for c in (on_keep, on_move, on_gone)] == [b"A"] * 3

        write_map(path, [listener("keep", p_keep, a.address),
                         listener("move", p_move, b.address),
                         listener("new", p_new, b.address)], drain_timeout="2s")
        result = run_cli("reload", "-c", str(path), "--pid-file", str(pid_path))
        assert result.returncode == 0, result.stderr
        wait_until(lambda: "reloaded" in proc.log(), 10, message="the reload to be applied")
        assert "added: new; removed: gone; changed: move; unchanged: 1" in proc.log()

        # Open connections keep working, on the same server connection as before.
        assert [c.client_id() for c in (on_keep, on_move, on_gone)] == ids
        assert on_keep.get("where") == b"A"
        assert on_move.get("where") == b"A"  # a live connection keeps its old upstream
        assert on_gone.get("where") == b"A"  # the removed listener drains, not cuts
        # New connections follow the new map.
        assert where(p_move) == b"B"
        assert where(p_new) == b"B"
        assert not port_open(p_gone)
        # The removed listener's connection is cut once drain_timeout (2 s) has passed.
        wait_until(lambda: "listener gone removed: 1 connection(s) cut" in proc.log(), 10,
                   message="the removed listener's drain to end")
        with pytest.raises(redis.ConnectionError):
            on_gone.get("where")
        for c in (on_keep, on_move):
            c.close()
        assert proc.proc.poll() is None
    finally:
        proc.stop()
    assert "Traceback" not in proc.log()


@pytest.mark.timeout(60)
def test_invalid_reload_changes_nothing(
    tmp_path: Path, two_nodes: tuple[ServerProcess, ServerProcess]
) -> None:
    a, _ = two_nodes
    port = free_port()
    path = tmp_path / "map.yaml"
    pid_path = tmp_path / "cacheport.pid"
    write_map(path, [listener("keep", port, a.address)])
    proc = CacheportProcess(path, "--pid-file", str(pid_path))
    try:
        proc.wait_serving()
        live = conn(port)
        assert live.get("where") == b"A"
        good = path.read_text()
        path.write_text(good.replace("protocol: redis", "protocol: http"))
        result = run_cli("reload", "-c", str(path), "--pid-file", str(pid_path))
        assert result.returncode == 2
        assert "listener 'keep': field 'protocol'" in result.stderr
        assert "nothing was reloaded" in result.stderr
        # A SIGHUP that reaches the process anyway is refused there too.
        proc.signal(signal.SIGHUP)
        wait_until(lambda: "reload (SIGHUP or file change) failed" in proc.log(), 10,
                   message="the failed reload to be logged")
        assert "field 'protocol'" in proc.log()
        # A port that is taken: the reload fails as a whole, nothing changes.
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        try:
            write_map(path, [listener("keep", port, a.address),
                             listener("clash", taken.getsockname()[1], a.address)])
            proc.signal(signal.SIGHUP)
            wait_until(lambda: "address already in use" in proc.log(), 10,
                       message="the bind failure to be logged")
        finally:
            taken.close()
        assert "the running port map is unchanged" in proc.log()
        assert live.get("where") == b"A"
        assert where(port) == b"A"
        live.close()
    finally:
        proc.stop()
    assert "Traceback" not in proc.log()


@pytest.mark.timeout(60)
def test_watch_reloads_when_the_file_changes(
    tmp_path: Path, two_nodes: tuple[ServerProcess, ServerProcess]
) -> None:
    a, b = two_nodes
    p1, p2 = free_port(), free_port()
    path = tmp_path / "map.yaml"
    write_map(path, [listener("one", p1, a.address)])
    proc = CacheportProcess(path, "--watch")
    try:
        proc.wait_serving()
        write_map(path, [listener("one", p1, a.address), listener("two", p2, b.address)])
        wait_until(lambda: port_open(p2), 10, message="the watched change to be applied")
        assert conn(p2).get("where") == b"B"
    finally:
        proc.stop()


def slow_push(size: int, seconds: float):  # type: ignore[no-untyped-def]
    """An upstream that sends ``size`` bytes spread over ``seconds``, then closes."""
    payload = pattern(size)
    steps = 20

    def handler(sock: socket.socket) -> None:
        step = size // steps
        for i in range(steps):
            sock.sendall(payload[i * step:(i + 1) * step if i < steps - 1 else size])
            time.sleep(seconds / steps)
        sock.shutdown(socket.SHUT_WR)

    return handler


@pytest.mark.timeout(60)
def test_sigterm_lets_a_transfer_finish_then_exits_0(tmp_path: Path) -> None:
    size = 8 << 20
    with tcp_upstream(slow_push(size, 1.5)) as upstream_port:
        port = free_port()
        path = tmp_path / "drain.yaml"
        path.write_text(f"drain_timeout: 10s\nlisteners:\n  - {{name: t, listen: "
                        f"'127.0.0.1:{port}', upstream: '127.0.0.1:{upstream_port}'}}\n")
        proc = CacheportProcess(path)
        try:
            proc.wait_serving()
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            first = client.recv(1 << 16)
            assert first
            proc.signal(signal.SIGTERM)  # mid-transfer
            wait_until(lambda: "draining 1 connection(s)" in proc.log(), 5)
            assert not port_open(port)  # no longer accepting
            received = len(first)
            while chunk := client.recv(1 << 20):
                received += len(chunk)
            client.close()
            assert received == size
            assert proc.wait(10) == 0
        finally:
            proc.stop()
    assert "1 connection(s) drained, 0 cut" in proc.log()


@pytest.mark.timeout(60)
def test_connection_open_past_drain_timeout_is_cut(
    tmp_path: Path, redis_server: ServerProcess
) -> None:
    port = free_port()
    path = tmp_path / "cut.yaml"
    write_map(path, [listener("rd", port, redis_server.address)], drain_timeout="1s")
    proc = CacheportProcess(path)
    try:
        proc.wait_serving()
        idle = conn(port)
        assert idle.ping()
        start = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        elapsed = time.monotonic() - start
        assert 0.9 <= elapsed < 4, elapsed
        with pytest.raises(redis.ConnectionError):
            idle.ping()
    finally:
        proc.stop()
    assert "0 connection(s) drained, 1 cut" in proc.log()


@pytest.mark.timeout(60)
def test_second_signal_cuts_at_once(tmp_path: Path, redis_server: ServerProcess) -> None:
    port = free_port()
    path = tmp_path / "twice.yaml"
    write_map(path, [listener("rd", port, redis_server.address)], drain_timeout="30s")
    proc = CacheportProcess(path)
    try:
        proc.wait_serving()
        idle = conn(port)
        assert idle.ping()
        start = time.monotonic()
        proc.signal(signal.SIGTERM)
        wait_until(lambda: "draining 1 connection(s)" in proc.log(), 5)
        proc.signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert time.monotonic() - start < 5
        idle.close()
    finally:
        proc.stop()
    assert "second stop signal" in proc.log()
    assert "0 connection(s) drained, 1 cut" in proc.log()


def test_stopping_twice_is_harmless(redis_server: ServerProcess) -> None:
    from tests.support import ProxyThread

    config: Config = make_config([listener("rd", 0, redis_server.address)])
    proxy = ProxyThread(config).start()
    live = conn(proxy.port("rd"))
    assert live.ping()

    async def stop_twice() -> tuple[object, object]:
        return await proxy.server.stop(0), await proxy.server.stop(0)

    first, second = proxy.call(stop_twice)
    assert (first.cut, second.cut) == (1, 0)  # type: ignore[attr-defined]
    proxy.stop()
    live.close()


@pytest.mark.timeout(60)
def test_reload_through_the_admin_endpoint_reports_the_outcome(
    tmp_path: Path, two_nodes: tuple[ServerProcess, ServerProcess]
) -> None:
    a, b = two_nodes
    admin_port, p1, p2 = free_port(), free_port(), free_port()
    path = tmp_path / "map.yaml"
    admin = {"listen": f"127.0.0.1:{admin_port}"}
    write_map(path, [listener("one", p1, a.address)], admin=admin)
    proc = CacheportProcess(path)
    try:
        proc.wait_serving()
        write_map(path, [listener("one", p1, a.address), listener("two", p2, b.address)],
                  admin=admin)
        result = run_cli("reload", "-c", str(path))
        assert result.returncode == 0, result.stderr
        assert "reloaded: added: two" in result.stdout
        assert conn(p2).get("where") == b"B"
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        try:
            write_map(path, [listener("one", p1, a.address), listener("two", p2, b.address),
                             listener("three", taken.getsockname()[1], b.address)],
                      admin=admin)
            result = run_cli("reload", "-c", str(path))
        finally:
            taken.close()
        assert result.returncode == 2
        assert "listener 'three'" in result.stderr and "already in use" in result.stderr
        import urllib.request

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics",
                                         timeout=5).read().decode()
        assert "cacheport_reloads_total 1.0" in metrics
        assert "cacheport_reload_failures_total 1.0" in metrics
    finally:
        proc.stop()
