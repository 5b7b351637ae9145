"""Who may connect: allow lists and connection limits, enforced at accept."""

from __future__ import annotations

import socket

import redis

from tests.support import ServerProcess, running_proxy, wait_until


def listener(server: ServerProcess, **extra: object) -> list[dict[str, object]]:
    return [{"name": "rd", "listen": "127.0.0.1:0", "upstream": server.address,
             "protocol": "redis", **extra}]


def closed_at_once(port: int, source: str = "127.0.0.1") -> bool:
    """Connect from ``source``; True when cacheport closes us without a byte."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(b"PING\r\n")
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def test_client_outside_allow_list_is_closed_before_upstream_is_dialled(
    redis_server: ServerProcess,
) -> None:
    with running_proxy(listener(redis_server, allow=["127.0.0.2/32", "::1/128"])) as proxy:
        port = proxy.port("rd")
        assert closed_at_once(port, "127.0.0.1")
        stats = proxy.server.listeners["rd"].stats
        assert stats.refused == {"not_allowed": 1}
        assert stats.accepted == 0  # never dialled
        allowed = socket.create_connection(("127.0.0.1", port), timeout=5,
                                           source_address=("127.0.0.2", 0))
        allowed.sendall(b"PING\r\n")
        assert allowed.recv(100) == b"+PONG\r\n"
        allowed.close()


def test_max_connections_refuses_new_and_keeps_existing(redis_server: ServerProcess) -> None:
    with running_proxy(listener(redis_server, max_connections=2)) as proxy:
        port = proxy.port("rd")
        first = redis.Redis(port=port, socket_timeout=5, single_connection_client=True)
        second = redis.Redis(port=port, socket_timeout=5, single_connection_client=True)
        assert first.ping() and second.ping()
        wait_until(lambda: proxy.server.listeners["rd"].active == 2, 5)
        assert closed_at_once(port)
        assert first.set("still", "working") and second.get("still") == b"working"
        assert proxy.server.listeners["rd"].stats.refused == {"max_connections": 1}
        first.close()
        wait_until(lambda: proxy.server.listeners["rd"].active == 1, 5)
        assert not closed_at_once(port)  # room again
        second.close()


def test_max_connections_per_client_counts_each_source(redis_server: ServerProcess) -> None:
    with running_proxy(listener(redis_server, max_connections_per_client=1)) as proxy:
        port = proxy.port("rd")
        held = socket.create_connection(("127.0.0.1", port), timeout=5)
        held.sendall(b"PING\r\n")
        assert held.recv(100) == b"+PONG\r\n"
        assert closed_at_once(port, "127.0.0.1")
        assert not closed_at_once(port, "127.0.0.3")  # another client is unaffected
        held.close()
        wait_until(lambda: proxy.server.listeners["rd"].active == 0, 5)
        assert not closed_at_once(port, "127.0.0.1")
        assert proxy.server.listeners["rd"].stats.refused == {"max_connections_per_client": 1}
