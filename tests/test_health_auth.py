"""Redis checks that authenticate (requirepass, ACL users), and passwords that never leak."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.healthkit import (
    DOWN_WITHIN,
    FAST,
    UP_WITHIN,
    http_get,
    last_check,
    proxy_with_admin,
    secured_redis_server,
    status,
    wait_health,
)
from tests.support import (
    CacheportProcess,
    ServerProcess,
    free_port,
    run_cli,
    wait_until,
)

PASSWORD = "s3cret-Zebra-Quartz-81"
WRONG = "wr0ng-Walrus-Pylon-27"
ACL_PASSWORD = "acl-Heron-Basalt-66"


@pytest.fixture
def secured_redis() -> Iterator[ServerProcess]:
    with secured_redis_server(PASSWORD, ACL_PASSWORD) as server:
        yield server


def test_checks_authenticate_and_a_wrong_password_never_shows_anywhere(
        tmp_path: Path, secured_redis: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a real ``cacheport run``: the log, /status, /metrics, ``cacheport status``."""
    monkeypatch.setenv("CACHEPORT_TEST_REDIS_PW", PASSWORD)
    (tmp_path / "wrong.pw").write_text(WRONG + "\n")
    admin_port = free_port()
    path = tmp_path / "cacheport.yaml"
    up = secured_redis.address
    path.write_text(yaml.safe_dump({
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        # The first check decides (UNKNOWN -> UP or DOWN, asserted below by its reason):
        # 1 s for it, not FAST's 200 ms, which a process just started on a loaded machine
        # can overrun -- "timed out" would then stand where "PONG" is expected.
        "defaults": {"protocol": "redis", "health": {**FAST, "interval": "1s", "timeout": "1s"}},
        "listeners": [
            {"name": "good", "listen": f"127.0.0.1:{free_port()}", "upstream": up,
             "health": {"password_env": "CACHEPORT_TEST_REDIS_PW"}},
            {"name": "bad", "listen": f"127.0.0.1:{free_port()}", "upstream": up,
             "health": {"password_file": "wrong.pw"}},
            {"name": "inline", "listen": f"127.0.0.1:{free_port()}", "upstream": up,
             "health": {"password": WRONG}},
        ],
    }))
    proc = CacheportProcess(path, "--log-level", "debug")
    try:
        proc.wait_serving()
        wait_until(lambda: "listener good upstream" in proc.log()
                   and "listener bad upstream" in proc.log(), DOWN_WITHIN, interval=0.05,
                   message="both checks to decide")
        log = proc.log()
        assert f"listener good upstream {up} UNKNOWN -> UP (reason: PONG, 1 check)" in log
        assert f"listener bad upstream {up} UNKNOWN -> DOWN (reason: auth failed, 1 check)" \
            in log
        table = run_cli("status", "-c", str(path))
        raw = run_cli("status", "-c", str(path), "--json")
        assert table.returncode == 0 and "DOWN (auth failed)" in table.stdout
        admin_json = run_cli("status", "--admin", f"127.0.0.1:{admin_port}", "--json")
        # debug logging shows every failed check: still no password
        wait_until(lambda: proc.log().count("check failed: auth failed") >= 4, 5,
                   message="a few failed checks in the debug log")
    finally:
        proc.stop()
    outputs = {"log": proc.log(), "status table": table.stdout + table.stderr,
               "status json": raw.stdout + raw.stderr,
               "status json (admin)": admin_json.stdout}
    for where, text in outputs.items():
        for secret in (PASSWORD, WRONG):
            assert secret not in text, f"a password appears in the {where}"


def test_acl_user_check_and_password_scrubbed_from_status_and_logs(
        secured_redis: ServerProcess, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="cacheport")
    up = secured_redis.address
    listeners = [
        {"name": "acl", "listen": "127.0.0.1:0", "upstream": up, "protocol": "redis",
         "health": {**FAST, "username": "checker", "password": ACL_PASSWORD,
                    "role": "primary"}},
        {"name": "acl-wrong", "listen": "127.0.0.1:0", "upstream": up, "protocol": "redis",
         "health": {**FAST, "username": "checker", "password": WRONG}},
        {"name": "no-auth", "listen": "127.0.0.1:0", "upstream": up, "protocol": "redis",
         "health": FAST},
    ]
    with proxy_with_admin(listeners) as proxy:
        wait_health(proxy, "acl", up, "up", UP_WITHIN)
        wait_health(proxy, "acl-wrong", up, "down", DOWN_WITHIN)
        wait_health(proxy, "no-auth", up, "down", DOWN_WITHIN)
        last_check(proxy, "acl", up, "PONG, role master")
        for name in ("acl-wrong", "no-auth"):
            last_check(proxy, name, up, "auth failed")
        texts = [str(status(proxy)), http_get(proxy, "/metrics")[2].decode(),
                 repr(proxy.config), str(proxy.config)]
    texts += [record.getMessage() for record in caplog.records]
    for text in texts:
        for secret in (ACL_PASSWORD, WRONG, PASSWORD):
            assert secret not in text
