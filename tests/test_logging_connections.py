"""The connection log (``log_connections: true``): one line per closed or refused
connection on every relay -- the native engine, the Python splice and buffered relays,
a TLS listener, a cluster node's listener -- with bytes each way and why it ended."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy import closes
from proxy.logs import CONNECTIONS_LOGGER
from proxy.relay.engine import native_available
from tests.certs import Pki
from tests.cluster_helpers import redis_cluster_entry, start_lone_node
from tests.healthkit import metrics, sample
from tests.support import (
    ProxyThread,
    ServerProcess,
    free_port,
    make_config,
    running_proxy,
    tcp_listener,
    wait_until,
)

PING = b"*1\r\n$4\r\nPING\r\n"  # 14 bytes; +PONG\r\n is 7
QUIT = b"*1\r\n$4\r\nQUIT\r\n"  # 14 bytes; +OK\r\n is 5, then redis closes


class Lines(logging.Handler):
    """The connection log's records as the writer thread hands them to the logger."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []
        self.seen: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        fields = dict(record.__dict__)
        fields["message"] = record.getMessage()
        self.lines.append(fields)

    def wait(self, count: int = 1, **match: object) -> list[dict[str, Any]]:
        """The next ``count`` matching lines not returned by an earlier wait: the
        kernel may give a later connection the same client port as an earlier one."""
        def found() -> list[dict[str, Any]]:
            hits = [line for line in list(self.lines)
                    if id(line) not in self.seen
                    and all(line.get(k) == v for k, v in match.items())]
            return hits if len(hits) >= count else []

        hits: list[dict[str, Any]] = wait_until(found, 10, message=f"log lines {match}")
        self.seen.update(id(line) for line in hits)
        return hits


