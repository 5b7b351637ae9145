"""The admin endpoint (/metrics, /healthz, /readyz, /status) and ``cacheport status``,
against cacheport serving real memcached and redis-server nodes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest
import redis
import yaml
from pymemcache.client.base import Client as MemcacheClient

from proxy.admin import format_status
from proxy.relay.choose import RelayKind, serving_relay
from proxy.relay.engine import native_available
from proxy.server import StopResult
from tests.healthkit import (
    DOWN_WITHIN,
    FAST,
    UP_WITHIN,
    admin_address,
    http_get,
    last_check,
    metrics,
    proxy_with_admin,
    sample,
    status,
    upstream_status,
    wait_health,
)
from tests.support import (
    CacheportProcess,
    ServerProcess,
    free_port,
    make_config,
    run_cli,
    running_proxy,
    wait_until,
)


def listeners_for(memcached: ServerProcess, redis_server: ServerProcess) -> list[dict[str, object]]:
    return [
        {"name": "mc", "listen": "127.0.0.1:0", "upstream": memcached.address,
         "protocol": "memcached", "health": {**FAST, "stats": True}},
        {"name": "rd", "listen": "127.0.0.1:0", "upstream": redis_server.address,
         "protocol": "redis", "health": FAST},
    ]


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def test_metrics_parse_and_count_the_bytes_a_client_sent_and_received(
        redis_server: ServerProcess) -> None:
    listeners = [{"name": "rd", "listen": "127.0.0.1:0", "upstream": redis_server.address,
                  "protocol": "redis", "health": FAST}]
    up = redis_server.address
    with proxy_with_admin(listeners) as proxy:
        wait_health(proxy, "rd", up, "up", UP_WITHIN)
        sent = received = 0
        with socket.create_connection(("127.0.0.1", proxy.port("rd")), timeout=5) as sock:
            for value in (b"x" * 10, b"y" * 5000, b"z" * 70000):
                request = (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n%s\r\n" % (len(value), value))
                sock.sendall(request)
                sent += len(request)
                received += len(recv_exactly(sock, 5))  # +OK\r\n
                get = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
                sock.sendall(get)
                sent += len(get)
                reply = b"$%d\r\n%s\r\n" % (len(value), value)
                assert recv_exactly(sock, len(reply)) == reply
                received += len(reply)
            # Scraped while the connection is still open: the live relay's counters count.
            s = metrics(proxy)
            labels = {"listener": "rd", "upstream": up}
            assert sample(s, "cacheport_bytes_total", direction="upstream", **labels) == sent
            assert sample(s, "cacheport_bytes_total", direction="downstream", **labels) == received
            assert sample(s, "cacheport_connections_active", **labels) == 1
        wait_until(lambda: proxy.server.active == 0, 5, message="the relay to close")
        s = metrics(proxy)
        assert sample(s, "cacheport_bytes_total", direction="upstream", **labels) == sent
        assert sample(s, "cacheport_bytes_total", direction="downstream", **labels) == received
        assert sample(s, "cacheport_connections_active", **labels) == 0
        assert sample(s, "cacheport_connections_accepted_total", listener="rd") == 1
        assert sample(s, "cacheport_upstream_connections_total", **labels) == 1
        assert sample(s, "cacheport_upstream_connect_duration_seconds_count", **labels) == 1
        assert sample(s, "cacheport_upstream_connect_duration_seconds_bucket",
                      le="+Inf", **labels) == 1
        assert sample(s, "cacheport_upstream_up", **labels) == 1
        assert sample(s, "cacheport_upstream_checks_total", result="ok", **labels) >= 1
        assert sample(s, "cacheport_upstream_check_duration_seconds_count", **labels) >= 1
        assert sample(s, "cacheport_listener_accepting", listener="rd") == 1
        assert sample(s, "cacheport_build_info", version="0.1.0") == 1
        assert any(name == "process_open_fds" for name, _labels in s)


def test_killed_nodes_go_down_refuse_new_clients_at_once_and_come_back(
        memcached: ServerProcess, redis_server: ServerProcess) -> None:
    with proxy_with_admin(listeners_for(memcached, redis_server)) as proxy:
        wait_health(proxy, "mc", memcached.address, "up", UP_WITHIN)
        wait_health(proxy, "rd", redis_server.address, "up", UP_WITHIN)
        assert http_get(proxy, "/readyz")[0] == 200
        memcached.kill()
        redis_server.kill()
        killed = time.monotonic()
        wait_health(proxy, "mc", memcached.address, "down", DOWN_WITHIN)
        wait_health(proxy, "rd", redis_server.address, "down", DOWN_WITHIN)
        assert time.monotonic() - killed < DOWN_WITHIN + 0.5

        # New clients are closed at once, not after connect_timeout (3 s).
        for name in ("mc", "rd"):
            began = time.monotonic()
            with socket.create_connection(("127.0.0.1", proxy.port(name)), timeout=5) as sock:
                try:
                    assert sock.recv(16) == b""
                except ConnectionResetError:
                    pass
            assert time.monotonic() - began < 0.5
        s = metrics(proxy)
        for name, server in (("mc", memcached), ("rd", redis_server)):
            labels = {"listener": name, "upstream": server.address}
            assert sample(s, "cacheport_connections_refused_total", listener=name,
                          reason="upstream_down") == 1
            assert sample(s, "cacheport_upstream_up", **labels) == 0
            assert sample(s, "cacheport_upstream_state_changes_total", **labels) == 1
            assert sample(s, "cacheport_upstream_checks_total", result="failed", **labels) >= 3
            up = last_check(proxy, name, server.address, "connection refused")
            assert up["health"] == "down"
            assert up["last_check"]["reason"] == "connection refused"
            assert up["last_check"]["ok"] is False
            assert up["in_use"] is False
        code, _headers, body = http_get(proxy, "/readyz")
        assert (code, body) == (503, b"not ready: no upstream is healthy\n")
        assert http_get(proxy, "/healthz")[0] == 200

        memcached.restart()
        redis_server.restart()
        wait_health(proxy, "mc", memcached.address, "up", UP_WITHIN)
        wait_health(proxy, "rd", redis_server.address, "up", UP_WITHIN)
        mc = MemcacheClient(("127.0.0.1", proxy.port("mc")), connect_timeout=5, timeout=5)
        mc.set("back", b"again")
        assert mc.get("back") == b"again"
        mc.close()
        client = redis.Redis(port=proxy.port("rd"), socket_timeout=5)
        assert client.ping()
        client.close()
        assert sample(metrics(proxy), "cacheport_upstream_state_changes_total",
                      listener="rd", upstream=redis_server.address) == 2
        assert http_get(proxy, "/readyz")[0] == 200


def test_status_json_describes_listeners_upstreams_and_last_checks(
        memcached: ServerProcess, redis_server: ServerProcess) -> None:
    with proxy_with_admin(listeners_for(memcached, redis_server)) as proxy:
        wait_health(proxy, "mc", memcached.address, "up", UP_WITHIN)
        wait_health(proxy, "rd", redis_server.address, "up", UP_WITHIN)
        client = redis.Redis(port=proxy.port("rd"), socket_timeout=5)
        assert client.ping()
        doc = status(proxy)
        client.close()
        assert doc["ready"] is True and doc["version"] == "0.1.0"
        mc, rd = doc["listeners"]
        assert (mc["name"], mc["listen"], mc["protocol"]) == (
            "mc", f"127.0.0.1:{proxy.port('mc')}", "memcached")
        assert mc["check"] == {"kind": "memcached", "interval": 0.2, "timeout": 0.2,
                               "rise": 2, "fall": 3}
        [up] = mc["upstreams"]
        assert up["address"] == memcached.address and up["role"] == "upstream"
        assert up["health"] == "up" and up["in_use"] is True
        up = last_check(proxy, "mc", memcached.address, "VERSION ")
        assert isinstance(up["last_check"]["detail"]["curr_connections"], int)
        assert rd["accepted"] == 1 and rd["active"] == 1
        assert rd["upstreams"][0]["active"] == 1
        assert rd["upstreams"][0]["bytes_upstream"] > 0

        table = format_status(doc)
        assert table.splitlines()[0].split() == [
            "LISTENER", "LISTEN", "UPSTREAM", "HEALTH", "ACTIVE", "CLIENT->NODE",
            "NODE->CLIENT"]
        assert f"mc        127.0.0.1:{proxy.port('mc')}" in table

        address = admin_address(proxy)
        result = run_cli("status", "--admin", f"{address.host}:{address.port}")
        assert result.returncode == 0, result.stderr
        assert "LISTENER" in result.stdout and memcached.address in result.stdout
        assert "UP" in result.stdout
        raw = run_cli("status", "--admin", f"{address.host}:{address.port}", "--json")
        assert json.loads(raw.stdout)["listeners"][0]["name"] == "mc"


def test_admin_http_errors_and_head(redis_server: ServerProcess) -> None:
    listeners = [{"name": "rd", "listen": "127.0.0.1:0", "upstream": redis_server.address,
                  "protocol": "redis", "health": "off"}]
    with proxy_with_admin(listeners) as proxy:
        code, headers, body = http_get(proxy, "/nope")
        assert code == 404 and b"/metrics" in body
        code, headers, _ = http_get(proxy, "/metrics", method="POST")
        assert code == 405 and headers["allow"] == "GET, HEAD"
        code, headers, body = http_get(proxy, "/status", method="HEAD")
        assert code == 200 and body == b"" and int(headers["content-length"]) > 0
        up = upstream_status(proxy, "rd", redis_server.address)
        assert up["health"] == "unchecked" and up["in_use"] is True
        assert http_get(proxy, "/readyz")[0] == 200  # unchecked upstreams count as healthy
        # garbage on the socket gets a 400, not a traceback
        address = admin_address(proxy)
        with socket.create_connection((address.host, address.port), timeout=5) as sock:
            sock.sendall(b"hello\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400 ")


def test_stop_closes_the_admin_endpoint_and_is_idempotent(redis_server: ServerProcess) -> None:
    listeners = [{"name": "rd", "listen": "127.0.0.1:0", "upstream": redis_server.address,
                  "protocol": "redis", "health": FAST}]
    with proxy_with_admin(listeners) as proxy:
        address = admin_address(proxy)
        assert http_get(proxy, "/healthz")[0] == 200
        proxy.stop()  # the server's own ordered stop, on its loop
        with pytest.raises(OSError):
            socket.create_connection((address.host, address.port), timeout=2).close()
        assert proxy.server.monitor is not None and not proxy.server.monitor.targets
        assert asyncio.run(proxy.server.stop()) == StopResult(0, 0)  # twice is harmless


def test_a_taken_admin_port_fails_start_only_when_configured(
        redis_server: ServerProcess, caplog: pytest.LogCaptureFixture) -> None:
    from proxy.server import StartError

    listeners = [{"name": "rd", "listen": "127.0.0.1:0", "upstream": redis_server.address,
                  "protocol": "redis"}]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        with pytest.raises(StartError, match=f"admin endpoint: cannot listen on {taken}"):
            with running_proxy(listeners, admin={"listen": taken}):
                pass
    # The implicit default (127.0.0.1:9180) being taken is only a warning.
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.0.1", 9180))
        except OSError:
            pytest.skip("127.0.0.1:9180 is in use by something else")
        holder.listen(1)
        with running_proxy(listeners, admin="implicit default") as proxy:
            assert proxy.server.admin is None
            assert redis.Redis(port=proxy.port("rd"), socket_timeout=5).ping()
    assert any("serving without it" in r.getMessage() for r in caplog.records)


def test_cacheport_status_reads_the_admin_address_from_the_config(
        tmp_path: Path, redis_server: ServerProcess) -> None:
    admin_port = free_port()
    path = tmp_path / "cacheport.yaml"
    path.write_text(yaml.safe_dump({
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "listeners": [{"name": "rd", "listen": f"127.0.0.1:{free_port()}",
                       "upstream": redis_server.address, "protocol": "redis",
                       "health": FAST}],
    }))
    proc = CacheportProcess(path)
    try:
        proc.wait_serving()
        result = wait_until(lambda: (r := run_cli("status", "-c", str(path))).returncode == 0
                            and " UP" in r.stdout and r, 10, interval=0.2,
                            message="cacheport status to show the node UP")
        assert "rd" in result.stdout and redis_server.address in result.stdout
    finally:
        proc.stop()
    result = run_cli("status", "-c", str(path))
    assert result.returncode == 1
    assert (f"cannot reach the admin endpoint at 127.0.0.1:{admin_port}: connection refused"
            in result.stderr)
    path.write_text(path.read_text().replace(f"listen: 127.0.0.1:{admin_port}", "listen: off")
                    .replace("admin:\n  listen: off", "admin: off"))
    result = run_cli("status", "-c", str(path))
    assert result.returncode == 2 and "admin endpoint is off" in result.stderr
    result = run_cli("status", "--admin", "nope:port")
    assert result.returncode == 2 and "--admin:" in result.stderr



# -- which relay serves each listener: a pure choice, then /status and the start line -----


def test_serving_relay_is_the_first_of_the_order_this_install_can_run() -> None:
    plain = make_config([{"name": "t", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1",
                          "protocol": "tcp"}]).listeners[0]
    python = make_config([{"name": "p", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1",
                           "relay": "python"}]).listeners[0]
    everything = frozenset(RelayKind)
    assert serving_relay(plain, everything) is RelayKind.ENGINE
    assert serving_relay(plain, frozenset({RelayKind.SPLICE, RelayKind.BUFFERED})) \
        is RelayKind.SPLICE  # built without a compiler
    assert serving_relay(plain, frozenset({RelayKind.BUFFERED})) is RelayKind.BUFFERED
    assert serving_relay(python, everything) is RelayKind.SPLICE
    assert serving_relay(plain, everything, rewriting=True) is RelayKind.BUFFERED  # clusters


def test_status_names_each_listeners_relay_and_the_endpoint_names_itself(
        redis_server: ServerProcess) -> None:
    listeners = [
        {"name": "auto", "listen": "127.0.0.1:0", "upstream": redis_server.address},
        {"name": "python", "listen": "127.0.0.1:0", "upstream": redis_server.address,
         "relay": "python"},
        {"name": "buffer", "listen": "127.0.0.1:0", "upstream": redis_server.address,
         "relay": "python", "copy": "buffer"},
    ]
    with proxy_with_admin(listeners, defaults={"health": False}) as proxy:
        relays = {lst["name"]: lst["relay"] for lst in status(proxy)["listeners"]}
        code, headers, _body = http_get(proxy, "/healthz")
    assert relays == {"auto": "engine" if native_available() else "splice",
                      "python": "splice", "buffer": "buffered"}
    assert code == 200 and headers["server"] == "cacheport/0.1.0"


def test_status_keeps_the_listeners_asked_for_and_indents_on_request(
        redis_server: ServerProcess) -> None:
    listeners = [{"name": name, "listen": "127.0.0.1:0", "upstream": redis_server.address,
                  "protocol": "redis", "health": "off"} for name in ("a", "b", "c")]
    with proxy_with_admin(listeners) as proxy:
        code, _headers, body = http_get(proxy, "/status?listener=a&listener=c")
        assert code == 200 and b"\n  " not in body
        doc = json.loads(body)
        assert [lst["name"] for lst in doc["listeners"]] == ["a", "c"]
        assert doc["ready"] is True  # readiness is the whole process's, filter or not
        assert doc["admin"] == {"listen": str(admin_address(proxy)), "allow": None,
                                "writes": "open", "refused": {}}
        code, _headers, body = http_get(proxy, "/status?pretty")
        assert body.startswith(b'{\n  "version": ') and len(json.loads(body)["listeners"]) == 3
        code, _headers, page = http_get(proxy, "/?listener=b&refresh=0")
        assert code == 200 and b'data-listener="b"' in page and b'data-listener="a"' not in page
        assert b"http-equiv" not in page
