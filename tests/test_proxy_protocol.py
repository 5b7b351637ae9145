"""PROXY protocol on a listener: a real HAProxy (send-proxy-v2 / send-proxy) in front,
a real redis-server behind; the header's address is the client's for every decision."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy import admission
from proxy.admin import listener_status
from tests.certs import Pki
from tests.conftest import _NATIVE
from tests.lbkit import Backend, haproxy, resp_ping
from tests.support import ProxyThread, ServerProcess, make_config, wait_until
from tests.test_protocols_proxy_header import V1_EXAMPLE, v2_tcp4

pytestmark = pytest.mark.timeout(60)

PONG = b"+PONG\r\n"


def connections_seen(server: ServerProcess) -> int:
    """Connections redis-server accepted, the ones that asked included."""
    return int(redis.Redis(port=server.port).info("stats")["total_connections_received"])


@pytest.fixture
def short_header_timeout(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(admission, "PROXY_HEADER_TIMEOUT", 0.3)
    yield


def pp_proxy(redis_server: ServerProcess, mode: str = "v2", **extra: Any) -> ProxyThread:
    lc = {"name": "r", "listen": "127.0.0.1:0", "upstream": redis_server.address,
          "protocol": "redis", "proxy_protocol": mode,
          "proxy_protocol_from": ["127.0.0.1/32"], **extra}
    return ProxyThread(make_config([lc])).start()


def refused(proxy: ProxyThread) -> dict[str, int]:
    return dict(proxy.call(lambda: dict(proxy.server.listeners["r"].stats.refused)))


@pytest.mark.parametrize("relay", ["python", pytest.param("native", marks=_NATIVE)])
@pytest.mark.parametrize("send, mode", [("send-proxy-v2", "v2"), ("send-proxy", "v1"),
                                        ("send-proxy-v2", "any")])
def test_haproxy_header_gives_the_client_address_to_the_allow_list(
        tmp_path: Path, redis_server: ServerProcess, send: str, mode: str, relay: str) -> None:
    # Clients come from 127.0.0.5 (allowed) and 127.0.0.6 (not); HAProxy always connects
    # from 127.0.0.1, so only the header can tell them apart.
    proxy = pp_proxy(redis_server, mode, allow=["127.0.0.5/32"], relay=relay)
    try:
        with haproxy(tmp_path, [Backend("127.0.0.1", proxy.port("r"))], send) as lb:
            assert resp_ping(lb, "127.0.0.5") == PONG
            assert resp_ping(lb, "127.0.0.6") == b""
            assert resp_ping(lb, "127.0.0.1") == b""  # not in allow either
        assert refused(proxy) == {"not_allowed": 2}
    finally:
        proxy.stop()


def test_per_client_limit_and_status_count_the_header_address(
        tmp_path: Path, redis_server: ServerProcess) -> None:
    proxy = pp_proxy(redis_server, allow=["127.0.0.0/8"], max_connections_per_client=1)
    try:
        with haproxy(tmp_path, [Backend("127.0.0.1", proxy.port("r"))]) as lb:
            held = socket.create_connection(("127.0.0.1", lb), timeout=3,
                                            source_address=("127.0.0.7", 0))
            held.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert held.recv(64) == PONG
            sources = proxy.call(lambda: sorted(
                r.source for r in proxy.server.listeners["r"].relays))
            assert sources == ["127.0.0.7"]
            doc = proxy.call(lambda: listener_status(proxy.server.listeners["r"], None))
            assert doc["clients"] == {"127.0.0.7": 1} and doc["proxy_protocol"] == "v2"
            assert resp_ping(lb, "127.0.0.7") == b""  # the same client: over its limit
            assert resp_ping(lb, "127.0.0.8") == PONG  # another client through the same LB
            held.close()
        assert refused(proxy) == {"max_connections_per_client": 1}
    finally:
        proxy.stop()


def test_spoofed_header_from_an_untrusted_source_is_refused_before_any_byte_moves(
        redis_server: ServerProcess) -> None:
    proxy = pp_proxy(redis_server, "any")
    try:
        before = connections_seen(redis_server)
        spoof = v2_tcp4("198.51.100.27", "10.0.0.1", 40000, 6379)
        # 127.0.0.9 is not in proxy_protocol_from: its claim to be 198.51.100.27 is ignored.
        assert resp_ping(proxy.port("r"), "127.0.0.9", spoof) == b""
        assert resp_ping(proxy.port("r"), "127.0.0.9", V1_EXAMPLE[:47]) == b""
        assert refused(proxy) == {"proxy_protocol_untrusted": 2}
        assert connections_seen(redis_server) == before + 1  # only this question's own
    finally:
        proxy.stop()


def test_missing_malformed_or_slow_header_is_a_clean_close(
        redis_server: ServerProcess, short_header_timeout: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = pp_proxy(redis_server, "v2")
    port = proxy.port("r")
    try:
        before = connections_seen(redis_server)
        assert resp_ping(port) == b""  # a trusted source that sends no header
        assert resp_ping(port, prefix=b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n") == b""  # v1 on v2
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=3) as silent:
            silent.sendall(b"\r\n\r\n\x00")  # the start of a v2 signature, then nothing
            with contextlib.suppress(ConnectionResetError):  # RST: unread bytes at close
                assert silent.recv(1) == b""
        assert time.monotonic() - started < 2
        assert refused(proxy) == {"proxy_protocol_malformed": 2, "proxy_protocol_timeout": 1}
        assert connections_seen(redis_server) == before + 1  # only this question's own
        wait_until(lambda: proxy.call(lambda: proxy.server.listeners["r"].active) == 0, 5)
        # A well-formed header sent in two pieces (the spec allows it) still works -- with
        # the usual timeout: a loaded machine may take longer than 0.3 s between the two.
        monkeypatch.setattr(admission, "PROXY_HEADER_TIMEOUT", 3.0)
        with socket.create_connection(("127.0.0.1", port), timeout=3) as split:
            header = v2_tcp4("127.0.0.1", "127.0.0.1", 1, 2)
            split.sendall(header[:10])
            time.sleep(0.05)
            split.sendall(header[10:] + b"*1\r\n$4\r\nPING\r\n")
            assert split.recv(64) == PONG
    finally:
        proxy.stop()


def test_proxy_protocol_needs_its_trusted_sources() -> None:
    from proxy.config import ConfigError

    with pytest.raises(ConfigError, match="needs proxy_protocol_from"):
        make_config([{"name": "r", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:6379",
                      "proxy_protocol": "v2"}])
    with pytest.raises(ConfigError, match="expected off, v1, v2 or any"):
        make_config([{"name": "r", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:6379",
                      "proxy_protocol": "v3", "proxy_protocol_from": ["10.0.0.0/8"]}])
    config = make_config([{"name": "r", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1"}],
                         defaults={"health": False, "proxy_protocol": "any",
                                   "proxy_protocol_from": "10.0.0.0/8"})
    assert config.listeners[0].proxy_protocol == "any"


def test_tls_listener_reads_the_header_then_terminates_tls(
        tmp_path: Path, redis_server: ServerProcess, pki: Pki) -> None:
    """HAProxy passes the TLS bytes through (mode tcp) after its header; cacheport reads
    the header, then does the handshake on the same socket (the buffered relay)."""
    proxy = pp_proxy(redis_server, "v2", allow=["127.0.0.5/32"],
                     tls={"cert": str(pki.server_cert), "key": str(pki.server_key)})
    try:
        with haproxy(tmp_path, [Backend("127.0.0.1", proxy.port("r"))]) as lb:
            context = pki.client_context()
            for source, expected in (("127.0.0.5", PONG), ("127.0.0.6", b"")):
                raw = socket.create_connection(("127.0.0.1", lb), timeout=3,
                                               source_address=(source, 0))
                try:
                    with context.wrap_socket(raw, server_hostname="localhost") as tls:
                        tls.sendall(b"*1\r\n$4\r\nPING\r\n")
                        assert tls.recv(64) == expected
                except (ssl.SSLError, ConnectionError):
                    assert expected == b""  # refused before the handshake: by the header
                finally:
                    raw.close()
        assert refused(proxy) == {"not_allowed": 1}
    finally:
        proxy.stop()


def test_pymemcache_through_haproxy_send_proxy_v1(tmp_path: Path,
                                                  memcached: ServerProcess) -> None:
    from pymemcache.client.base import Client

    lc = {"name": "m", "listen": "127.0.0.1:0", "upstream": memcached.address,
          "protocol": "memcached", "proxy_protocol": "any",
          "proxy_protocol_from": ["127.0.0.1/32"], "allow": ["127.0.0.0/8"]}
    proxy = ProxyThread(make_config([lc])).start()
    try:
        with haproxy(tmp_path, [Backend("127.0.0.1", proxy.port("m"))], "send-proxy") as lb:
            client = Client(("127.0.0.1", lb), connect_timeout=3, timeout=3)
            try:
                client.set("k", b"v" * 100_000)
                assert client.get("k") == b"v" * 100_000
            finally:
                client.close()
    finally:
        proxy.stop()
