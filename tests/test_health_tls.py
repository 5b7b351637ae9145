"""Checks of nodes with in-transit encryption speak TLS, with the listener's own settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.certs import Pki, tls_memcached, tls_redis
from tests.healthkit import (
    DOWN_WITHIN,
    FAST,
    UP_WITHIN,
    last_check,
    proxy_with_admin,
    wait_health,
)
from tests.support import ServerProcess


@pytest.fixture
def tls_nodes(pki: Pki) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """A redis-server and a memcached that speak only TLS."""
    redis_node = tls_redis(pki)
    try:
        memcached_node = tls_memcached(pki)
        try:
            yield redis_node, memcached_node
        finally:
            memcached_node.stop()
    finally:
        redis_node.stop()


def test_checks_of_tls_nodes_handshake_and_verify_like_the_relay(
        pki: Pki, tls_nodes: tuple[ServerProcess, ServerProcess]) -> None:
    redis_node, memcached_node = tls_nodes
    good = {"ca": str(pki.ca_file), "server_name": "localhost"}
    bad = {"ca": str(pki.other_ca_file), "server_name": "localhost"}
    listeners = [
        {"name": "r", "listen": "127.0.0.1:0", "upstream": redis_node.address,
         "protocol": "redis", "upstream_tls": good, "health": FAST},
        {"name": "m", "listen": "127.0.0.1:0", "upstream": memcached_node.address,
         "protocol": "memcached", "upstream_tls": good, "health": FAST},
        {"name": "r-untrusted", "listen": "127.0.0.1:0", "upstream": redis_node.address,
         "protocol": "redis", "upstream_tls": bad, "health": FAST},
        {"name": "m-untrusted", "listen": "127.0.0.1:0", "upstream": memcached_node.address,
         "protocol": "memcached", "upstream_tls": bad, "health": FAST},
    ]
    with proxy_with_admin(listeners) as proxy:
        wait_health(proxy, "r", redis_node.address, "up", UP_WITHIN)
        wait_health(proxy, "m", memcached_node.address, "up", UP_WITHIN)
        wait_health(proxy, "r-untrusted", redis_node.address, "down", DOWN_WITHIN)
        wait_health(proxy, "m-untrusted", memcached_node.address, "down", DOWN_WITHIN)
        for name, node in (("r-untrusted", redis_node), ("m-untrusted", memcached_node)):
            last_check(proxy, name, node.address, "TLS: certificate verify failed")
