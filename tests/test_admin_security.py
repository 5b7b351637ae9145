"""The admin endpoint off loopback: allow lists, the write token, and requests that are
slow, huge or not HTTP at all, against a running cacheport."""

from __future__ import annotations

import contextlib
import http.client
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from proxy.admin import http as admin_http
from tests.healthkit import admin_address, http_get, metrics, proxy_with_admin
from tests.support import (
    CacheportProcess,
    ProxyThread,
    ServerProcess,
    free_port,
    run_cli,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
            source: str = "127.0.0.1") -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, headers=headers or {})
        reply = conn.getresponse()
        return (reply.status, {k.lower(): v for k, v in reply.getheaders()},
                reply.read().decode(errors="replace"))
    finally:
        conn.close()


def start(tmp_path: Path, redis_server: ServerProcess, admin: dict[str, object],
          token: str | None = None) -> tuple[CacheportProcess, Path, int]:
    port = free_port()
    admin = {"listen": f"0.0.0.0:{port}", **admin}
    if token is not None:
        (tmp_path / "admin.token").write_text(token + "\n")
        admin["token_file"] = "admin.token"
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump({"admin": admin, "listeners": [
        {"name": "rd", "listen": f"127.0.0.1:{free_port()}", "upstream": redis_server.address,
         "protocol": "redis", "health": "off"}]}))
    proc = CacheportProcess(path)
    try:
        proc.wait_serving()
    except BaseException:
        proc.stop()  # closes its log file too
        raise
    return proc, path, port


@pytest.fixture
def token() -> str:
    return "tok-" + secrets.token_hex(16)


@pytest.fixture
def with_token(tmp_path: Path, redis_server: ServerProcess,
               token: str) -> Iterator[tuple[CacheportProcess, Path, int]]:
    proc, path, port = start(tmp_path, redis_server, {}, token)
    try:
        yield proc, path, port
    finally:
        proc.stop()


def test_reload_off_loopback_needs_the_right_token_and_reads_need_none(
        with_token: tuple[CacheportProcess, Path, int], token: str) -> None:
    proc, path, port = with_token
    code, headers, body = request(port, "POST", "/-/reload")
    assert code == 401 and "Bearer" in headers["www-authenticate"] and "Authorization" in body
    code, _headers, body = request(port, "POST", "/-/reload", {"Authorization": "Bearer nope"})
    assert code == 401 and "wrong token" in body
    code, _headers, body = request(port, "POST", "/-/reload",
                                   {"Authorization": f"Bearer {token}"})
    assert code == 200 and body.startswith("reloaded")
    # the CLI reads the token from the port map's token_file
    result = run_cli("reload", "-c", str(path))
    assert result.returncode == 0 and "reloaded" in result.stdout, result.stderr
    for route in ("/healthz", "/readyz", "/status", "/", "/metrics"):
        code, _headers, body = request(port, "GET", route)
        assert code == 200, route
        assert token not in body, route
    text = request(port, "GET", "/metrics")[2]
    assert 'cacheport_admin_refused_total{reason="no_token"} 1.0' in text
    assert 'cacheport_admin_refused_total{reason="bad_token"} 1.0' in text
    status = request(port, "GET", "/status")[2]
    assert '"writes": "token"' in status
    log = proc.log()
    assert "refused POST /-/reload from 127.0.0.1 (no_token)" in log
    assert "refused POST /-/reload from 127.0.0.1 (bad_token)" in log
    assert token not in log


def test_reload_off_loopback_without_a_token_is_refused_unless_opted_out(
        tmp_path: Path, redis_server: ServerProcess) -> None:
    proc, _path, port = start(tmp_path, redis_server, {})
    try:
        code, _headers, body = request(port, "POST", "/-/reload")
        assert code == 403 and "admin.token_file" in body
        assert request(port, "GET", "/healthz")[0] == 200
        assert 'reason="token_required"} 1.0' in request(port, "GET", "/metrics")[2]
        assert "POST /-/reload is refused; set admin.token_file" in proc.log()
        assert "no allow list" in proc.log()
    finally:
        proc.stop()
    proc, _path, port = start(tmp_path, redis_server, {"insecure_writes": True})
    try:
        assert request(port, "POST", "/-/reload")[0] == 200
    finally:
        proc.stop()


