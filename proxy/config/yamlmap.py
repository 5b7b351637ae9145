"""YAML with line numbers, duplicate-key detection and ``${VAR}`` substitution.

PyYAML keeps the last of two equal keys without a word, and forgets where each value
stood; a port map needs both (a duplicated ``upstream`` is a mistake, and every error
names its line).

One port map serves a whole fleet (a ConfigMap, an S3 object); what differs per host
comes from the environment: ``${CACHEPORT_ANNOUNCE}`` in any string value,
``${VAR:-fallback}`` when unset or empty, ``$$`` for a literal ``$``. An unset variable
without a fallback is an error naming the variable, the file and the line. A plain
(unquoted) value is typed after substitution, as if written out (``${PORT}`` is a
number); a quoted one stays a string. A ``$`` not followed by ``{`` or ``$`` is kept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from .values import ConfigError, show


class YamlMap(dict[Any, Any]):
    """A YAML mapping that remembers the line of itself and of each value."""

    line: int = 0
    lines: dict[Any, int]


# The pure-Python loader, though libyaml's (CSafeLoader) parses a 500-listener map about
# 5x faster (20 vs 100 ms): a differential fuzz found libyaml accepting files this one
# refuses (a tab in a plain scalar, "|#", byte-order marks) and wording its errors
# otherwise, with byte offsets for character positions. Which files are valid stays put.
class _Loader(yaml.SafeLoader):
    pass


class _Located(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|(\{[^}]*\}?))")


def substitute(text: str, env: Mapping[str, str], line: int) -> str:
    """``text`` with every ``${VAR}``, ``${VAR:-fallback}`` and ``$$`` replaced."""

    def one(match: re.Match[str]) -> str:
        name, fallback, bad = match.group(1), match.group(2), match.group(3)
        if bad is not None:
            raise _Located(line, f"{bad!r} is not a variable reference; write ${{NAME}} "
                                 "(letters, digits, _), or $$ for a literal $")
        if name is None:
            return "$"
        value = env.get(name)
        if value is None or (value == "" and fallback is not None):
            if fallback is not None:
                return fallback
            raise _Located(line, f"environment variable {name!r} is not set (used as "
                                 f"${{{name}}}; give it a value, or write ${{{name}:-default}}"
                                 ", or $$ for a literal $)")
        return value

    return _VAR.sub(one, text)


def _construct_str(loader: _Loader, node: yaml.ScalarNode) -> Any:
    value = loader.construct_scalar(node)
    if not isinstance(value, str) or "$" not in value:
        return value
    text = substitute(value, os.environ, node.start_mark.line + 1)
    if node.style is None:
        # Plain scalars are typed by their text: type the substituted text the same way.
        tag = loader.resolve(yaml.ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
        if tag != yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG:
            typed = yaml.ScalarNode(tag, text, node.start_mark, node.end_mark)
            return loader.construct_object(typed, deep=True)
    return text


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> YamlMap:
    loader.flatten_mapping(node)
    result = YamlMap()
    result.line = node.start_mark.line + 1
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise _Located(line, f"a mapping key must be a plain value, got {show(key)}") from None
        if key in result:
            raise _Located(line, f"duplicate key {show(key)} (first on line {result.lines[key]})")
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = line
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG, _construct_str)


def load_yaml(text: str, path: str = "<config>") -> Any:
    """Parse YAML text, turning every parser error into a located ``ConfigError``."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader
    except _Located as exc:
        raise ConfigError(f"{path}:{exc.line}: {exc.message}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = exc.problem or exc.context or "unparsable"
        raise ConfigError(f"{loc}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a port map") from None
