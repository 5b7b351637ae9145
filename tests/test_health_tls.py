"""Checks of nodes with in-transit encryption speak TLS, with the listener's own settings."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.healthkit import (
    DOWN_WITHIN,
    FAST,
    UP_WITHIN,
    proxy_with_admin,
    upstream_status,
    wait_health,
)
from tests.support import ServerProcess, free_port, port_open, wait_until


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    paths = {"ca": tmp_path / "ca.pem", "other_ca": tmp_path / "other-ca.pem",
             "cert": tmp_path / "server.pem", "key": tmp_path / "server.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    trustme.CA().cert_pem.write_to_path(str(paths["other_ca"]))
    issued = ca.issue_cert("localhost", "127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    issued.private_key_pem.write_to_path(str(paths["key"]))
    return paths


def started(command: list[str], kind: str, port: int) -> ServerProcess:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = ServerProcess(kind, proc, port)
    try:
        wait_until(lambda: port_open(port), 10, message=f"{kind} with TLS to listen")
    except AssertionError:
        server.stop()
        raise
    return server


@pytest.fixture
def tls_nodes(certs: dict[str, Path]) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """A redis-server and a memcached that speak only TLS."""
    rport, mport = free_port(), free_port()
    redis_node = started(
        ["redis-server", "--port", "0", "--tls-port", str(rport), "--bind", "127.0.0.1",
         "--tls-cert-file", str(certs["cert"]), "--tls-key-file", str(certs["key"]),
         "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--logfile", ""], "redis", rport)
    try:
        user = ["-u", "root"] if os.geteuid() == 0 else []
        memcached_node = started(
            ["memcached", *user, "-l", "127.0.0.1", "-p", str(mport), "-Z", "-o",
             f"ssl_chain_cert={certs['cert']},ssl_key={certs['key']}"], "memcached", mport)
        try:
            yield redis_node, memcached_node
        finally:
            memcached_node.stop()
    finally:
        redis_node.stop()


def test_checks_of_tls_nodes_handshake_and_verify_like_the_relay(
        certs: dict[str, Path], tls_nodes: tuple[ServerProcess, ServerProcess]) -> None:
    redis_node, memcached_node = tls_nodes
    good = {"ca": str(certs["ca"]), "server_name": "localhost"}
    bad = {"ca": str(certs["other_ca"]), "server_name": "localhost"}
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
            reason = upstream_status(proxy, name, node.address)["last_check"]["reason"]
            assert reason.startswith("TLS: certificate verify failed"), reason
