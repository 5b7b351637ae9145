"""The port map: its model, loading and validation; knows nothing of sockets.

    values.py    the value types (Address, Secret), limits and defaults
    fields.py    the types a field may hold: its parser, JSON Schema and reference name
    model.py     what a port map may hold: one pydantic model per YAML section
    yamlmap.py   YAML with line numbers and duplicate-key detection
    errors.py    pydantic's errors told as ``file:line: listener 'x': field 'y': ...``
    load.py      file -> model -> defaults filled in, cross-checks -> ``Config``
    resolved.py  ``Config`` and its parts: the frozen dataclasses the proxy runs with
    parsers.py   one parser per kind of YAML value, in the words users read
    reference.py the JSON Schema and docs/configuration.md, generated from model.py

Everything other modules use is importable from here.
"""

from __future__ import annotations

from .load import load_config, parse_config
from .parsers import conflicts as _conflicts
from .parsers import (
    parse_address,
    parse_busy_poll,
    parse_duration,
    parse_engine_threads,
    parse_networks,
    parse_port_range,
    parse_size,
    parse_workers,
)
from .resolved import (
    AdminConfig,
    AwsConfig,
    ClusterConfig,
    Config,
    HealthConfig,
    ListenerConfig,
    TlsConfig,
    UpstreamTlsConfig,
)
from .values import (
    COPY_MODES,
    DEFAULT_ADMIN_PORT,
    DEFAULT_BUFFER_SIZE,
    DEFAULT_BUSY_POLL_US,
    DEFAULT_CHECK_INTERVAL,
    DEFAULT_CHECK_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_PORTS,
    DEFAULT_REFRESH,
    DEFAULT_RETIRE_GRACE,
    ENGINE_PROTOCOL,
    ENGINES,
    LOG_FORMATS,
    MAX_BUSY_POLL_US,
    MAX_CLUSTER_PORTS,
    PROTOCOLS,
    RELAY_KINDS,
    Address,
    ConfigError,
    Copy,
    Engine,
    LogFormat,
    Network,
    OnDown,
    Protocol,
    RedisRole,
    RelayKind,
    Secret,
)
from .yamlmap import load_yaml

__all__ = [
    "COPY_MODES",
    "DEFAULT_ADMIN_PORT",
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_BUSY_POLL_US",
    "DEFAULT_CHECK_INTERVAL",
    "DEFAULT_CHECK_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_PORTS",
    "DEFAULT_REFRESH",
    "DEFAULT_RETIRE_GRACE",
    "ENGINES",
    "ENGINE_PROTOCOL",
    "LOG_FORMATS",
    "MAX_BUSY_POLL_US",
    "MAX_CLUSTER_PORTS",
    "PROTOCOLS",
    "RELAY_KINDS",
    "Address",
    "AdminConfig",
    "AwsConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "Copy",
    "Engine",
    "HealthConfig",
    "ListenerConfig",
    "LogFormat",
    "Network",
    "OnDown",
    "Protocol",
    "RedisRole",
    "RelayKind",
    "Secret",
    "TlsConfig",
    "UpstreamTlsConfig",
    "_conflicts",
    "load_config",
    "load_yaml",
    "parse_address",
    "parse_busy_poll",
    "parse_config",
    "parse_duration",
    "parse_engine_threads",
    "parse_networks",
    "parse_port_range",
    "parse_size",
    "parse_workers",
]
