"""TLS on both legs, with certificates made by trustme and real TLS-enabled servers.

Every test runs on both relays that speak TLS: the Python one (``relay: python``, asyncio's
TLS) and the native engine (``relay: native``: OpenSSL in the engine thread).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
import yaml
from pymemcache.client.base import Client

import tests.support
from proxy.config import load_config
from proxy.relay.engine import native_tls_available
from tests.certs import Pki, tls_memcached, tls_redis
from tests.support import (
    CacheportProcess,
    ProxyThread,
    ServerProcess,
    free_port,
    make_config,
    running_proxy,
    until_closed,
    wait_until,
)
from tests.upstreams import pattern, push, tcp_upstream

RELAYS = [pytest.param("python"),
          pytest.param("native", marks=pytest.mark.skipif(
              not native_tls_available(), reason="the engine was not built with libssl"))]
_relay = "python"


@pytest.fixture(autouse=True, params=RELAYS)
def relay(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test once per relay: listeners without a ``relay`` get this one."""
    global _relay
    _relay = request.param
    real = tests.support.make_config

    def with_relay(listeners: list[dict[str, object]], **top: object) -> object:
        return real([{"relay": _relay, **lc} for lc in listeners], **top)

    monkeypatch.setattr(tests.support, "make_config", with_relay)
    yield _relay
    _relay = "python"


@pytest.fixture
def plain_redis() -> Iterator[ServerProcess]:
    from tests.support import start_server

    with start_server("redis") as server:
        yield server


