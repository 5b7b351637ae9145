"""The JSON Schema and the configuration reference, both generated from ``model.py``.

    cacheport schema              > config/cacheport.schema.json
    cacheport schema --markdown   > docs/configuration.md

(``python -m proxy.config.reference [--markdown]`` prints the same.) Both files are
checked into the repository and a test fails when they differ from what the model
generates, so the docs cannot drift from the validator.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from pydantic.fields import FieldInfo

from .fields import Kind
from .model import (
    AdminSection,
    AwsSection,
    ClusterSection,
    DefaultsSection,
    HealthSection,
    ListenerSection,
    PortMap,
    Section,
    SniRouteSection,
    TlsSection,
    UpstreamTlsSection,
)

SCHEMA_PATH = "config/cacheport.schema.json"
REFERENCE_PATH = "docs/configuration.md"
SCHEMA_COMMAND = f"cacheport schema > {SCHEMA_PATH}"
REFERENCE_COMMAND = f"cacheport schema --markdown > {REFERENCE_PATH}"

# Section, the heading it gets, and where it sits in a port map.
_SECTIONS: tuple[tuple[type[Section], str, str], ...] = (
    (PortMap, "top level", "the file itself"),
    (ListenerSection, "listeners[]", "each entry of `listeners`"),
    (DefaultsSection, "defaults", "`defaults:`"),
    (HealthSection, "health", "`health:` in a listener, a cluster or `defaults`"),
    (TlsSection, "tls", "`tls:` in a listener, a cluster or `defaults`"),
    (UpstreamTlsSection, "upstream_tls", "`upstream_tls:` in a listener, a cluster or "
                                         "`defaults`"),
    (SniRouteSection, "sni_routes[]", "each entry of `sni_routes` in a listener"),
    (AdminSection, "admin", "`admin:`"),
    (ClusterSection, "clusters[]", "each entry of `clusters`"),
    (AwsSection, "aws", "`aws:` (needs `cacheport[aws]`)"),
)
_NESTED = {"listeners": "list of [listeners[]](#listeners)",
           "clusters": "list of [clusters[]](#clusters)",
           "defaults": "mapping: [defaults](#defaults)",
           "health": "on, off or mapping: [health](#health)",
           "tls": "off or mapping: [tls](#tls)",
           "upstream_tls": "on, off or mapping: [upstream_tls](#upstream_tls)",
           "admin": "off or mapping: [admin](#admin)",
           "sni_routes": "list of [sni_routes[]](#sni_routes)",
           "aws": "mapping: [aws](#aws)"}


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a port map, for the YAML language server."""
    schema = PortMap.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def _kind(key: str, field: FieldInfo, schema: dict[str, Any]) -> str:
    if key in _NESTED:
        return _NESTED[key]
    kind = next((m.text for m in field.metadata if isinstance(m, Kind)), "")
    if kind == "enum":
        return " \\| ".join(f"`{choice}`" for choice in schema.get("enum", ()))
    return kind


def _default(key: str, field: FieldInfo, schema: dict[str, Any], kind: str) -> str:
    if field.is_required():
        return "**required**"
    if key in ("listeners", "clusters", "defaults"):
        return "none"
    value = schema.get("default")
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if kind.startswith("duration") and isinstance(value, int | float):
        return f"`{value:g}s`"
    if kind == "size" and isinstance(value, int) and value % 1024 == 0:
        return f"`{value // 1024}k`"
    if value == [] or value == ():
        return "none"
    if isinstance(value, str) and " " in value:
        return value  # words, not a value to copy
    return f"`{value}`"


def _table(section: type[Section], schema: dict[str, Any]) -> list[str]:
    properties = schema.get("properties", {})
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, attr in section.yaml_keys().items():
        field = section.model_fields[attr]
        prop = properties.get(key, {})
        kind = _kind(key, field, prop)
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {kind} | {_default(key, field, prop, kind)} | {meaning} |")
    return rows


def markdown() -> str:
    """docs/configuration.md: every key of every section, its type, default and meaning."""
    full = json_schema()
    defs = full.get("$defs", {})
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from proxy/config/model.py; do not edit. Regenerate with:",
        f"     {REFERENCE_COMMAND} -->",
        "",
        "Every key a port map may hold, section by section. The same model validates the",
        "file (`cacheport check`) and generates the JSON Schema in",
        f"[{SCHEMA_PATH}](../{SCHEMA_PATH}) (`cacheport schema`), which editors with the",
        "YAML language server use to complete and check a port map: start the file with",
        "`# yaml-language-server: $schema=<path or URL of cacheport.schema.json>`.",
        "",
        "Value forms: a *duration* is a number of seconds or a number with a unit (`500ms`,",
        "`3s`, `10m`, `1h`, `50us`); a *size* is bytes or `64k`, `1m`; *off* may be written",
        "`off`, `false` or left empty (YAML reads a bare `off` as false). Relative file paths",
        "are relative to the port map's folder.",
        "",
        "Environment variables: any string value may hold `${VAR}` (an unset one is an",
        "error naming it, the file and the line), `${VAR:-fallback}` (used when unset or",
        "empty) and `$$` for a literal `$`, so one file serves every host of a fleet. An",
        "unquoted value is typed after substitution (`listen: ${PORT}` is a number).",
    ]
    for section, heading, where in _SECTIONS:
        schema = full if section is PortMap else defs[section.__name__]
        doc = " ".join(line.strip() for line in (section.__doc__ or "").splitlines())
        lines += ["", f"## {heading}", "", f"Where: {where}. {doc.strip()}", "",
                  *_table(section, schema)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    sys.stdout.write(markdown() if "--markdown" in args else schema_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