def test_a_source_outside_allow_gets_403_on_every_route(redis_server: ServerProcess) -> None:
    listeners = [{"name": "rd", "listen": "127.0.0.1:0", "upstream": redis_server.address,
                  "protocol": "redis"}]
    with proxy_with_admin(listeners, admin={"listen": "127.0.0.1:0",
                                            "allow": ["192.0.2.0/24"]}) as proxy:
        for route in ("/healthz", "/status", "/", "/metrics"):
            code, _headers, body = http_get(proxy, route)
            assert code == 403 and b"admin.allow" in body, route
        assert proxy.server.admin is not None
        assert proxy.server.admin.refused["not_allowed"] == 4
    with proxy_with_admin(listeners, admin={"listen": "127.0.0.1:0",
                                            "allow": ["192.0.2.0/24", "127.0.0.0/8"]}) as proxy:
        assert http_get(proxy, "/healthz")[0] == 200


def closed_within(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    began = time.monotonic()
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - began


@pytest.fixture
def quick_proxy(redis_server: ServerProcess,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyThread]:
    """The proxy in this process, so the read timeout can be 1 s instead of 5 s."""
    monkeypatch.setattr(admin_http, "READ_TIMEOUT", 1.0)
    listeners = [{"name": "rd", "listen": "127.0.0.1:0", "upstream": redis_server.address,
                  "protocol": "redis"}]
    with proxy_with_admin(listeners) as proxy:
        yield proxy


@pytest.fixture
def quick_admin(quick_proxy: ProxyThread) -> int:
    return admin_address(quick_proxy).port


def test_a_head_never_finished_is_closed_after_the_read_timeout(quick_admin: int) -> None:
    with socket.create_connection(("127.0.0.1", quick_admin), timeout=5) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")
        data, took = closed_within(sock, 5)
    assert data == b"" and 0.8 < took < 3
    # one header byte at a time keeps nothing open past the same deadline (slowloris)
    with socket.create_connection(("127.0.0.1", quick_admin), timeout=5) as sock:
        began = time.monotonic()
        sock.sendall(b"GET /status HTTP/1.1\r\n")
        with pytest.raises(OSError):
            for _ in range(40):
                sock.sendall(b"X")
                time.sleep(0.1)
        assert time.monotonic() - began < 3


def test_a_gigabyte_body_is_refused_before_it_is_read(quick_admin: int) -> None:
    with socket.create_connection(("127.0.0.1", quick_admin), timeout=5) as sock:
        sock.sendall(b"POST /-/reload HTTP/1.1\r\nContent-Length: 1073741824\r\n\r\n")
        data, took = closed_within(sock, 5)
    assert data.startswith(b"HTTP/1.1 413 ") and took < 1
    # and a client that keeps pushing its body anyway is cut, not buffered
    with socket.create_connection(("127.0.0.1", quick_admin), timeout=5) as sock:
        sock.sendall(b"POST /-/reload HTTP/1.1\r\nContent-Length: 1073741824\r\n\r\n")
        sent, chunk = 0, b"\0" * 65536
        with pytest.raises(OSError):
            while sent < 64 << 20:
                sock.sendall(chunk)
                sent += len(chunk)
        assert sent < 16 << 20


@pytest.mark.parametrize(("garbage", "status"), [
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)) + b"\r\n\r\n", b"400"),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * 40000, b"431"),
    (b"POST /-/reload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"501"),
])
def test_garbage_gets_an_error_status_and_a_close(quick_admin: int, garbage: bytes,
                                                  status: bytes) -> None:
    with socket.create_connection(("127.0.0.1", quick_admin), timeout=5) as sock:
        sock.sendall(garbage)
        data, took = closed_within(sock, 5)
    assert data.startswith(b"HTTP/1.1 " + status + b" ") and took < 1


