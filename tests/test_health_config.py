"""The ``health:``, ``backup:``, ``on_down:`` and ``admin:`` parts of the port map."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config import (
    Address,
    AdminConfig,
    Config,
    ConfigError,
    HealthConfig,
    Secret,
    load_config,
    load_yaml,
    parse_config,
)

PASSWORD = "Tr0ub4dor-and-3"


def parse(text: str, path: str = "<test>") -> Config:
    return parse_config(load_yaml(textwrap.dedent(text), path), path)


def error(text: str, path: str = "<test>") -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, path)
    return str(info.value)


def test_health_is_on_by_default_with_the_listeners_protocol_and_haproxy_timings() -> None:
    config = parse("""
        listeners:
          - {name: m, listen: '127.0.0.1:1', upstream: 127.0.0.1, protocol: memcached}
          - {name: r, listen: '127.0.0.1:2', upstream: 127.0.0.1, protocol: redis}
          - {name: t, listen: '127.0.0.1:3', upstream: 127.0.0.1:80}
        """)
    kinds = [lc.health.kind if lc.health else None for lc in config.listeners]
    assert kinds == ["memcached", "redis", "tcp"]
    assert config.listeners[0].health == HealthConfig(kind="memcached", interval=2.0,
                                                      timeout=1.0, rise=2, fall=3)
    assert config.listeners[0].on_down == "keep"
    assert config.listeners[0].backup == ()


def test_health_off_disables_it_per_listener_or_in_defaults() -> None:
    config = parse("""
        defaults: {health: off}
        listeners:
          - {name: a, listen: '127.0.0.1:1', upstream: 127.0.0.1:1}
          - {name: b, listen: '127.0.0.1:2', upstream: 127.0.0.1:1, health: {interval: 5s}}
          - {name: c, listen: '127.0.0.1:3', upstream: 127.0.0.1:1, health: on}
        """)
    a, b, c = config.listeners
    assert a.health is None
    assert b.health is not None and b.health.interval == 5.0
    assert c.health == HealthConfig(kind="tcp")
    config = parse("""
        listeners:
          - {name: a, listen: '127.0.0.1:1', upstream: 127.0.0.1:1, health: "off"}
        """)
    assert config.listeners[0].health is None


def test_listener_health_overrides_defaults_key_by_key() -> None:
    config = parse("""
        defaults:
          health: {interval: 500ms, fall: 5, password: x-secret}
        listeners:
          - {name: r, listen: '127.0.0.1:1', upstream: 127.0.0.1, protocol: redis,
             health: {fall: 2, role: primary, username: app}}
          - {name: m, listen: '127.0.0.1:2', upstream: 127.0.0.1, protocol: memcached}
        """)
    r, m = config.listeners
    assert r.health is not None and m.health is not None
    assert (r.health.interval, r.health.fall, r.health.role, r.health.username) == (
        0.5, 2, "primary", "app")
    assert r.health.password == Secret("x-secret")
    # redis credentials in defaults simply do not apply to memcached checks
    assert (m.health.interval, m.health.fall, m.health.password) == (0.5, 5, None)


def test_backup_and_on_down_parse() -> None:
    config = parse("""
        listeners:
          - name: r
            listen: '127.0.0.1:1'
            upstream: 10.0.0.1
            protocol: redis
            backup: [10.0.0.2, "10.0.0.3:7000"]
            on_down: close
        """)
    lc = config.listeners[0]
    assert lc.backup == (Address("10.0.0.2", 6379), Address("10.0.0.3", 7000))
    assert lc.upstreams == (Address("10.0.0.1", 6379), *lc.backup)
    assert lc.on_down == "close"


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("health: {intervall: 1s}",
         "<test>:8: listener 'a': health: unknown field 'intervall' (did you mean 'interval'?)"),
        ("health: {rise: 0}",
         "<test>:8: listener 'a': health: field 'rise': expected a whole number of checks "
         "from 1 to 100, got 0"),
        ("health: {fall: true}", "field 'fall': expected a whole number"),
        ("health: {interval: 1s, timeout: 2s}",
         "<test>:8: listener 'a': health: timeout 2s is longer than interval 1s"),
        ("health: {kind: http}", "field 'kind': expected one of tcp, memcached, redis"),
        ("health: {role: master}", "field 'role': expected primary or any, got 'master'"),
        ("health: {stats: true}",
         "health: field 'stats' applies only to memcached checks, and this check is redis"),
        ("health: {kind: tcp, password: x}",
         "field 'password' applies only to redis checks, and this check is tcp"),
        ("health: {password: a, password_env: B}",
         "health: give only one of password, password_env, password_file, got password and "
         "password_env"),
        ("health: 5", "field 'health': expected off, on or a mapping of check settings, got 5"),
        ("backup: 10.0.0.2", "field 'backup': expected a list of host:port, got '10.0.0.2'"),
        ("backup: [10.0.0.1]", "field 'backup': '10.0.0.1' is the upstream itself"),
        ("backup: [10.0.0.2, '10.0.0.2:6379']", "field 'backup': '10.0.0.2:6379' is listed twice"),
        ("backup: ['10.0.0.2:0']", "field 'backup': port 0 in '10.0.0.2:0' is out of range"),
        ("on_down: drop", "field 'on_down': expected keep or close, got 'drop'"),
        ("{health: off, backup: [10.0.0.2]}",
         "field 'backup' needs health checks to act, and they are off for this listener"),
        ("{health: off, on_down: close}",
         "field 'on_down' needs health checks to act, and they are off for this listener"),
    ],
)
def test_bad_health_settings_name_file_line_listener_and_field(snippet: str,
                                                                expected: str) -> None:
    if snippet.startswith("{"):
        extra = "\n".join(f"    {k.strip()}" for k in _flow_items(snippet))
    else:
        extra = f"    {snippet}"
    text = ("\n\nlisteners:\n  - name: a\n    listen: '127.0.0.1:1'\n    upstream: 10.0.0.1\n"
            "    protocol: redis\n" + extra + "\n")
    message = error(text)
    assert expected in message
    assert message.startswith("<test>:")


def _flow_items(snippet: str) -> list[str]:
    body = snippet.strip("{}")
    items, depth, current = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        current += ch
    items.append(current)
    return items


def test_defaults_health_errors_are_located_too() -> None:
    message = error("""
        defaults:
          health: {fall: -1}
        listeners:
          - {name: a, listen: '127.0.0.1:1', upstream: 127.0.0.1:1}
        """)
    assert message.startswith("<test>:3: defaults: health: field 'fall'")


def test_password_never_shows_in_repr_str_or_errors() -> None:
    config = parse(f"""
        listeners:
          - {{name: r, listen: '127.0.0.1:1', upstream: 127.0.0.1, protocol: redis,
             health: {{username: app, password: {PASSWORD}}}}}
        """)
    health = config.listeners[0].health
    assert health is not None and health.password is not None
    assert health.password.reveal() == PASSWORD
    for text in (repr(config), str(config), repr(health), f"{health.password}",
                 str(health.password), repr(health.password)):
        assert PASSWORD not in text
    # A password of the wrong type is still a password: the error must not echo it.
    message = error("""
        listeners:
          - {name: r, listen: '127.0.0.1:1', upstream: 127.0.0.1, protocol: redis,
             health: {password: [9911, 7731]}}
        """)
    assert "9911" not in message and "value is not shown" in message


def test_password_env_is_read_at_load_and_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEPORT_TEST_PW", PASSWORD)
    config = parse("""
        listeners:
          - {name: r, listen: '127.0.0.1:1', upstream: 127.0.0.1, protocol: redis,
             health: {password_env: CACHEPORT_TEST_PW}}
        """)
    health = config.listeners[0].health
    assert health is not None and health.password == Secret(PASSWORD)
    monkeypatch.delenv("CACHEPORT_TEST_PW")
    message = error("""
        listeners:
          - {name: r, listen: '127.0.0.1:1', upstream: 127.0.0.1, protocol: redis,
             health: {password_env: CACHEPORT_TEST_PW}}
        """)
    assert "field 'password_env': environment variable 'CACHEPORT_TEST_PW' is not set" in message


def test_password_file_is_read_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "redis.pw").write_text(PASSWORD + "\n")
    path = tmp_path / "cacheport.yaml"
    path.write_text(textwrap.dedent("""
        listeners:
          - name: r
            listen: '127.0.0.1:1'
            upstream: 127.0.0.1
            protocol: redis
            health: {password_file: secrets/redis.pw}
          - name: s
            listen: '127.0.0.1:2'
            upstream: 127.0.0.1
            protocol: redis
            health: {password_file: secrets/missing.pw}
        """))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:12: listener 's': health: field 'password_file':" in str(info.value)
    assert "no such file" in str(info.value)
    path.write_text(path.read_text().replace("missing.pw", "redis.pw"))
    health = load_config(path).listeners[0].health
    assert health is not None and health.password == Secret(PASSWORD)


def test_admin_defaults_to_loopback_9180_and_can_be_turned_off() -> None:
    base = "listeners:\n  - {name: a, listen: '127.0.0.1:1', upstream: 127.0.0.1:1}\n"
    assert parse(base).admin == AdminConfig(Address("127.0.0.1", 9180), explicit=False)
    assert parse("admin: off\n" + base).admin is None
    admin = parse("admin: {listen: 9200, ready_requires_healthy: false}\n" + base).admin
    assert admin == AdminConfig(Address("127.0.0.1", 9200), ready_requires_healthy=False,
                                explicit=True)
    assert parse("admin: {listen: '0.0.0.0:9180'}\n" + base).admin == AdminConfig(
        Address("0.0.0.0", 9180), explicit=True)


@pytest.mark.parametrize(
    ("admin", "expected"),
    [
        ("{listen: 'nope:'}", "<test>:1: admin: field 'listen': port '' in 'nope:'"),
        ("{port: 9}", "<test>:1: admin: unknown field 'port'"),
        ("[1]", "<test>:1: admin: expected off or a mapping with 'listen', got [1]"),
        ("{ready_requires_healthy: 1}", "field 'ready_requires_healthy': expected true or false"),
    ],
)
def test_bad_admin_settings_are_located(admin: str, expected: str) -> None:
    message = error(f"admin: {admin}\nlisteners:\n  - {{name: a, listen: '127.0.0.1:1', "
                    f"upstream: 127.0.0.1:1}}\n")
    assert expected in message


def test_a_listener_on_the_admin_address_is_refused() -> None:
    message = error("""
        admin: {listen: 127.0.0.1:9300}
        listeners:
          - {name: a, listen: 127.0.0.1:9300, upstream: 127.0.0.1:1}
        """)
    assert "listener 'a': field 'listen': address 127.0.0.1:9300 is already used by the admin" \
        in message
