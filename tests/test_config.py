"""The port map validator: every mistake gets one message naming file, line, listener, field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config import (
    Address,
    ConfigError,
    load_config,
    parse_address,
    parse_duration,
)

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ports.yaml"
    path.write_text(textwrap.dedent(text))
    return path


OPEN = "defaults: {allow: ['0.0.0.0/0', '::/0']}\n"


def error_of(tmp_path: Path, text: str) -> str:
    """The error for ``text``; maps that bind 0.0.0.0 get an allow-all list appended."""
    if text.startswith("listeners:") and "allow" not in text and not text.endswith("'\n"):
        text += OPEN
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


def test_example_and_demo_maps_are_valid() -> None:
    example = load_config(ROOT / "config" / "example.yaml")
    assert [lc.listen.port for lc in example.listeners] == [11211, 11212, 11213, 6380, 6381]
    assert example.listener("memcached-0003").upstream == Address("10.0.1.232", 11211)
    assert {lc.protocol for lc in example.listeners} == {"memcached", "redis"}
    demo = load_config(ROOT / "config" / "demo.yaml")
    assert all(lc.listen.host == "127.0.0.1" for lc in demo.listeners)


def test_defaults_are_inherited_and_overridden(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
        defaults:
          allow: [198.51.100.0/24]
          connect_timeout: 500ms
          idle_timeout: 10m
          protocol: redis
        listeners:
          - {name: a, listen: 6380, upstream: node-a.example.internal}
          - {name: b, listen: ":6381", upstream: "[fd00::1]", connect_timeout: 2s,
             idle_timeout: off, protocol: tcp}
    """.replace("[fd00::1]", "[fd00::1]:7000")))
    a, b = config.listeners
    assert a.listen == Address("0.0.0.0", 6380)
    assert a.upstream == Address("node-a.example.internal", 6379)  # redis default port
    assert (a.connect_timeout, a.idle_timeout) == (0.5, 600.0)
    assert b.upstream == Address("fd00::1", 7000)
    assert (b.connect_timeout, b.idle_timeout, b.protocol) == (2.0, None, "tcp")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.1.231:11211", Address("10.0.1.231", 11211)),
        ("[::1]:6379", Address("::1", 6379)),
        ("::1", Address("::1", 11211)),
        ("my-node.abc123.0001.use1.cache.amazonaws.com", Address(
            "my-node.abc123.0001.use1.cache.amazonaws.com", 11211)),
    ],
)
def test_upstream_forms(value: str, expected: Address) -> None:
    assert parse_address(value, default_host=None, default_port=11211) == expected