def test_connections_past_the_cap_are_closed_at_once_and_the_endpoint_recovers(
        quick_proxy: ProxyThread, quick_admin: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The idle connections must outlive the setup: with the fixture's 1 s read timeout, the
    # first could be let go (freeing a slot) before a loaded machine had accepted the last.
    monkeypatch.setattr(admin_http, "READ_TIMEOUT", 30.0)
    admin = quick_proxy.server.admin
    assert admin is not None
    with contextlib.ExitStack() as held:
        for _ in range(admin_http.MAX_CONNECTIONS):
            held.enter_context(socket.create_connection(("127.0.0.1", quick_admin), timeout=5))
        wait_until(lambda: quick_proxy.call(lambda: len(admin._tasks))
                   == admin_http.MAX_CONNECTIONS, 10, message="every idle connection accepted")
        with socket.create_connection(("127.0.0.1", quick_admin), timeout=5) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            data, took = closed_within(extra, 10)
        assert data == b"" and took < 5  # at once, not at the 30 s read timeout
    # The closes reach the endpoint a moment later; until then it may still be full.
    wait_until(lambda: healthz(quick_admin) == 200, 10, message="the endpoint to recover")
    assert admin.refused["busy"] >= 1


def healthz(port: int) -> int | None:
    """GET /healthz's status, or None if the connection was refused or cut."""
    try:
        return request(port, "GET", "/healthz")[0]
    except (OSError, http.client.HTTPException):
        return None


def test_refusals_are_counted_by_reason(redis_server: ServerProcess) -> None:
    listeners = [{"name": "rd", "listen": "127.0.0.1:0", "upstream": redis_server.address,
                  "protocol": "redis"}]
    with proxy_with_admin(listeners) as proxy:
        port = admin_address(proxy).port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"nonsense\r\n\r\n")
            closed_within(sock, 5)
        samples = metrics(proxy)
        assert samples[("cacheport_admin_refused_total",
                        frozenset({("reason", "malformed")}))] == 1


@pytest.mark.timeout(90)
def test_workers_behind_an_allow_list_and_a_token_reload_and_show_the_page(
        tmp_path: Path, redis_server: ServerProcess, token: str) -> None:
    """The supervisor's endpoint applies allow and token; the workers' private ones take
    the token it passes on, and the allow list (only 127.0.0.2, where this test asks
    from) does not lock the supervisor (asking from 127.0.0.1) out of them."""
    port = free_port()
    (tmp_path / "admin.token").write_text(token)
    path = tmp_path / "workers.yaml"
    path.write_text(yaml.safe_dump({
        "workers": 2, "drain_timeout": "1s",
        "admin": {"listen": f"0.0.0.0:{port}", "allow": ["127.0.0.2/32"],
                  "token_file": "admin.token"},
        "listeners": [{"name": "rd", "listen": f"127.0.0.1:{free_port()}",
                       "upstream": redis_server.address, "protocol": "redis",
                       "health": "off"}]}))  # ready at once, not after the first checks
    proc = CacheportProcess(path)
    try:
        wait_until(lambda: "serving with 2 workers" in proc.log(), 30,
                   message="both workers to be ready")
        assert request(port, "GET", "/healthz")[0] == 403  # from 127.0.0.1
        assert request(port, "POST", "/-/reload", source="127.0.0.2")[0] == 401
        code, _headers, body = request(port, "POST", "/-/reload",
                                       {"Authorization": f"Bearer {token}"}, "127.0.0.2")
        assert code == 200 and body.count("reloaded") == 2, body
        code, _headers, page = request(port, "GET", "/?refresh=0", source="127.0.0.2")
        assert code == 200 and 'id="workers"' in page and 'data-listener="rd"' in page
        workers = page[page.index('id="workers"'):page.index('id="listeners"')]
        assert workers.count('<td class="up">ready</td>') == 2, workers
        assert token not in page and token not in proc.log()
    finally:
        proc.stop()
