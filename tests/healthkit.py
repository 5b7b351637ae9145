"""Helpers for the health, backup and admin tests: fast check settings, HTTP, metrics."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Address
from tests.support import (
    ProxyThread,
    ServerProcess,
    free_port,
    running_proxy,
    start_server,
    wait_until,
)

# Short timings so a DOWN/UP cycle takes about a second.
INTERVAL = 0.2
TIMEOUT = 0.2
RISE = 2
FALL = 3
FAST: dict[str, Any] = {"interval": "200ms", "timeout": "200ms", "rise": RISE, "fall": FALL}
# interval x fall + timeout, with the 10% jitter, plus room for a noisy 2-core machine
DOWN_WITHIN = INTERVAL * 1.1 * FALL + TIMEOUT + 1.5
UP_WITHIN = INTERVAL * 1.1 * RISE + TIMEOUT + 1.5
ADMIN = {"listen": "127.0.0.1:0"}


def secured_redis_server(password: str, acl_password: str | None = None) -> ServerProcess:
    """redis-server with ``requirepass`` and an ACL user ``checker`` (password
    ``acl_password``, else the same) that may only PING and ROLE."""
    return start_server("redis", [
        "--requirepass", password,
        "--user", "checker", "on", f">{acl_password or password}", "+@connection", "+role",
    ])


@contextlib.contextmanager
def proxy_with_admin(listeners: list[dict[str, Any]], **top: Any) -> Iterator[ProxyThread]:
    top.setdefault("admin", ADMIN)
    with running_proxy(listeners, **top) as proxy:
        yield proxy


def admin_address(proxy: ProxyThread) -> Address:
    assert proxy.server.admin is not None and proxy.server.admin.bound is not None
    return proxy.server.admin.bound


def http_get(proxy: ProxyThread, path: str, method: str = "GET") -> tuple[int, dict[str, str],
                                                                          bytes]:
    address = admin_address(proxy)
    conn = http.client.HTTPConnection(address.host, address.port, timeout=5)
    try:
        conn.request(method, path)
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def status(proxy: ProxyThread) -> dict[str, Any]:
    code, _headers, body = http_get(proxy, "/status")
    assert code == 200
    doc: dict[str, Any] = json.loads(body)
    return doc


def upstream_status(proxy: ProxyThread, listener: str, address: str) -> dict[str, Any]:
    for lst in status(proxy)["listeners"]:
        if lst["name"] == listener:
            for up in lst["upstreams"]:
                if up["address"] == address:
                    return dict(up)
    raise AssertionError(f"no upstream {address} under listener {listener} in /status")


def last_check(proxy: ProxyThread, listener: str, address: str, reason: str,
               timeout: float = 5) -> dict[str, Any]:
    """The upstream's /status entry once its last check's reason starts with ``reason``.

    Asked once, the last check may be one that a loaded machine let overrun FAST's
    200 ms ("timed out") -- one failure moves no state, so the wait for the state passed
    -- and the next check, 200 ms on, gives the reason again."""
    found: dict[str, Any] = {}

    def matches() -> bool:
        found.update(upstream_status(proxy, listener, address))
        return str((found.get("last_check") or {}).get("reason", "")).startswith(reason)

    try:
        wait_until(matches, timeout, interval=0.05)
    except AssertionError:
        raise AssertionError(f"no check of {address} ({listener}) said {reason!r} within "
                             f"{timeout}s; the last: {found.get('last_check')}") from None
    return found


def metrics(proxy: ProxyThread) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, parsed by prometheus-client's own parser."""
    code, headers, body = http_get(proxy, "/metrics")
    assert code == 200
    assert headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def health_of(proxy: ProxyThread, listener: str, address: str) -> str:
    state = proxy.call(lambda: _state(proxy, listener, address))
    return str(state)


def _state(proxy: ProxyThread, listener: str, address: str) -> str:
    monitor = proxy.server.monitor
    assert monitor is not None
    for target in monitor.targets_of(listener):
        if str(target.upstream) == address:
            return target.state.value
    return "unchecked"


def wait_health(proxy: ProxyThread, listener: str, address: str, state: str,
                timeout: float) -> None:
    wait_until(lambda: health_of(proxy, listener, address) == state, timeout,
               message=f"listener {listener} upstream {address} to be {state}")


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections (via the backlog) and never reads or answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def closed_port() -> int:
    """A loopback port with nothing listening (connection refused): below the ephemeral
    range (free_port), where no other test's port-0 listener can appear meanwhile."""
    return free_port()
