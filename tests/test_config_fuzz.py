"""Config fuzzing: whatever the file holds, the only failure is a ConfigError."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import ConfigError, load_yaml, parse_config

VALID: dict[str, Any] = {
    "defaults": {"connect_timeout": "1s", "allow": ["198.51.100.0/24"]},
    "drain_timeout": "5s",
    "listeners": [
        {"name": "mc", "listen": "0.0.0.0:11211", "upstream": "10.0.1.230:11211",
         "protocol": "memcached", "idle_timeout": "10m"},
        {"name": "rd", "listen": "[::1]:6380", "upstream": "node.example.internal",
         "protocol": "redis", "max_connections": 10},
    ],
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(["0.0.0.0:1", "[::]:0", "host:99999", "10.0.0.1", "3s", "off", "",
                     "tcp", "redis", "::1", "[", "a:b:c", "0/0", "-1ms"]),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(
            ["listeners", "defaults", "name", "listen", "upstream", "protocol", "allow",
             "tls", "upstream_tls", "workers", "drain_timeout"])), children, max_size=5),
    ),
    max_leaves=20,
)


def only_config_errors(text: str) -> None:
    try:
        parse_config(load_yaml(text, "fuzz.yaml"), "fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_arbitrary_text(text: str) -> None:
    only_config_errors(text)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_arbitrary_yaml_documents(doc: Any) -> None:
    only_config_errors(yaml.safe_dump(doc))


paths = st.sampled_from([
    ("defaults",), ("drain_timeout",), ("listeners",), ("listeners", 0), ("listeners", 1),
    ("listeners", 0, "name"), ("listeners", 0, "listen"), ("listeners", 0, "upstream"),
    ("listeners", 1, "protocol"), ("listeners", 1, "max_connections"),
    ("defaults", "allow"), ("defaults", "connect_timeout"), ("listeners", 0, "idle_timeout"),
])


@settings(max_examples=400, deadline=None)
@given(paths, documents)
def test_mutated_valid_maps(path: tuple[Any, ...], value: Any) -> None:
    doc = copy.deepcopy(VALID)
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    only_config_errors(yaml.safe_dump(doc))


def test_the_unmutated_map_is_valid() -> None:
    config = parse_config(load_yaml(yaml.safe_dump(VALID), "v.yaml"), "v.yaml")
    assert len(config.listeners) == 2


def test_deeply_nested_documents_are_config_errors() -> None:
    for text in ["[" * 5000 + "]" * 5000, "a: " + "{b: " * 5000 + "1" + "}" * 5000]:
        only_config_errors(text)
