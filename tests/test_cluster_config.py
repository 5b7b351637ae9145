"""The ``clusters:`` section: defaults, derived listener settings, and located errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config import Address, ConfigError, load_config
from tests.support import run_cli

GOOD = """
    defaults:
      allow: [198.51.100.0/24]
      connect_timeout: 2s
    listeners:
      - {name: plain, listen: 11211, upstream: "10.0.0.9:11211", protocol: memcached}
    clusters:
      - name: sessions
        engine: redis-cluster
        seed: clustercfg.sessions.abc123.use1.cache.amazonaws.com
        announce: 203.0.113.10
        ports: 6380-6399
        seed_port: 6379
        refresh: 10s
        retire_grace: 5m
        upstream_tls: true
      - name: pages
        engine: memcached
        seed: pages.abc123.cfg.use1.cache.amazonaws.com
        announce: nat.example.com
        announce_ip: 203.0.113.10
        ports: "11300-11309"
        listen: 127.0.0.1
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cacheport.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


def test_a_full_clusters_section_is_parsed_with_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    sessions, pages = config.clusters
    assert sessions.engine == "redis-cluster"
    assert sessions.seed == Address("clustercfg.sessions.abc123.use1.cache.amazonaws.com", 6379)
    assert sessions.ports == (6380, 6399) and sessions.seed_port == 6379
    assert (sessions.refresh, sessions.retire_grace) == (10.0, 300.0)
    assert sessions.announce == sessions.announce_ip == "203.0.113.10"
    assert sessions.template.protocol == "redis"
    assert sessions.template.connect_timeout == 2.0  # from defaults
    assert sessions.template.upstream_tls is not None
    assert sessions.template.listen == Address("0.0.0.0", 6380)
    assert pages.seed.port == 11211 and pages.template.protocol == "memcached"
    assert (pages.announce, pages.announce_ip) == ("nat.example.com", "203.0.113.10")
    assert pages.listen_host == "127.0.0.1" and pages.refresh == 30.0
    assert config.state_file == str(tmp_path / "cacheport.state.json")


def test_a_map_with_only_clusters_is_valid_and_state_dir_is_relative(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
        state_dir: state
        clusters:
          - {name: c, engine: memcached, seed: "127.0.0.1:11211", announce: 127.0.0.1,
             ports: 12000-12001, listen: 127.0.0.1}
    """))
    assert config.listeners == () and len(config.clusters) == 1
    assert config.state_file == str(tmp_path / "state" / "cacheport-state.json")


@pytest.mark.parametrize(("snippet", "expected"), [
    ("engine: redis", "cacheport.yaml:4: cluster 'c': field 'engine': expected one of "
                      "redis-cluster, redis-replication, memcached, got 'redis'"),
    ("ports: 6399-6380", "field 'ports': range '6399-6380' ends before it starts"),
    ("ports: 1-2000", "has 2000 ports; at most 1024"),
    ("ports: 6380-70000", "port 70000 in '6380-70000' is out of range"),
    ("ports: lots", "port 'lots' in 'lots' is not a number"),
    ("seed_port: 6385", "field 'seed_port': 6385 is inside the node range 6380-6389"),
    ("announce: '203.0.113.10:6379'", "field 'announce': expected a host without a port"),
    ("announce_ip: nat.example.com", "field 'announce_ip': expected an IP address"),
    ("refresh: soon", "field 'refresh': expected a duration"),
    ("protocol: tcp", "unknown field 'protocol'"),
    ("seeds: x", "unknown field 'seeds' (did you mean 'seed'?)"),
])
def test_cluster_mistakes_are_located(tmp_path: Path, snippet: str, expected: str) -> None:
    base = {"engine": "redis-cluster", "seed": "10.0.0.1:6379", "announce": "203.0.113.10",
            "ports": "6380-6389", "listen": "127.0.0.1"}
    key = snippet.split(":", 1)[0]
    lines = [f"    {k}: {v}" for k, v in base.items() if k != key]
    text = "clusters:\n  - name: c\n" + "\n".join([*lines[:1], "    " + snippet, *lines[1:]])
    message = error_of(tmp_path, text + "\n")
    assert expected in message
    assert message.startswith(str(tmp_path / "cacheport.yaml"))


def test_missing_fields_and_open_listeners_without_allow_are_refused(tmp_path: Path) -> None:
    assert "cluster 'c': missing required field 'announce'" in error_of(tmp_path, """
        clusters:
          - {name: c, engine: memcached, seed: "10.0.0.1", ports: 12000-12009}
    """)
    assert "no 'allow' list says who may connect" in error_of(tmp_path, """
        clusters:
          - {name: c, engine: memcached, seed: "10.0.0.1", announce: 203.0.113.1,
             ports: 12000-12009}
    """)


def test_ports_may_not_overlap_listeners_or_other_clusters(tmp_path: Path) -> None:
    assert "listener 'plain' (0.0.0.0:6385) uses a port of this cluster's range" in error_of(
        tmp_path, """
        defaults: {allow: [0.0.0.0/0]}
        listeners:
          - {name: plain, listen: 6385, upstream: "10.0.0.9:6379"}
        clusters:
          - {name: c, engine: redis-cluster, seed: "10.0.0.1", announce: 203.0.113.1,
             ports: 6380-6389}
    """)
    assert "cluster 'd': port 6389 is also in cluster 'c'" in error_of(tmp_path, """
        defaults: {allow: [0.0.0.0/0]}
        clusters:
          - {name: c, engine: redis-cluster, seed: "10.0.0.1", announce: 203.0.113.1,
             ports: 6380-6389}
          - {name: d, engine: redis-cluster, seed: "10.0.0.2", announce: 203.0.113.1,
             ports: 6395-6399, seed_port: 6389, listen: 127.0.0.1}
    """)
    # Different addresses of one family do not clash.
    load_config(write(tmp_path, """
        clusters:
          - {name: c, engine: redis-cluster, seed: "10.0.0.1", announce: 127.0.0.1,
             ports: 6380-6389, listen: 127.0.0.1}
          - {name: d, engine: redis-cluster, seed: "10.0.0.2", announce: 127.0.0.2,
             ports: 6380-6389, listen: 127.0.0.2}
    """))
    assert "duplicate name 'c'" in error_of(tmp_path, """
        clusters:
          - {name: c, engine: memcached, seed: "10.0.0.1", announce: 127.0.0.1,
             ports: 12000-12009, listen: 127.0.0.1}
          - {name: c, engine: memcached, seed: "10.0.0.1", announce: 127.0.0.1,
             ports: 12010-12019, listen: 127.0.0.1}
    """)


def test_an_empty_map_still_asks_for_listeners_or_clusters(tmp_path: Path) -> None:
    assert "add at least one under 'listeners' (or a cluster under 'clusters')" in error_of(
        tmp_path, "drain_timeout: 5s\n")


def test_check_lists_clusters(tmp_path: Path) -> None:
    path = write(tmp_path, """
        clusters:
          - {name: c, engine: memcached, seed: "10.0.0.1", announce: 127.0.0.1,
             ports: 12000-12009, listen: 127.0.0.1, seed_port: 11999}
    """)
    result = run_cli("check", str(path))
    assert result.returncode == 0, result.stderr
    assert ("cluster c: memcached, seed 10.0.0.1:11211, announce 127.0.0.1, "
            "ports 12000-12009, seed_port 11999") in result.stdout
    assert result.stdout.strip().endswith("OK, 0 listener(s), 1 cluster(s)")
    assert "NAME" not in result.stdout  # no empty table of listeners
