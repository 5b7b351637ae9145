"""YAML with line numbers and duplicate-key detection.

PyYAML keeps the last of two equal keys without a word, and forgets where each value
stood; a port map needs both (a duplicated ``upstream`` is a mistake, and every error
names its line).
"""

from __future__ import annotations

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