@pytest.fixture
def lines() -> Iterator[Lines]:
    logger = logging.getLogger(CONNECTIONS_LOGGER)
    handler = Lines()
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def _name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _talk(port: int, request: bytes, reply: int, *, wait_eof: bool = False,
          wrap: ssl.SSLContext | None = None) -> str:
    """Send ``request``, read ``reply`` bytes, close; the client's own address."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock = wrap.wrap_socket(raw, server_hostname="localhost") if wrap else raw
    with sock:
        me = _name(sock)
        sock.sendall(request)
        got = b""
        while len(got) < reply:
            chunk = sock.recv(reply - len(got))
            assert chunk, got
            got += chunk
        if wait_eof:
            assert sock.recv(16) == b""
    return me


def _check(line: dict[str, Any], client: str, upstream: str, up: int, down: int,
           reason: str) -> None:
    assert line["message"] == "connection closed"
    assert (line["client"], line["upstream"]) == (client, upstream)
    assert (line["bytes_upstream"], line["bytes_downstream"], line["reason"]) == \
        (up, down, reason)
    assert line["start"].endswith("Z") and 0 <= line["duration"] < 10


def test_every_relay_logs_who_closed_first_and_the_bytes_each_way(
        copy_mode: str, redis_server: ServerProcess, lines: Lines) -> None:
    with running_proxy(tcp_listener(redis_server.port, copy=copy_mode,
                                    log_connections=True)) as proxy:
        port = proxy.port("t")
        me = _talk(port, PING, 7)
        (line,) = lines.wait(client=me)
        _check(line, me, redis_server.address, 14, 7, closes.CLIENT_CLOSED)
        assert line["listener"] == "t"
        me = _talk(port, QUIT, 5, wait_eof=True)
        (line,) = lines.wait(client=me)
        _check(line, me, redis_server.address, 14, 5, closes.UPSTREAM_CLOSED)
        stats = proxy.server.listeners["t"].stats
        wait_until(lambda: stats.closed == {"client_closed": 1, "upstream_closed": 1}, 5)


def test_idle_timeout_is_the_reason_on_every_relay(
        copy_mode: str, redis_server: ServerProcess, lines: Lines) -> None:
    with running_proxy(tcp_listener(redis_server.port, copy=copy_mode, idle_timeout="300ms",
                                    log_connections=True)) as proxy:
        me = _talk(proxy.port("t"), PING, 7, wait_eof=True)
        (line,) = lines.wait(client=me)
        _check(line, me, redis_server.address, 14, 7, closes.IDLE_TIMEOUT)


def test_without_log_connections_nothing_is_logged(
        redis_server: ServerProcess, lines: Lines) -> None:
    with running_proxy(tcp_listener(redis_server.port)) as proxy:
        _talk(proxy.port("t"), PING, 7)
        wait_until(lambda: proxy.server.listeners["t"].stats.closed, 5)
        time.sleep(0.2)  # the writer thread would have had it by now
    assert lines.lines == []


def _refused(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        me = _name(sock)
        try:
            assert sock.recv(16) == b""
        except ConnectionResetError:
            pass
    return me


def test_refusals_are_logged_with_their_reason(redis_server: ServerProcess,
                                               lines: Lines) -> None:
    dead = free_port()  # nothing listens there
    listeners = [
        {"name": "walled", "listen": "127.0.0.1:0", "upstream": redis_server.address,
         "allow": ["10.0.0.0/8"]},
        {"name": "one", "listen": "127.0.0.1:0", "upstream": redis_server.address,
         "max_connections": 1},
        {"name": "dead", "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{dead}",
         "connect_timeout": "1s"},
    ]
    with running_proxy(listeners, defaults={"health": False, "log_connections": True,
                                            "relay": "python"}) as proxy:
        me = _refused(proxy.port("walled"))
        (line,) = lines.wait(client=me)
        assert (line["message"], line["listener"], line["reason"], line["upstream"]) == \
            ("connection refused", "walled", closes.NOT_ALLOWED, None)
        with socket.create_connection(("127.0.0.1", proxy.port("one")), timeout=5) as held:
            held.sendall(PING)
            assert held.recv(7) == b"+PONG\r\n"
            me = _refused(proxy.port("one"))
            (line,) = lines.wait(client=me)
            assert (line["listener"], line["reason"]) == ("one", closes.MAX_CONNECTIONS)
        me = _refused(proxy.port("dead"))
        (line,) = lines.wait(client=me)
        assert (line["listener"], line["reason"], line["upstream"]) == \
            ("dead", closes.UPSTREAM_CONNECT_FAILED, f"127.0.0.1:{dead}")
        assert proxy.server.listeners["dead"].stats.refused == \
            {closes.UPSTREAM_CONNECT_FAILED: 1}


def test_a_tls_listener_logs_plaintext_bytes_and_failed_handshakes(
        pki: Pki, redis_server: ServerProcess, lines: Lines) -> None:
    client = pki.client_context()
    listener = {"name": "tls", "listen": "127.0.0.1:0", "upstream": redis_server.address,
                "log_connections": True,
                "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)}}
    with running_proxy([listener]) as proxy:
        port = proxy.port("tls")
        me = _talk(port, PING, 7, wrap=client)
        (line,) = lines.wait(client=me)
        _check(line, me, redis_server.address, 14, 7, closes.CLIENT_CLOSED)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
            me = _name(plain)
            plain.sendall(b"PING\r\n\r\n")  # not a ClientHello
            (line,) = lines.wait(client=me)
        assert (line["message"], line["reason"]) == \
            ("connection refused", closes.TLS_HANDSHAKE_FAILED)


@pytest.mark.parametrize("relay", [
    "python",
    pytest.param("native", marks=pytest.mark.skipif(not native_available(),
                                                    reason="the engine is not built here"))])
def test_a_cluster_node_listener_logs_its_connections(
        relay: str, tmp_path: Path, lines: Lines) -> None:
    node = start_lone_node(tmp_path)
    try:
        cluster = redis_cluster_entry(node.address, 2, relay=relay, log_connections=True)
        proxy = ProxyThread(make_config([], clusters=[cluster],
                                        state_dir=str(tmp_path / "state"))).start()
        try:
            status = proxy.call(proxy.server.cluster_status)[0]
            (entry,) = status["nodes"]
            wait_until(lambda: proxy.call(lambda: any(
                lst.bound is not None and lst.bound.port == entry["port"]
                for lst in proxy.server.listeners.values())), 10)
            me = _talk(entry["port"], PING, 7)
            (line,) = lines.wait(client=me)
            _check(line, me, node.address, 14, 7, closes.CLIENT_CLOSED)
            assert line["listener"].startswith("rc")
        finally:
            proxy.stop()
    finally:
        node.stop()


def test_metrics_count_closes_by_reason_and_dropped_lines(
        redis_server: ServerProcess, lines: Lines) -> None:
    admin = free_port()
    with running_proxy(tcp_listener(redis_server.port, log_connections=True),
                       admin={"listen": f"127.0.0.1:{admin}"}) as proxy:
        me = _talk(proxy.port("t"), PING, 7)
        lines.wait(client=me)
        samples = metrics(proxy)
        assert sample(samples, "cacheport_connections_closed_total", listener="t",
                      reason="client_closed") == 1
        # Shown from the start, for alerts.
        assert ("cacheport_connections_closed_total",
                frozenset({("listener", "t"), ("reason", "idle_timeout")})) in samples
        assert ("cacheport_log_lines_dropped_total", frozenset()) in samples


def test_behind_a_load_balancer_the_line_names_the_client_of_the_proxy_header(
        redis_server: ServerProcess, lines: Lines) -> None:
    listener = tcp_listener(redis_server.port, log_connections=True, proxy_protocol="v1",
                            proxy_protocol_from=["127.0.0.1/32"])
    with running_proxy(listener) as proxy:
        header = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 6379\r\n"
        _talk(proxy.port("t"), header + PING, 7)
        (line,) = lines.wait(client="203.0.113.7:5555")
        _check(line, "203.0.113.7:5555", redis_server.address, 14, 7, closes.CLIENT_CLOSED)


def test_a_connection_cut_at_stop_says_so(redis_server: ServerProcess, lines: Lines) -> None:
    proxy = ProxyThread(make_config(tcp_listener(redis_server.port, log_connections=True,
                                                 relay="python"))).start()
    try:
        sock = socket.create_connection(("127.0.0.1", proxy.port("t")), timeout=5)
        me = _name(sock)
        sock.sendall(PING)
        assert sock.recv(7) == b"+PONG\r\n"
    finally:
        proxy.stop()  # drain_timeout 0: the live connection is cut
    sock.close()
    (line,) = lines.wait(client=me)
    _check(line, me, redis_server.address, 14, 7, closes.CUT_AT_STOP)
