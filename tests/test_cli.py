"""``cacheport check`` and ``cacheport run`` as a user runs them: exit codes and messages."""

from __future__ import annotations

import signal
import socket
import textwrap
from pathlib import Path

import pytest
import redis

from proxy.server import Server, StartError
from tests.support import (
    ROOT,
    CacheportProcess,
    ServerProcess,
    free_port,
    make_config,
    port_open,
    run_cli,
)

BAD_MAPS = {
    "unknown field": ("listeners:\n  - {name: a, listen: 1, upstream: 'x:1', colour: red}\n",
                      "listener 'a': unknown field 'colour'"),
    "bad host:port": ("listeners:\n  - {name: a, listen: 1, upstream: 'x:99999'}\n",
                      "listener 'a': field 'upstream': port 99999 in 'x:99999' is out of range"),
    "wrong type": ("listeners:\n  - {name: a, listen: [1], upstream: 'x:1'}\n",
                   "listener 'a': field 'listen': expected host:port"),
    "duplicate name": ("listeners:\n  - {name: a, listen: 7001, upstream: 'x:1'}\n"
                       "  - {name: a, listen: 7002, upstream: 'x:1'}\n",
                       "duplicate name 'a'"),
    "same address": ("listeners:\n  - {name: a, listen: 7001, upstream: 'x:1'}\n"
                     "  - {name: b, listen: 7001, upstream: 'x:1'}\n",
                     "listener 'b': field 'listen': address 0.0.0.0:7001 is already used"),
    "empty map": ("listeners: []\n", "no listeners"),
    "bad yaml": ("listeners: [\n", "invalid YAML"),
}


OPEN = "defaults: {allow: ['0.0.0.0/0']}\n"


@pytest.mark.parametrize("case", sorted(BAD_MAPS))
@pytest.mark.parametrize("command", ["check", "run"])
def test_config_errors_exit_2_with_specific_message(
    tmp_path: Path, case: str, command: str
) -> None:
    text, expected = BAD_MAPS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text if case == "bad yaml" else text + OPEN)
    args = ("check", str(path)) if command == "check" else ("run", "-c", str(path))
    result = run_cli(*args)
    assert result.returncode == 2, result
    assert expected in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_check_prints_the_map_as_a_table() -> None:
    result = run_cli("check", str(ROOT / "config" / "example.yaml"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "LISTEN", "UPSTREAM", "PROTOCOL"]
    assert lines[1].split() == ["memcached-0001", "0.0.0.0:11211", "10.0.1.230:11211",
                                "memcached"]
    assert "OK, 5 listener(s)" in lines[-1]


def test_port_in_use_exits_2_naming_listener_and_address(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    free = free_port()
    path = tmp_path / "busy.yaml"
    path.write_text(textwrap.dedent(f"""
        listeners:
          - {{name: first, listen: '127.0.0.1:{free}', upstream: '127.0.0.1:1'}}
          - {{name: second, listen: '127.0.0.1:{busy}', upstream: '127.0.0.1:1'}}
    """))
    try:
        result = run_cli("run", "-c", str(path))
    finally:
        taken.close()
    assert result.returncode == 2
    assert f"listener 'second': cannot listen on 127.0.0.1:{busy}: address already in use" \
        in result.stderr
    assert "nothing was started" in result.stderr
    assert "Traceback" not in result.stderr


async def test_failed_start_leaves_no_listener_bound() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    free = free_port()
    config = make_config([
        {"name": "first", "listen": f"127.0.0.1:{free}", "upstream": "127.0.0.1:1"},
        {"name": "second", "listen": f"127.0.0.1:{busy}", "upstream": "127.0.0.1:1"},
    ])
    try:
        with pytest.raises(StartError, match="listener 'second'"):
            await Server(config).start()
        assert not port_open(free)
        again = socket.socket()
        again.bind(("127.0.0.1", free))  # the first listener's port was released
        again.close()
    finally:
        taken.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_serves_then_stops_cleanly_on_signal(
    tmp_path: Path, redis_server: ServerProcess, sig: signal.Signals
) -> None:
    port = free_port()
    path = tmp_path / "run.yaml"
    path.write_text(
        f"listeners:\n  - {{name: rd, listen: '127.0.0.1:{port}', "
        f"upstream: '{redis_server.address}', protocol: redis}}\n")
    proc = CacheportProcess(path)
    try:
        proc.wait_serving()
        r = redis.Redis(port=port, socket_timeout=5)
        assert r.ping()
        r.close()
        proc.signal(sig)
        assert proc.wait(10) == 0
    finally:
        proc.stop()
    log = proc.log()
    assert f"listener rd 127.0.0.1:{port} -> {redis_server.address} (redis) started" in log
    assert f"listener rd 127.0.0.1:{port} stopped" in log
    assert "Traceback" not in log


def test_loop_flag_selects_plain_asyncio(tmp_path: Path, redis_server: ServerProcess) -> None:
    port = free_port()
    path = tmp_path / "loop.yaml"
    path.write_text(f"listeners:\n  - {{name: rd, listen: '127.0.0.1:{port}', "
                    f"upstream: '{redis_server.address}'}}\n")
    proc = CacheportProcess(path, "--loop", "asyncio")
    try:
        proc.wait_serving()
        r = redis.Redis(port=port, socket_timeout=5)
        assert r.ping()
        r.close()
    finally:
        proc.stop()
    assert "on asyncio" in proc.log()