def test_ipv6_listen_address(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
        defaults: {allow: ["::/0", 0.0.0.0/0]}
        listeners:
          - {name: v6, listen: "[::]:6380", upstream: "10.0.0.1:6379"}
          - {name: v4, listen: "0.0.0.0:6380", upstream: "10.0.0.1:6379"}
    """))
    assert str(config.listeners[0].listen) == "[::]:6380"


@pytest.mark.parametrize(
    ("value", "ok"),
    [("500ms", 0.5), ("3s", 3.0), ("10m", 600.0), ("1h", 3600.0), (2, 2.0), ("1.5s", 1.5)],
)
def test_durations(value: object, ok: float) -> None:
    assert parse_duration(value) == ok


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("listeners:\n  - {name: a, listen: 1, upstream: 'x:1', colour: red}\n",
         ["ports.yaml:2", "listener 'a'", "unknown field 'colour'"]),
        ("listeners:\n  - {name: a, listen: 1, upstrem: 'x:1'}\n",
         ["listener 'a'", "unknown field 'upstrem'", "did you mean 'upstream'"]),
        ("listeners:\n  - {name: a, listen: 1, upstream: 'x:1', connect_timeout: soon}\n",
         ["listener 'a'", "field 'connect_timeout'", "expected a duration"]),
        ("listeners:\n  - {name: a, listen: 1, upstream: 'x:1', protocol: http}\n",
         ["field 'protocol'", "expected one of tcp, memcached, redis", "'http'"]),
        ("listeners:\n  - {name: a, listen: 1, upstream: '10.0.1.231:99999'}\n",
         ["listener 'a'", "field 'upstream'", "out of range"]),
        ("listeners:\n  - {name: a, listen: '0.0.0.0:http', upstream: 'x:1'}\n",
         ["field 'listen'", "not a number"]),
        ("listeners:\n  - {name: a, listen: 1, upstream: 'bad host!:1'}\n",
         ["field 'upstream'", "neither an IP address nor a valid hostname"]),
        ("listeners:\n  - {name: a, listen: 1, upstream: '10.0.1.300:1'}\n",
         ["field 'upstream'", "not a valid IPv4 address"]),
        ("listeners:\n  - {name: a, listen: 1, upstream: '10.0.1.3'}\n",
         ["field 'upstream'", "missing port", "protocol tcp has no default port"]),
        ("listeners:\n  - {name: a, listen: 1, upstream: 'fd00::1::6379'}\n",
         ["field 'upstream'", "brackets"]),
        ("listeners:\n  - {name: a, listen: 1}\n",
         ["listener 'a'", "missing required field 'upstream'"]),
        ("listeners:\n  - {listen: 1, upstream: 'x:1'}\n",
         ["listeners[0]", "missing required field 'name'"]),
        ("listeners:\n  - {name: 'a b', listen: 1, upstream: 'x:1'}\n",
         ["listeners[0]", "field 'name'"]),
        ("listeners:\n  - {name: a, listen: 7001, upstream: 'x:1'}\n"
         "  - {name: a, listen: 7002, upstream: 'x:1'}\n",
         ["ports.yaml:3", "duplicate name 'a'"]),
        ("listeners:\n  - {name: a, listen: '127.0.0.1:7001', upstream: 'x:1'}\n"
         "  - {name: b, listen: '127.0.0.1:7001', upstream: 'y:1'}\n",
         ["ports.yaml:3", "listener 'b'", "field 'listen'", "already used by listener 'a'"]),
        ("listeners:\n  - {name: a, listen: '0.0.0.0:7001', upstream: 'x:1'}\n"
         "  - {name: b, listen: '10.1.2.3:7001', upstream: 'y:1'}\n",
         ["listener 'b'", "already used by listener 'a'"]),
        ("listeners: []\n", ["no listeners"]),
        ("", ["the file is empty"]),
        ("listeners: {name: a}\n", ["'listeners' must be a list"]),
        ("- a\n- b\n", ["expected a mapping with a 'listeners' list"]),
        ("listeners:\n  - {name: a, listen: 1, upstream: 'x:1'\n",
         ["ports.yaml:3", "invalid YAML"]),
        ("listeners:\n  - name: a\n    name: b\n    listen: 1\n    upstream: 'x:1'\n",
         ["ports.yaml:3", "duplicate key 'name'"]),
        ("defaults:\n  conect_timeout: 1s\nlisteners:\n  - {name: a, listen: 1, upstream: 'x:1'}\n",
         ["ports.yaml:2", "defaults", "unknown field 'conect_timeout'"]),
        ("listenrs: []\n", ["unknown field 'listenrs'", "did you mean 'listeners'"]),
        ("listeners:\n  - {name: a, listen: 1, upstream: 'x:1', idle_timeout: -5}\n",
         ["field 'idle_timeout'"]),
        ("listeners:\n  - {name: a, listen: 1, upstream: 'x:1', buffer_size: 1}\n",
         ["field 'buffer_size'", "between 4k and 16m"]),
    ],
)
def test_config_errors_name_file_listener_and_field(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(str(tmp_path / "ports.yaml"))
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Traceback" not in message


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_non_loopback_listener_needs_an_allow_list(tmp_path: Path) -> None:
    message = error_of(tmp_path, "listeners:\n  - {name: a, listen: 6380, upstream: 'x:1'}\n"
                       "# no allow\n")
    assert "ports.yaml:2: listener 'a': field 'listen': 0.0.0.0:6380 is reachable" in message
    assert "add allow: [CIDR, ...]" in message
    loopback = load_config(write(tmp_path, """
        listeners:
          - {name: a, listen: "127.0.0.1:6380", upstream: "x:1"}
          - {name: b, listen: "[::1]:6380", upstream: "x:1"}
    """))
    assert all(lc.allow is None for lc in loopback.listeners)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("[10.0.0.1/24]", "has host bits set; did you mean 10.0.0.0/24?"),
        ("[not-a-cidr]", "is not a CIDR"),
        ("[]", "expected a list of CIDRs"),
        ("[42]", "expected a CIDR"),
    ],
)
def test_bad_allow_lists(tmp_path: Path, value: str, fragment: str) -> None:
    message = error_of(tmp_path, "listeners:\n  - {name: a, listen: 1, upstream: 'x:1', "
                       f"allow: {value}}}\n")
    assert "listener 'a': field 'allow'" in message
    assert fragment in message


def test_limits_parse(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
        defaults: {max_connections: 100}
        listeners:
          - {name: a, listen: "127.0.0.1:1", upstream: "x:1", max_connections_per_client: 5,
             allow: [198.51.100.27, "2001:db8::/32"]}
    """))
    lc = config.listeners[0]
    assert (lc.max_connections, lc.max_connections_per_client) == (100, 5)
    assert [str(n) for n in lc.allow or ()] == ["198.51.100.27/32", "2001:db8::/32"]
    assert "field 'max_connections'" in error_of(
        tmp_path, "listeners:\n  - {name: a, listen: 1, upstream: 'x:1', max_connections: 0}\n")
