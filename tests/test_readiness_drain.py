"""/readyz for a load balancer's target group: unready the moment a stop begins, while the
listeners keep accepting for ``drain_delay`` so the balancer deregisters the host first."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from proxy.admin import fetch_status
from proxy.config import Address
from tests.healthkit import http_get, proxy_with_admin
from tests.lbkit import quiet_port, resp_ping
from tests.support import CacheportProcess, ServerProcess, make_config, wait_until

pytestmark = pytest.mark.timeout(30)


def lc(redis_server: ServerProcess) -> dict[str, object]:
    return {"name": "r", "listen": "127.0.0.1:0", "upstream": redis_server.address,
            "protocol": "redis"}


def test_drain_delay_defaults_to_a_few_seconds_only_where_a_balancer_can_see_readyz() -> None:
    one = [{"name": "r", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1"}]
    assert make_config(one, admin={"listen": "127.0.0.1:0"}).drain_delay == 0
    assert make_config(one, admin=False).drain_delay == 0
    assert make_config(one, admin={"listen": "0.0.0.0:9180"}).drain_delay == 5
    assert make_config(one, admin={"listen": "127.0.0.1:0"}, drain_delay="2s").drain_delay == 2
    assert make_config(one, admin={"listen": "0.0.0.0:9180"}, drain_delay="off").drain_delay == 0


def test_stop_makes_readyz_fail_at_once_and_keeps_accepting_for_drain_delay(
        redis_server: ServerProcess) -> None:
    # 3 s of drain: the checks below must all fit in it, on a loaded machine too.
    with proxy_with_admin([lc(redis_server)], drain_delay="3s") as proxy:
        port = proxy.port("r")
        assert http_get(proxy, "/readyz")[0] == 200
        stopper = threading.Thread(target=proxy.stop)
        started = time.monotonic()
        stopper.start()
        wait_until(lambda: http_get(proxy, "/readyz")[0] == 503, 3, message="/readyz 503")
        _code, _headers, body = http_get(proxy, "/readyz")
        assert body.startswith(b"not ready: draining")
        # Still serving new clients: the balancer has not deregistered us yet.
        assert resp_ping(port) == b"+PONG\r\n"
        stopper.join(15)
        elapsed = time.monotonic() - started
        assert 2.9 <= elapsed < 10, elapsed


def test_a_second_stop_request_ends_drain_delay_at_once(redis_server: ServerProcess) -> None:
    with proxy_with_admin([lc(redis_server)], drain_delay="20s") as proxy:
        started = time.monotonic()
        assert proxy.loop is not None
        proxy.loop.call_soon_threadsafe(proxy.server.request_stop)
        wait_until(lambda: http_get(proxy, "/readyz")[0] == 503, 2, message="/readyz 503")
        proxy.loop.call_soon_threadsafe(proxy.server.request_stop)
        wait_until(lambda: not proxy._thread.is_alive(), 5, message="stopped")
        assert time.monotonic() - started < 5


def test_readyz_waits_for_a_healthy_upstream_when_asked(redis_server: ServerProcess) -> None:
    fast = {"interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 1}
    with proxy_with_admin([{**lc(redis_server), "health": fast}],
                          admin={"listen": "127.0.0.1:0", "ready_requires_healthy": True}) as p:
        wait_until(lambda: http_get(p, "/readyz")[0] == 200, 5, message="ready")
        redis_server.kill()
        wait_until(lambda: http_get(p, "/readyz")[0] == 503, 5, message="unready")
        assert http_get(p, "/readyz")[2] == b"not ready: no upstream is healthy\n"


def test_with_workers_the_supervisor_readyz_fails_at_once_and_workers_keep_accepting(
        tmp_path: Path, redis_server: ServerProcess) -> None:
    port, admin = quiet_port(), quiet_port()
    config = tmp_path / "ports.yaml"
    config.write_text(
        f"admin: {{listen: 127.0.0.1:{admin}}}\ndrain_delay: 3s\nworkers: 2\n"
        f"defaults: {{health: off}}\nlisteners:\n"
        f"  - {{name: r, listen: 127.0.0.1:{port}, upstream: {redis_server.address}}}\n")
    proc = CacheportProcess(config)
    try:
        proc.wait_serving()
        where = Address("127.0.0.1", admin)
        wait_until(lambda: fetch_status(where)["ready"], 10, message="ready")
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        wait_until(lambda: not fetch_status(where)["ready"], 3, message="unready")
        assert "draining" in fetch_status(where)["ready_reason"]
        assert resp_ping(port) == b"+PONG\r\n"  # still accepting during drain_delay
        assert proc.wait(20) == 0
        assert time.monotonic() - started >= 2.9
    finally:
        proc.stop()
