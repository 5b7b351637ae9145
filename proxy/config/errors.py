"""Turn a pydantic ``ValidationError`` into the one message users read.

pydantic reports every problem with a location such as ``('listeners', 3, 'health',
'rise')``; this module walks the same path through the YAML document (whose mappings
remember their lines, see ``yamlmap.py``) and says it our way::

    ports.yaml:8: listener 'a': health: field 'rise': expected a whole number ...

Only our parsers' messages and our own wording reach the user: pydantic's text (which
repeats the input, a password perhaps) never does. When a file holds several mistakes,
the first one in the order the old hand-written validator checked them is reported.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from .model import (
    AdminSection,
    AwsSection,
    ClusterSection,
    DefaultsSection,
    HealthSection,
    ListenerSection,
    LoggingSection,
    PortMap,
    Section,
    TlsSection,
    UpstreamTlsSection,
)
from .parsers import is_name
from .values import ConfigError, show
from .yamlmap import YamlMap

# The order the hand-written validator checked keys in, kept so that of several
# mistakes in one entry the same one is reported first.
_TUNABLES = ("protocol", "connect_timeout", "idle_timeout", "buffer_size", "dns_ttl", "allow",
             "max_connections", "max_connections_per_client", "proxy_protocol",
             "proxy_protocol_from", "tls", "upstream_tls", "on_down",
             "copy", "relay", "log_connections")
_ORDER: dict[str, tuple[str, ...]] = {
    "listeners": (*_TUNABLES, "listen", "upstream", "backup", "health"),
    "clusters": ("engine", "seed", "announce", "announce_ip", "ports", "seed_port",
                 "primary_port", "reader_port", "close_on_failover", "listen", "refresh",
                 "retire_grace", *_TUNABLES, "health"),
    "defaults": (*_TUNABLES, "health"),
}
_UNKNOWN = ("extra_forbidden", "invalid_key")
# What a section must be when it is something else entirely.
_SHAPES: dict[str, str] = {
    "listeners": "a mapping with name, listen and upstream",
    "clusters": "a mapping with name, engine, seed, announce and ports",
    "defaults": "a mapping",
}
# Sub-mappings whose mistakes are told as ``field 'tls': cert: ...`` on the parent's line.
_INLINE = {"tls", "upstream_tls"}


def located(path: str, message: str, line: int | None = None, where: str = "") -> ConfigError:
    """``file:line: where message``: the one shape every config error has."""
    loc = f"{path}:{line}" if line else path
    return ConfigError(f"{loc}: {where}{message}")


def unknown_key(key: Any, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" (did you mean {show(close[0])}?)" if close else ""
    return f"unknown field {show(key)}{hint}; known fields: {', '.join(allowed)}"


def known_keys(model: type[Section]) -> list[str]:
    """The keys a section accepts, in the order the reference lists them."""
    return list(model.yaml_keys())


def _rank(error: ErrorDetails) -> tuple[int, ...]:
    """Where the old validator would have met this mistake (smaller: sooner)."""
    loc, kind = error["loc"], error["type"]
    if not loc or (len(loc) == 1 and kind in _UNKNOWN):
        return (-1,)
    head = loc[0]
    entry = head in ("listeners", "clusters") and len(loc) > 1 and isinstance(loc[1], int)
    rest = loc[2:] if entry else loc[1:]
    key: tuple[int, ...] = (int(loc[1]),) if entry else ()
    if not rest:
        return (*key, -1)
    name = rest[0]
    if len(rest) == 1:
        if entry and name == "name" and kind != "missing":
            return (*key, 0)
        if kind in _UNKNOWN:
            return (*key, 1)
        if kind == "missing":
            return (*key, 2)
    order = _ORDER.get(str(head), ())
    at = order.index(name) if name in order else len(order)
    if len(rest) == 1:
        return (*key, 3 + at, -1)
    sub = list(_model_at(loc[:-1]).yaml_keys())
    inner = 0 if kind in _UNKNOWN else 1 if kind == "missing" else 2 + (
        sub.index(rest[1]) if rest[1] in sub else len(sub))
    return (*key, 3 + at, inner)


def _model_at(loc: Sequence[Any]) -> type[Section]:
    """The section model a location ends in, to list its known keys."""
    model: type[Section] = PortMap
    steps: dict[str, type[Section]] = {
        "defaults": DefaultsSection, "admin": AdminSection, "health": HealthSection,
        "tls": TlsSection, "upstream_tls": UpstreamTlsSection, "aws": AwsSection,
        "logging": LoggingSection}
    for i, part in enumerate(loc):
        if part in ("listeners", "clusters") and i == 0:
            model = ListenerSection if part == "listeners" else ClusterSection
        elif isinstance(part, str) and part in steps:
            model = steps[part]
    return model


def _message(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "missing":
        return f"missing required field {show(error['loc'][-1])}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {show(error['input'])}"
    if kind == "list_type":
        return f"expected a list, got {show(error['input'])}"
    return error["msg"]  # pydantic's own words, never its input


def render(exc: ValidationError, data: YamlMap, path: str,
           prefix: tuple[str | int, ...] = ()) -> ConfigError:
    """The first mistake of ``exc`` (from validating ``data`` at ``prefix``), located."""
    error = first(exc, prefix)
    loc = error["loc"]
    kind = error["type"]
    node: Any = data
    where = ""
    rest: tuple[Any, ...] = tuple(loc)
    line = data.line
    unknown = kind in ("extra_forbidden", "invalid_key")
    head = rest[0] if rest else None
    if head in ("listeners", "clusters"):
        items: Any = data.get(head)
        line = data.lines.get(head, data.line)
        if len(rest) == 1:  # not a list
            return located(path, f"{show(head)} must be a list, got {show(items)}", line)
        index = rest[1]
        entry = items[index]
        singular = "listener" if head == "listeners" else "cluster"
        where = f"{head}[{index}]: "
        if isinstance(entry, YamlMap):
            line = entry.line
            if is_name(entry.get("name")) and rest[2:3] != ("name",):
                where = f"{singular} {show(entry['name'])}: "
        if len(rest) == 2:
            return located(path, f"expected {_SHAPES[head]}, got {show(entry)}", line, where)
        node, rest = entry, rest[2:]
    elif head in ("defaults", "admin", "aws", "logging") and not (unknown and len(rest) == 1):
        line = data.lines.get(head, data.line)
        where = f"{head}: "
        if len(rest) == 1:
            if kind == "token_sources":  # never show the mapping: it holds the token
                line = data[head].lines.get("token", line)
                return located(path, error["msg"], line, where)
            if kind in ("value_error",):
                return located(path, _message(error), line, where)
            shape = _SHAPES.get(head, "a mapping")
            return located(path, f"expected {shape}, got {show(data[head])}", line, where)
        node, rest = data[head], rest[1:]
    if kind == "password_sources":  # on the line of the second source, like the others
        block = node[rest[0]]
        line = block.lines.get((error.get("ctx") or {}).get("second"), line)
        return located(path, error["msg"], line, f"{where}health: ")
    if len(rest) > 1 and rest[0] == "health":
        line = node.lines.get("health", line)
        node, rest = node["health"], rest[1:]
        where += "health: "
    if len(rest) > 1 and rest[0] in _INLINE:
        parent, sub = rest[0], rest[1]
        line = node.lines.get(parent, line)
        if unknown:
            message = unknown_key(sub, known_keys(_model_at(loc[:-1])))
        elif kind == "missing":
            message = _message(error)
        else:
            message = f"{sub}: {_message(error)}"
        return located(path, f"field {show(parent)}: {message}", line, where)
    key = rest[0] if rest else None
    if isinstance(node, YamlMap):
        line = node.lines.get(key, node.line) if kind != "missing" else node.line
    if unknown:
        return located(path, unknown_key(key, known_keys(_model_at(loc[:-1]))), line, where)
    if kind == "missing" or key is None:
        return located(path, _message(error), line, where)
    return located(path, f"field {show(key)}: {_message(error)}", line, where)


def first(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> ErrorDetails:
    """The mistake the old hand-written validator would have met first."""
    found: list[ErrorDetails] = []
    for error in exc.errors(include_url=False):
        error["loc"] = (*prefix, *error["loc"])
        found.append(error)
    return min(found, key=_rank)
