"""The JSON Schema and docs/configuration.md: generated from the model, shipped, not stale."""

from __future__ import annotations

import copy
import json
import textwrap
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from proxy.config import ConfigError, load_yaml, parse_config, reference
from tests.support import ROOT, run_cli
from tests.test_cluster_config import GOOD as CLUSTER_MAP
from tests.test_config_fuzz import VALID, documents, paths

SCHEMA_FILE = ROOT / reference.SCHEMA_PATH
REFERENCE_FILE = ROOT / reference.REFERENCE_PATH
VALIDATOR = jsonschema.Draft202012Validator(reference.json_schema())

HEALTH_MAP = """
defaults:
  allow: [198.51.100.0/24]
  health: {interval: 5s, username: app, password_env: NOT_READ_BY_THE_SCHEMA}
  upstream_tls: on
busy_poll: 0us
workers: auto
engine_threads: 2
drain_timeout: off
admin: {listen: 9300, ready_requires_healthy: false}
listeners:
  - name: a
    listen: 6380
    upstream: 10.0.0.1
    protocol: redis
    backup: [10.0.0.2, "10.0.0.3:7000"]
    on_down: close
    health: {role: primary, rise: 3, fall: 2, timeout: 500ms}
    max_connections: 100
    max_connections_per_client: off
    idle_timeout: 10m
    buffer_size: 128k
    copy: buffer
    relay: python
    upstream_tls: {server_name: node.example.internal, verify: false}
  - {name: b, listen: "[::1]:6381", upstream: "[fd00::1]:6379", health: off, tls: off}
"""


def errors_of(doc: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(doc)]


def test_the_shipped_schema_and_reference_are_what_the_model_generates() -> None:
    assert SCHEMA_FILE.read_text() == reference.schema_text(), (
        f"{reference.SCHEMA_PATH} is stale; regenerate it with: {reference.SCHEMA_COMMAND}")
    assert REFERENCE_FILE.read_text() == reference.markdown(), (
        f"{reference.REFERENCE_PATH} is stale; regenerate it with: "
        f"{reference.REFERENCE_COMMAND}")


def test_schema_command_prints_the_schema_and_the_reference() -> None:
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == reference.json_schema()
    result = run_cli("schema", "--markdown")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference.markdown()


def test_the_reference_lists_every_key_of_every_section() -> None:
    text = REFERENCE_FILE.read_text()
    for section, heading, _ in reference._SECTIONS:
        assert f"## {heading}\n" in text
        for key in section.yaml_keys():
            assert f"| `{key}` |" in text, (heading, key)


@pytest.mark.parametrize("name", ["example.yaml", "demo.yaml"])
def test_shipped_maps_point_editors_at_the_schema_and_pass_it(name: str) -> None:
    text = (ROOT / "config" / name).read_text()
    assert text.startswith("# yaml-language-server: $schema=cacheport.schema.json\n")
    assert errors_of(yaml.safe_load(text)) == []


@pytest.mark.parametrize("text", [CLUSTER_MAP, HEALTH_MAP, yaml.safe_dump(VALID)])
def test_the_schema_accepts_valid_maps(text: str) -> None:
    text = textwrap.dedent(text)
    doc = yaml.safe_load(text)
    assert errors_of(doc) == []
    # and the YAML language server's reading (YAML 1.2: a bare on/off stays a string)
    as_12 = yaml.safe_load(text.replace(": on", ": 'on'").replace(": off", ": 'off'"))
    assert errors_of(as_12) == []


def test_the_schema_refuses_what_editors_should_flag() -> None:
    doc = yaml.safe_load(HEALTH_MAP)
    doc["listeners"][0]["upstrem"] = doc["listeners"][0].pop("upstream")
    doc["defaults"]["copy"] = "sockmap"
    doc["listeners"][1]["health"] = {"rise": 0}
    flagged = "\n".join(errors_of(doc))
    assert "'upstrem' was unexpected" in flagged
    assert "'upstream' is a required property" in flagged
    assert "'sockmap'" in flagged
    assert "['listeners', 1, 'health']" in flagged  # rise: 0, under on | off | mapping


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(paths, documents)
def test_every_map_the_validator_accepts_the_schema_accepts(path: tuple[Any, ...],
                                                            value: Any) -> None:
    doc = copy.deepcopy(VALID)
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    text = yaml.safe_dump(doc)
    try:
        parse_config(load_yaml(text, "m.yaml"), "m.yaml")
    except ConfigError:
        return
    assert errors_of(yaml.safe_load(text)) == []