def client_tls_listener(upstream: ServerProcess, pki: Pki, **tls: object) -> dict[str, object]:
    return {"name": "tls", "listen": "127.0.0.1:0", "upstream": upstream.address,
            "protocol": "redis", "relay": _relay,
            "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), **tls}}


def test_clients_speak_tls_to_cacheport(pki: Pki, plain_redis: ServerProcess) -> None:
    with running_proxy([client_tls_listener(plain_redis, pki)]) as proxy:
        r = redis.Redis(port=proxy.port("tls"), ssl=True, ssl_ca_certs=str(pki.ca_file),
                        socket_timeout=10)
        value = os.urandom(4 << 20)
        assert r.set("big", value)
        assert r.get("big") == value
        assert r.ping()
        r.close()
    assert redis.Redis(port=plain_redis.port).get("big") == value


def test_tls_listener_refuses_old_protocols_and_plaintext(
    pki: Pki, plain_redis: ServerProcess
) -> None:
    with running_proxy([client_tls_listener(plain_redis, pki)]) as proxy:
        port = proxy.port("tls")
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(str(pki.ca_file))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 on purpose
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                pytest.raises((ssl.SSLError, ConnectionResetError)):
            old.wrap_socket(raw, server_hostname="localhost").do_handshake()
        # A plaintext client gets a clean close, not a hang.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"PING\r\n")
            try:
                answer = raw.recv(100)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed; nothing reached the upstream
        listener = proxy.server.listeners["tls"]
        wait_until(lambda: listener.stats.refused.get("tls_handshake_failed", 0) == 2, 5,
                   message="both refusals to be counted")


def test_mutual_tls_needs_a_client_certificate(pki: Pki, plain_redis: ServerProcess) -> None:
    listener = client_tls_listener(plain_redis, pki, client_ca=str(pki.ca_file))
    with running_proxy([listener]) as proxy:
        port = proxy.port("tls")
        anonymous = redis.Redis(port=port, ssl=True, ssl_ca_certs=str(pki.ca_file),
                                socket_timeout=5)
        with pytest.raises(redis.ConnectionError):
            anonymous.ping()
        anonymous.close()
        known = redis.Redis(port=port, ssl=True, ssl_ca_certs=str(pki.ca_file),
                            ssl_certfile=str(pki.client_cert), socket_timeout=5)
        assert known.ping()
        known.close()
        assert proxy.server.listeners["tls"].stats.refused["tls_handshake_failed"] >= 1


def test_cacheport_speaks_tls_to_an_encrypted_redis_node(pki: Pki) -> None:
    node = tls_redis(pki)
    try:
        listener = {"name": "r", "listen": "127.0.0.1:0", "upstream": node.address,
                    "protocol": "redis",
                    "upstream_tls": {"ca": str(pki.ca_file), "server_name": "localhost"}}
        with running_proxy([listener]) as proxy:
            r = redis.Redis(port=proxy.port("r"), socket_timeout=10)  # plaintext to cacheport
            for i in range(1000):
                r.set(f"k{i}", i)
            assert r.get("k999") == b"999"
            r.close()
    finally:
        node.stop()


def test_cacheport_speaks_tls_to_an_encrypted_memcached_node(pki: Pki) -> None:
    node = tls_memcached(pki)
    try:
        listener = {"name": "m", "listen": "127.0.0.1:0", "upstream": node.address,
                    "protocol": "memcached", "upstream_tls": {"ca": str(pki.ca_file)}}
        with running_proxy([listener]) as proxy:
            mc = Client(("127.0.0.1", proxy.port("m")), connect_timeout=5, timeout=10)
            assert mc.set("greeting", b"over TLS")
            assert mc.get("greeting") == b"over TLS"
            mc.close()
    finally:
        node.stop()


@pytest.mark.parametrize("problem", ["unknown CA", "expired", "wrong name"])
def test_untrusted_upstream_certificate_is_refused_cleanly(
    pki: Pki, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    cert = key = None
    ca = str(pki.ca_file)
    server_name = "localhost"
    if problem == "unknown CA":
        ca = str(pki.other_ca_file)
    elif problem == "expired":
        past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
        cert, key = pki.issue("expired", not_before=past - datetime.timedelta(days=30),
                              not_after=past)
    else:
        server_name = "cache.example.test"
    node = tls_redis(pki, cert, key)
    try:
        listener = {"name": "r", "listen": "127.0.0.1:0", "upstream": node.address,
                    "upstream_tls": {"ca": ca, "server_name": server_name}}
        with running_proxy([listener]) as proxy:
            assert until_closed(proxy.port("r"), b"PING\r\n") == b""
            stats = proxy.server.listeners["r"].stats
            wait_until(lambda: stats.refused.get("upstream_tls_failed") == 1, 5)
    finally:
        node.stop()
    lines = [r.getMessage() for r in caplog.records if "TLS handshake with upstream" in
             r.getMessage()]
    assert lines and "certificate verify failed" in lines[0], lines


def test_verify_false_is_explicit_and_warned(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    node = tls_redis(pki)
    try:
        listener = {"name": "r", "listen": "127.0.0.1:0", "upstream": node.address,
                    "upstream_tls": {"verify": False}}
        with running_proxy([listener]) as proxy:
            r = redis.Redis(port=proxy.port("r"), socket_timeout=5)
            assert r.ping()
            r.close()
    finally:
        node.stop()
    assert any("verify: false" in r.getMessage() for r in caplog.records)


def test_certificates_are_reread_on_reload(pki: Pki, plain_redis: ServerProcess) -> None:
    path = pki.dir / "map.yaml"
    path.write_text(yaml.safe_dump({"admin": False, "defaults": {"health": False},
                                    "listeners": [client_tls_listener(plain_redis, pki)]}))
    proxy = ProxyThread(load_config(path)).start()
    try:
        port = proxy.port("tls")

        def serial() -> int:
            ctx = pki.client_context()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost") as conn:
                der = conn.getpeercert(binary_form=True)
                assert der is not None
                return hash(der)

        before = serial()
        new_cert, new_key = pki.issue("renewed")
        pki.server_cert.write_bytes(new_cert.read_bytes())  # renewed in place, as certbot does
        pki.server_key.write_bytes(new_key.read_bytes())
        assert serial() == before  # not re-read until a reload
        plan = proxy.call(lambda: proxy.server.reload(load_config(path)))
        assert plan.empty
        assert serial() != before
    finally:
        proxy.stop()


def test_bad_certificate_files_are_config_errors(tmp_path: Path, pki: Pki) -> None:
    from proxy.config import ConfigError
    from proxy.server import Server, StartError

    with pytest.raises(ConfigError, match="field 'tls': cert: no such file"):
        make_config([{"name": "a", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1",
                      "tls": {"cert": str(tmp_path / "missing.pem"), "key": "k"}}])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    config = make_config([{"name": "a", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1",
                           "tls": {"cert": str(garbage), "key": str(garbage)}}])
    import asyncio

    with pytest.raises(StartError, match="listener 'a': field 'tls': cannot use cert"):
        asyncio.run(Server(config).start())


@pytest.mark.timeout(120)
def test_a_stalled_tls_client_holds_cacheport_to_a_bounded_memory(
        pki: Pki, tmp_path: Path) -> None:
    """The relay's own TLS layer keeps the buffered relay's bound: while the TLS client
    reads nothing, cacheport stops reading the upstream instead of taking its 64 MiB in
    (ciphertext included), and then delivers every byte intact."""
    size = 64 << 20
    expected = hashlib.sha256(pattern(size)).hexdigest()
    with tcp_upstream(push(size)) as port:
        proxy_port = free_port()
        config = tmp_path / "tls-bp.yaml"
        config.write_text(yaml.safe_dump({"admin": False, "listeners": [{
            "name": "bp", "listen": f"127.0.0.1:{proxy_port}", "upstream": f"127.0.0.1:{port}",
            "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)}}]}))
        proc = CacheportProcess(config)
        try:
            proc.wait_serving()
            rss_before = psutil.Process(proc.pid).memory_info().rss
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            raw.settimeout(60)
            raw.connect(("127.0.0.1", proxy_port))
            ctx = pki.client_context()
            with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                time.sleep(2.0)  # every buffer on the way fills
                rss_stalled = psutil.Process(proc.pid).memory_info().rss
                digest, received = hashlib.sha256(), 0
                while received < size and (chunk := sock.recv(1 << 20)):
                    digest.update(chunk)
                    received += len(chunk)
        finally:
            proc.stop()
    assert received == size
    assert digest.hexdigest() == expected
    growth = rss_stalled - rss_before
    assert growth < 8 << 20, f"cacheport grew {growth >> 20} MiB while the TLS client stalled"
