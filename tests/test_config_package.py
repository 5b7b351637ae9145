"""What the rest of cacheport gets from proxy.config: plain frozen dataclasses, no pydantic."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from proxy.config import (
    Address,
    AdminConfig,
    Config,
    ConfigError,
    HealthConfig,
    ListenerConfig,
    Secret,
    TlsConfig,
    UpstreamTlsConfig,
    load_config,
)


def test_every_part_of_a_loaded_config_is_a_frozen_dataclass(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("not read here\n")
    path = tmp_path / "ports.yaml"
    path.write_text(textwrap.dedent("""
        defaults: {upstream_tls: {ca: ca.pem, server_name: node.example.internal}}
        admin: {listen: 9301}
        listeners:
          - {name: a, listen: "127.0.0.1:7000", upstream: "10.0.0.1:6379", protocol: redis,
             tls: {cert: cert.pem, key: key.pem}, health: {password: hunter2}}
    """))
    config = load_config(path)
    lc = config.listeners[0]
    parts = [config, lc, lc.listen, lc.upstream, lc.tls, lc.upstream_tls, lc.health,
             config.admin]
    assert [type(p) for p in parts] == [Config, ListenerConfig, Address, Address, TlsConfig,
                                        UpstreamTlsConfig, HealthConfig, AdminConfig]
    assert all(dataclasses.is_dataclass(p) for p in parts)
    assert lc.tls == TlsConfig(cert=str(tmp_path / "cert.pem"), key=str(tmp_path / "key.pem"))
    assert lc.upstream_tls == UpstreamTlsConfig(server_name="node.example.internal",
                                                ca=str(tmp_path / "ca.pem"))
    # what the cluster manager and the server do with them
    renamed = dataclasses.replace(lc, name="b", upstream_tls=dataclasses.replace(
        lc.upstream_tls, server_name="other.example.internal"))
    assert renamed.name == "b" and hash(renamed) != hash(lc)
    assert lc.health is not None and lc.health.password == Secret("hunter2")
    assert "hunter2" not in repr(config) and "hunter2" not in str(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lc.name = "c"  # type: ignore[misc]


def test_a_password_is_never_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "ports.yaml"
    path.write_text("listeners:\n  - {name: a, listen: '127.0.0.1:1', upstream: 'x:1',\n"
                    "     health: {kind: redis, password: [hunter2], colour: 1}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "unknown field 'colour'" in message and "hunter2" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
