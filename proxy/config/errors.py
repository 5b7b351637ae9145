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
    ClusterSection,
    DefaultsSection,
    HealthSection,
    ListenerSection,
    PortMap,
    Section,
    TlsSection,
    UpstreamTlsSection,
)
from .parsers import is_name
from .values import ConfigError, show
from .yamlmap import YamlMap

# The order keys are checked in, to report the first of several mistakes.
_TOP_ORDER = ("defaults", "admin", "listeners", "drain_timeout", "workers", "engine_threads",
              "busy_poll", "state_dir", "clusters")
_ENTRY_ORDER = ("protocol", "engine", "seed", "announce", "announce_ip", "ports", "seed_port",
                "listen", "refresh", "retire_grace", "connect_timeout", "idle_timeout",
                "buffer_size", "dns_ttl", "allow", "max_connections",
                "max_connections_per_client", "tls", "upstream_tls", "on_down", "copy",
                "relay", "upstream", "backup", "health")
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


def _rank(error: ErrorDetails) -> tuple[Any, ...]:
    loc = error["loc"]
    key: list[Any] = []
    if not loc or (error["type"] in ("extra_forbidden", "invalid_key") and len(loc) == 1):
        return (-1, str(loc))
    head = loc[0]
    key.append(_TOP_ORDER.index(head) if head in _TOP_ORDER else len(_TOP_ORDER))
    rest = loc[1:]
    if head in ("listeners", "clusters") and rest and isinstance(rest[0], int):
        key.append(rest[0])
        rest = rest[1:]
    if not rest:
        return (*key, -1)
    name, kind = rest[0], error["type"]
    if name == "name":
        return (*key, 0)
    if len(rest) == 1 and kind in ("extra_forbidden", "invalid_key"):
        return (*key, 1)
    if len(rest) == 1 and kind == "missing":
        return (*key, 2)
    order = _ENTRY_ORDER.index(name) if name in _ENTRY_ORDER else len(_ENTRY_ORDER)
    depth = 0 if len(rest) == 1 else 1 if kind in ("extra_forbidden", "invalid_key") else 2
    return (*key, 3 + order, depth, str(rest[1:]))


def _model_at(loc: Sequence[Any]) -> type[Section]:
    """The section model a location ends in, to list its known keys."""
    model: type[Section] = PortMap
    steps: dict[str, type[Section]] = {
        "defaults": DefaultsSection, "admin": AdminSection, "health": HealthSection,
        "tls": TlsSection, "upstream_tls": UpstreamTlsSection}
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


def render(exc: ValidationError, data: YamlMap, path: str) -> ConfigError:
    """The first mistake of ``exc``, located in ``data`` (the file as parsed)."""
    error = first(exc)
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
    elif head in ("defaults", "admin") and not (unknown and len(rest) == 1):
        line = data.lines.get(head, data.line)
        where = f"{head}: "
        if len(rest) == 1:
            if kind in ("value_error",):
                return located(path, _message(error), line, where)
            return located(path, f"expected {_SHAPES[head]}, got {show(data[head])}", line,
                           where)
        node, rest = data[head], rest[1:]
    if len(rest) > 1 and rest[0] == "health":
        line = node.lines.get("health", line)
        node, rest = node["health"], rest[1:]
        where += "health: "
    if len(rest) > 1 and rest[0] in _INLINE:
        parent, sub = rest[0], rest[1]
        line = node.lines.get(parent, line)
        if unknown:
            message = unknown_key(sub, known_keys(_model_at(loc)))
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


def first(exc: ValidationError) -> ErrorDetails:
    """The mistake the old hand-written validator would have met first."""
    return min(exc.errors(include_url=False), key=_rank)


def before_listeners(exc: ValidationError) -> bool:
    """Whether the first mistake is one the listeners' presence is checked after."""
    error = first(exc)
    loc = error["loc"]
    if len(loc) == 1 and error["type"] in ("extra_forbidden", "invalid_key"):
        return True  # an unknown top-level key
    return bool(loc) and loc[0] in ("defaults", "admin")
