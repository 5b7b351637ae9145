"""One port, routed by the TLS server name (``sni_routes``), TLS passed through untouched.

::

    client --TLS, SNI node-a.sni.test--> cacheport :port --same bytes--> redis A (cert node-a)
    client --TLS, SNI node-b.sni.test--> cacheport :port --same bytes--> redis B (cert node-b)

Each node is a redis-server with its own TLS certificate (trustme); the clients verify
the node's certificate and name end to end, so cacheport holds no key. Bad first bytes
get a clean close and a counter by reason.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy import handshake
from tests.certs import Pki, make_pki, tls_redis
from tests.support import (
    CacheportProcess,
    ProxyThread,
    ServerProcess,
    free_port,
    make_config,
    require_binary,
    wait_until,
)
from tests.test_dns import can_unshare, private_resolver

HOST = "127.0.0.1"
NAMES = ("node-a.sni.test", "node-b.sni.test")


@dataclass
class Node:
    name: str
    server: ServerProcess


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("sni-pki"))


def tls_node(pki: Pki, name: str, host: str = HOST, port: int | None = None) -> Node:
    """A redis-server speaking only TLS with a certificate for ``name``; its ``node`` key
    holds ``name``, so a reply says which node answered."""
    server = tls_redis(pki, *pki.issue(name, name), host=host, port=port)
    r = redis.Redis(host=host, port=server.port, ssl=True, ssl_ca_certs=str(pki.ca_file),
                    ssl_check_hostname=False, socket_timeout=5)
    r.set("node", name)
    r.close()
    return Node(name, server)


@pytest.fixture(scope="module")
def nodes(pki: Pki) -> Iterator[dict[str, Node]]:
    started: dict[str, Node] = {}
    try:
        for name in NAMES:
            started[name] = tls_node(pki, name)
        yield started
    finally:
        for node in started.values():
            node.server.stop()


def ask(port: int, context: ssl.SSLContext, name: str | None) -> bytes:
    """GET node over TLS through ``port``, asking for (and verifying) ``name``."""
    with socket.create_connection((HOST, port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=name) as sock:
        sock.sendall(b"*2\r\n$3\r\nGET\r\n$4\r\nnode\r\n")
        reply = b""
        while not reply.endswith(b"\r\n") or reply.count(b"\r\n") < 2:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply


def value(name: str) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(name), name.encode())


def sni_listener(routes: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    return {"name": "sni", "listen": f"{HOST}:0", "protocol": "redis",
            "sni_routes": routes, **extra}


@contextlib.contextmanager
def proxy_for(nodes: dict[str, Node], **extra: Any) -> Iterator[ProxyThread]:
    """node-a by its exact name, anything else under sni.test to node-b."""
    a, b = nodes[NAMES[0]].server, nodes[NAMES[1]].server
    routes = [{"server_name": "*.sni.test", "upstream": b.address},
              {"server_name": NAMES[0].upper(), "upstream": a.address}]
    proxy = ProxyThread(make_config([sni_listener(routes, **extra)])).start()
    try:
        yield proxy
    finally:
        proxy.stop()


RELAYS = [pytest.param({"relay": "native"}, "engine", id="native"),
          pytest.param({"relay": "python", "copy": "splice"}, "splice", id="splice"),
          pytest.param({"relay": "python", "copy": "buffer"}, "buffered", id="buffered")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("fields", "relay"), RELAYS)
def test_each_name_reaches_its_node_which_the_client_verifies(
        pki: Pki, nodes: dict[str, Node], fields: dict[str, str], relay: str) -> None:
    from proxy.relay.engine import native_available

    if relay == "engine" and not native_available():
        pytest.skip("the native relay engine was not built here")
    with proxy_for(nodes, **fields) as proxy:
        assert proxy.server.listeners["sni"].relay.value == relay
        port = proxy.port("sni")
        for _ in range(3):
            for name in NAMES:  # the exact route beats the wildcard that also matches
                assert ask(port, pki.client_context(), name) == value(name)
        # Another name under the wildcard goes to node-b, whose certificate does not
        # carry it: the client, not cacheport, refuses -- TLS is end to end.
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            ask(port, pki.client_context(), "node-c.sni.test")
        stats = proxy.server.listeners["sni"].stats
        assert stats.refused == {} and stats.accepted == 7


@pytest.mark.timeout(60)
def test_redis_cli_with_tls_and_sni(pki: Pki, nodes: dict[str, Node]) -> None:
    with proxy_for(nodes) as proxy:
        for name in NAMES:
            out = subprocess.run(
                [require_binary("redis-cli"), "-h", HOST, "-p", str(proxy.port("sni")),
                 "--tls", "--sni", name, "--cacert", str(pki.ca_file), "GET", "node"],
                capture_output=True, text=True, timeout=10)
            assert out.stdout.strip() == name, out.stderr


def _closed(sock: socket.socket) -> bool:
    """The peer closed (a FIN or a reset), after nothing at all reached us."""
    sock.settimeout(10)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


BAD = [
    ("not_tls", b"PING\r\n"),
    ("client_hello_malformed", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"),
    ("client_hello_too_large", b"\x16\x03\x01\x00\x04\x01\x00\x4e\x20"),
    ("client_hello_incomplete", b"\x16\x03\x01\x00\x40\x01\x00\x00\x3c\x03\x03"),
]


@pytest.mark.timeout(60)
def test_bad_first_bytes_are_closed_and_counted_by_reason(
        pki: Pki, nodes: dict[str, Node], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handshake, "CLIENT_HELLO_TIMEOUT", 0.5)
    with proxy_for(nodes) as proxy:
        port = proxy.port("sni")
        for reason, data in BAD:
            with socket.create_connection((HOST, port), timeout=10) as sock:
                sock.sendall(data)
                if reason == "client_hello_incomplete":
                    sock.shutdown(socket.SHUT_WR)  # gone before the hello is whole
                assert _closed(sock), reason
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(BAD[-1][1])  # part of a hello, then silence
            assert _closed(sock)
        # A real hello with no matching route, and one with no name at all.
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            ask(port, pki.client_context(), "other.example.com")
        anonymous = pki.client_context()
        anonymous.check_hostname = False
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            ask(port, anonymous, None)
        listener = proxy.server.listeners["sni"]
        expected = {reason: 1 for reason, _ in BAD} | {
            "client_hello_timeout": 1, "sni_no_match": 1, "sni_missing": 1}
        wait_until(lambda: listener.stats.refused == expected, 5,
                   message=f"the refusals {expected} (got {listener.stats.refused})")
        # Counted as the hello is judged; the connection is let go a moment after.
        wait_until(lambda: listener.active == 0, 5, message="every refused client let go")
        # ... and the listener still routes.
        assert ask(port, pki.client_context(), NAMES[1]) == value(NAMES[1])


@pytest.mark.timeout(60)
@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare(1) to give cacheport "
                                              "a private /etc/hosts")
def test_sni_names_the_upstream_host_through_dns(pki: Pki, tmp_path: Path) -> None:
    """``{sni}``: the name the client asked for, resolved as the node's host (here by a
    private hosts file: node-a at 127.0.0.2, node-b at 127.0.0.3, one port)."""
    port = free_port("127.0.0.2")
    started = []
    try:
        for name, host in zip(NAMES, ("127.0.0.2", "127.0.0.3"), strict=True):
            started.append(tls_node(pki, name, host, port))
        _, mount = private_resolver(tmp_path, "127.0.0.1 localhost\n" + "".join(
            f"{node.server.host} {node.name}\n" for node in started))
        listen = free_port()
        path = tmp_path / "sni.yaml"
        path.write_text(
            f"admin: off\nlisteners:\n  - name: sni\n    listen: '{HOST}:{listen}'\n"
            f"    protocol: redis\n    sni_routes:\n"
            f"      - {{server_name: '*.sni.test', upstream: '{{sni}}:{port}'}}\n")
        proc = CacheportProcess(path, prefix=mount)
        try:
            proc.wait_serving()
            for name in NAMES:
                assert ask(listen, pki.client_context(), name) == value(name)
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                ask(listen, pki.client_context(), "unknown.sni.test")  # no such host: closed
            wait_until(lambda: "cannot resolve 'unknown.sni.test'" in proc.log(), 5,
                       message="the failed lookup to be logged")
        finally:
            proc.stop()
    finally:
        for node in started:
            node.server.stop()


# -- the port map -------------------------------------------------------------------


def _config_error(listener: dict[str, Any], **top: Any) -> str:
    from proxy.config import ConfigError

    with pytest.raises(ConfigError) as err:
        make_config([listener], **top)
    return str(err.value)


ROUTE = {"server_name": "*.abc123.use1.cache.amazonaws.com", "upstream": "{sni}"}


def test_routes_resolve_exact_before_wildcard_with_the_protocols_port() -> None:
    routes = [ROUTE, {"server_name": "Primary.Example.com", "upstream": "10.0.0.5:6380"},
              {"server_name": "x.abc123.use1.cache.amazonaws.com", "upstream": "10.0.0.6"}]
    (lc,) = make_config([sni_listener(routes)]).listeners
    assert lc.health is None and lc.may_splice
    assert str(lc.sni_target("n-1.abc123.use1.cache.amazonaws.com")) == \
        "n-1.abc123.use1.cache.amazonaws.com:6379"
    assert str(lc.sni_target("x.abc123.use1.cache.amazonaws.com")) == "10.0.0.6:6379"
    assert str(lc.sni_target("primary.example.com")) == "10.0.0.5:6380"
    for name in ("abc123.use1.cache.amazonaws.com", "a.b.abc123.use1.cache.amazonaws.com",
                 "example.com", "com"):
        assert lc.sni_target(name) is None


@pytest.mark.parametrize(("extra", "message"), [
    ({"upstream": "10.0.0.1:6379"}, "field 'upstream' cannot go with sni_routes"),
    ({"tls": {"cert": __file__, "key": __file__}}, "field 'tls' cannot go with sni_routes"),
    ({"upstream_tls": True}, "field 'upstream_tls' cannot go with sni_routes"),
    ({"backup": ["10.0.0.2:6379"]}, "field 'backup' cannot go with sni_routes"),
    ({"health": {"interval": "1s"}}, "field 'health' cannot go with sni_routes"),
    ({"sni_routes": [{"server_name": "a.*.example.com", "upstream": "{sni}"}]},
     "one label only"),
    ({"sni_routes": [{"server_name": "a b", "upstream": "{sni}"}]}, "expected a DNS name"),
    ({"sni_routes": [{"server_name": "a.example.com", "upstream": "{name}:6379"}]},
     "only {sni} may stand in the upstream"),
    ({"sni_routes": [ROUTE, ROUTE]}, "is routed twice"),
    ({"protocol": "tcp"}, "sni_routes[0]: field 'upstream': missing port"),
    ({"sni_routes": []}, "field 'sni_routes': expected at least one route"),
])
def test_what_cannot_go_with_sni_routes_is_a_config_error(extra: dict[str, Any],
                                                           message: str) -> None:
    assert message in _config_error(sni_listener([ROUTE], **extra))


def test_upstream_tls_in_defaults_is_named_as_such() -> None:
    error = _config_error(sni_listener([ROUTE]), defaults={"upstream_tls": True})
    assert "field 'upstream_tls' (set in defaults) cannot go with sni_routes" in error


def test_a_listener_needs_an_upstream_or_sni_routes() -> None:
    error = _config_error({"name": "x", "listen": f"{HOST}:0"})
    assert "missing required field 'upstream' (or sni_routes)" in error
