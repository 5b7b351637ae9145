"""``cacheport check`` and ``cacheport run`` as a user runs them: exit codes and messages."""

from __future__ import annotations

import http.server
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import redis

from proxy.server import Server, StartError
from tests.support import (
    ROOT,
    CacheportProcess,
    ServerProcess,
    cacheport_env,
    free_port,
    make_config,
    port_open,
    run_cli,
    wait_until,
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


# -- cacheport healthcheck: the container's HEALTHCHECK and Kubernetes exec probes ---------


def test_healthcheck_asks_the_admin_endpoint_where_the_map_puts_it(
        tmp_path: Path, redis_server: ServerProcess) -> None:
    admin_port = free_port()
    path = tmp_path / "cacheport.yaml"
    path.write_text(textwrap.dedent(f"""\
        admin: {{listen: '0.0.0.0:{admin_port}'}}
        listeners:
          - {{name: rd, listen: '127.0.0.1:{free_port()}', upstream: '{redis_server.address}',
              protocol: redis, health: off}}
        """))
    proc = CacheportProcess(path)
    try:
        proc.wait_serving()
        result = run_cli("healthcheck", "-c", str(path))
        assert result.returncode == 0, result.stderr
        # bound to every address, asked on loopback
        assert result.stdout == f"healthy: http://127.0.0.1:{admin_port}/healthz: 200 ok\n"
        ready = run_cli("healthcheck", "--ready", "-c", str(path))
        assert ready.returncode == 0 and "/readyz: 200 ready" in ready.stdout
    finally:
        proc.stop()
    gone = run_cli("healthcheck", "-c", str(path))
    assert gone.returncode == 1
    assert (f"unhealthy: cannot reach the admin endpoint at http://127.0.0.1:{admin_port}"
            f"/healthz: connection refused") in gone.stderr


def test_healthcheck_fails_when_another_process_holds_the_admin_port() -> None:
    """With host networking the port may be someone else's; their 200 says nothing."""

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok\n")

        def log_message(self, format: str, *args: object) -> None:
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Ok) as other:
        thread = threading.Thread(target=other.serve_forever, daemon=True)
        thread.start()
        try:
            result = run_cli("healthcheck", "--admin", f"127.0.0.1:{other.server_port}")
        finally:
            other.shutdown()
            thread.join(5)
    assert result.returncode == 1
    assert "answered 200, but not as cacheport" in result.stderr
    assert "another process holds the admin port" in result.stderr


def test_healthcheck_under_admin_off_says_there_is_nothing_to_ask(tmp_path: Path) -> None:
    path = tmp_path / "off.yaml"
    path.write_text("admin: off\nlisteners:\n  - {name: rd, listen: '127.0.0.1:7001', "
                    "upstream: '127.0.0.1:6379'}\n")
    result = run_cli("healthcheck", "-c", str(path))
    assert result.returncode == 0
    assert "admin: off, so there is no endpoint to ask" in result.stdout


def test_healthcheck_reports_a_bad_map_as_unhealthy_never_exit_2(tmp_path: Path) -> None:
    """Docker reserves exit status 2 of a health check."""
    path = tmp_path / "bad.yaml"
    path.write_text("listeners: [\n")
    result = run_cli("healthcheck", "-c", str(path))
    assert result.returncode == 1 and "unhealthy:" in result.stderr and "invalid YAML" in (
        result.stderr)
    assert run_cli("healthcheck").returncode == 2  # no map and no --admin: a usage error


# -- the relay each listener is served by, named at start ---------------------------------


def test_start_line_names_each_listeners_relay_and_a_missing_engine_is_logged(
        tmp_path: Path, redis_server: ServerProcess) -> None:
    """As an install built without a C compiler: the engine cannot be imported."""
    port = free_port()
    path = tmp_path / "noengine.yaml"
    path.write_text(f"admin: off\nlisteners:\n  - {{name: rd, listen: '127.0.0.1:{port}', "
                    f"upstream: '{redis_server.address}', protocol: redis, health: off}}\n")
    without_engine = ("import sys; sys.modules['proxy.relay._engine'] = None; "
                      "from proxy.cli import main; sys.exit(main(sys.argv[1:]))")
    log_path = tmp_path / "noengine.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", without_engine, "run", "-c", str(path)],
                                stdout=log_file, stderr=subprocess.STDOUT, env=cacheport_env(),
                                cwd=ROOT)
        try:
            wait_until(lambda: "cacheport serving" in log_path.read_text(), 15, 0.05,
                       "cacheport to start serving")
            r = redis.Redis(port=port, socket_timeout=5)
            assert r.ping()
            r.close()
        finally:
            proc.terminate()
            proc.wait(10)
    log = log_path.read_text()
    assert (f"listener rd 127.0.0.1:{port} -> {redis_server.address} (redis) started; relay "
            "splice (the native engine is not built on this install)") in log
    assert "WARNING cacheport.server: the native relay engine is not built on this install" in log
    assert "1 listener(s) use the Python relays" in log
