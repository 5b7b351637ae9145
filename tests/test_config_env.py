"""``${VAR}`` in a port map: one file for every host, host-specific values from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config
from proxy.config.yamlmap import substitute

pytestmark = pytest.mark.timeout(10)

MAP = """\
defaults:
  health: off
  allow: ["${TRUSTED}"]
listeners:
  - name: cache
    listen: ${LISTEN_PORT}
    upstream: "${UPSTREAM:-10.0.0.1}:6379"
    protocol: redis
clusters:
  - name: c
    engine: redis-cluster
    seed: cfg.example.internal
    announce: ${CACHEPORT_ANNOUNCE}
    ports: 7000-7010
"""


def write(tmp_path: Path, text: str = MAP) -> Path:
    path = tmp_path / "ports.yaml"
    path.write_text(text)
    return path


def test_variables_fill_in_per_host_values_and_plain_ones_are_typed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTED", "198.51.100.27/32")
    monkeypatch.setenv("LISTEN_PORT", "6379")
    monkeypatch.setenv("CACHEPORT_ANNOUNCE", "nlb.example.com")
    monkeypatch.delenv("UPSTREAM", raising=False)
    config = load_config(write(tmp_path))
    lc = config.listeners[0]
    assert lc.listen.port == 6379 and lc.listen.host == "0.0.0.0"
    assert str(lc.upstream) == "10.0.0.1:6379"
    assert [str(n) for n in lc.allow or ()] == ["198.51.100.27/32"]
    assert config.clusters[0].announce == "nlb.example.com"
    monkeypatch.setenv("UPSTREAM", "primary.internal")
    assert str(load_config(write(tmp_path)).listeners[0].upstream) == "primary.internal:6379"


def test_an_unset_variable_names_itself_the_file_and_the_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTED", "198.51.100.27/32")
    monkeypatch.setenv("LISTEN_PORT", "6379")
    monkeypatch.delenv("CACHEPORT_ANNOUNCE", raising=False)
    path = write(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}:13: environment variable "
                                       "'CACHEPORT_ANNOUNCE' is not set")


def test_dollar_dollar_is_a_literal_dollar_and_a_lone_dollar_stays() -> None:
    env = {"A": "x", "EMPTY": ""}
    assert substitute("p$$w${A}$", env, 1) == "p$wx$"
    assert substitute("${EMPTY}|${EMPTY:-d}|${UNSET:-}", env, 1) == "|d|"
    assert substitute("cost $5", env, 1) == "cost $5"
    with pytest.raises(Exception, match="not a variable reference"):
        substitute("${1BAD}", env, 3)
