"""The types a port-map field may hold: the parser that reads it, the JSON Schema of what
YAML may write there, and the name the reference gives it.

Each type is an ``Annotated`` alias: a ``PlainValidator`` running one parser from
``parsers.py`` (its ``ValueError`` is the message users see), a ``WithJsonSchema`` for
editors, and a ``Kind`` for docs/configuration.md. ``model.py`` builds the sections
from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    PlainValidator,
    WithJsonSchema,
)

from . import parsers as v
from .values import (
    COPY_MODES,
    ENGINES,
    LOG_FORMATS,
    ON_DOWN,
    PROTOCOLS,
    PROXY_PROTOCOLS,
    REDIS_ROLES,
    RELAY_KINDS,
    Address,
    Copy,
    Engine,
    LogFormat,
    Network,
    OnDown,
    Protocol,
    ProxyProtocol,
    RedisRole,
    RelayKind,
    Secret,
    show,
)

JsonDict = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Kind:
    """How the reference names a field's type (``duration``, ``host:port``...)."""

    text: str


# -- what YAML may write, as JSON Schema ----------------------------------------------------
# YAML 1.1 (PyYAML, what cacheport reads) turns a bare off/on into false/true; the YAML
# language server reads YAML 1.2, where they stay strings. The schema accepts both.
OFF: list[JsonDict] = [{"const": False}, {"enum": ["off"]}, {"type": "null"}]
ON: list[JsonDict] = [{"const": True}, {"enum": ["on"]}]
_DURATION_TEXT = r"^\s*\d+(\.\d+)?\s*(us|µs|ms|s|m|h)?\s*$"
DURATION: JsonDict = {"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                                {"type": "string", "pattern": _DURATION_TEXT}]}
DURATION_OFF: JsonDict = {"anyOf": [*DURATION["anyOf"], {"enum": [0, "none"]}, *OFF]}
DRAIN: JsonDict = {"anyOf": [*DURATION["anyOf"], {"const": 0}, *OFF[:2]]}
SIZE: JsonDict = {"anyOf": [{"type": "integer", "minimum": 4096, "maximum": 16 << 20},
                            {"type": "string", "pattern": r"^\s*\d+\s*([kKmM]([iI]?[bB])?)?\s*$"}]}
PORT: JsonDict = {"type": "integer", "minimum": 1, "maximum": 65535}
BIND: JsonDict = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 65535},
                            {"type": "string", "minLength": 1}]}
TEXT: JsonDict = {"type": "string", "minLength": 1}
NAME: JsonDict = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}
CIDRS: JsonDict = {"anyOf": [{"type": "string"},
                             {"type": "array", "minItems": 1, "items": {"type": "string"}}]}
LIMIT: JsonDict = {"anyOf": [{"type": "integer", "minimum": 1}, *OFF]}
COUNT: JsonDict = {"type": "integer", "minimum": 1, "maximum": 100}
PORTS: JsonDict = {"anyOf": [PORT, {"type": "string", "pattern": r"^\s*\d+\s*(-\s*\d+\s*)?$"}]}
ONE_PORT: JsonDict = {"anyOf": [PORT, {"type": "string", "pattern": r"^\s*\d+\s*$"}]}
WORKERS: JsonDict = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 256},
                               {"type": "string", "pattern": r"^(auto|\d+)$"}]}
THREADS: JsonDict = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 64},
                               {"type": "string", "pattern": r"^(auto|\d+)$"}]}


def _enum(choices: tuple[str, ...]) -> JsonDict:
    return {"enum": list(choices)}


P, S = PlainValidator, WithJsonSchema
Name = Annotated[str, P(v.parse_name), S(NAME), Kind("name")]
Seconds = Annotated[float, P(v.parse_seconds), S(DURATION), Kind("duration")]
SecondsOrOff = Annotated[float | None, P(v.parse_idle), S(DURATION_OFF), Kind("duration or off")]
Drain = Annotated[float, P(v.parse_drain), S(DRAIN), Kind("duration or off")]
Size = Annotated[int, P(v.parse_size), S(SIZE), Kind("size")]
Listen = Annotated[Address, P(v.parse_listen), S(BIND), Kind("[host:]port")]
AdminListen = Annotated[Address, P(v.parse_admin_listen), S(BIND), Kind("[host:]port")]
Upstream = Annotated[Address, P(v.parse_upstream_form), S(TEXT), Kind("host[:port]")]
MaybeUpstream = Annotated[Address | None, P(v.parse_upstream_form), S(TEXT), Kind("host[:port]")]
Backups = Annotated[tuple[Address, ...], P(v.parse_backup_form),
                    S({"type": "array", "items": TEXT, "minItems": 1}), Kind("list of host[:port]")]
Networks = Annotated[tuple[Network, ...] | None, P(v.parse_networks), S(CIDRS),
                     Kind("list of CIDRs")]
Limit = Annotated[int | None, P(v.parse_limit), S(LIMIT), Kind("count or off")]
ProtocolName = Annotated[Protocol, P(v.one_of(PROTOCOLS)), S(_enum(PROTOCOLS)), Kind("enum")]
# Given or not given, never null: ``kind:`` left empty is a mistake, not "the default".
CheckKind = Annotated[Protocol | None, P(v.one_of(PROTOCOLS)), S(_enum(PROTOCOLS)), Kind("enum")]
OnDownName = Annotated[OnDown, P(v.one_of(ON_DOWN, "keep or close")), S(_enum(ON_DOWN)),
                       Kind("enum")]
CopyName = Annotated[Copy, P(v.one_of(COPY_MODES)), S(_enum(COPY_MODES)), Kind("enum")]
LogFormatName = Annotated[LogFormat, P(v.one_of(LOG_FORMATS, "text or json")),
                          S(_enum(LOG_FORMATS)), Kind("enum")]
RelayName = Annotated[RelayKind, P(v.one_of(RELAY_KINDS)), S(_enum(RELAY_KINDS)), Kind("enum")]
RoleName = Annotated[RedisRole, P(v.one_of(REDIS_ROLES, "primary or any")),
                     S(_enum(REDIS_ROLES)), Kind("enum")]
EngineName = Annotated[Engine, P(v.one_of(ENGINES)), S(_enum(ENGINES)), Kind("enum")]
ProxyProtocolName = Annotated[ProxyProtocol, P(v.parse_proxy_protocol),
                             S({"anyOf": [_enum(PROXY_PROTOCOLS), *OFF[:1]]}), Kind("enum")]
Bool = Annotated[bool, P(v.parse_bool), S({"type": "boolean"}), Kind("boolean")]
Count = Annotated[int, P(v.parse_count), S(COUNT), Kind("integer")]
ReadableFile = Annotated[str, P(v.readable_file), S(TEXT), Kind("file path")]
MaybeFile = Annotated[str | None, P(v.readable_file), S(TEXT), Kind("file path")]
ServerName = Annotated[str | None, P(v.parse_server_name), S(TEXT), Kind("host")]
UserName = Annotated[str | None, P(v.parse_username), S(TEXT), Kind("string")]
Password = Annotated[Secret | None, P(v.parse_password), S(TEXT), Kind("secret")]
EnvName = Annotated[str | None, P(v.parse_env_name), S(TEXT), Kind("string")]
FileName = Annotated[str | None, P(v.parse_file_name), S(TEXT), Kind("file path")]
Announce = Annotated[str, P(v.parse_announce), S(TEXT), Kind("host")]
IpAddress = Annotated[str, P(v.parse_ip), S(TEXT), Kind("IP address")]
PortRange = Annotated[tuple[int, int], P(v.parse_port_range), S(PORTS), Kind("port range")]
Port = Annotated[int | None, P(v.parse_single_port), S(ONE_PORT), Kind("port")]
BindHost = Annotated[str, P(v.parse_bind_host), S(TEXT), Kind("host")]
Workers = Annotated[int, P(v.parse_workers), S(WORKERS), Kind("count or auto")]
Threads = Annotated[int | None, P(v.parse_engine_threads), S(THREADS), Kind("count or auto")]
BusyPoll = Annotated[float, P(v.parse_busy_poll), S(DURATION_OFF), Kind("duration or off")]
Folder = Annotated[str | None, P(v.parse_state_dir), S(TEXT), Kind("folder path")]
Word = Annotated[str, P(v.parse_word), S(TEXT), Kind("string")]
MaybeWord = Annotated[str | None, P(v.parse_word), S(TEXT), Kind("string")]
Words = Annotated[tuple[str, ...], P(v.parse_words),
                  S({"anyOf": [TEXT, {"type": "array", "items": TEXT, "minItems": 1}]}),
                  Kind("list of ids")]
Tags = Annotated[tuple[tuple[str, str], ...], P(v.parse_tags),
                 S({"type": "object", "additionalProperties": {"type": "string"},
                    "minProperties": 1}), Kind("mapping")]


def or_forms(*variants: JsonDict, default: str = "off") -> Callable[[JsonDict], None]:
    """Add what YAML may write instead of the nested mapping (``on``, ``off``...)."""

    def extra(schema: JsonDict) -> None:
        schema["default"] = default
        options = schema.get("anyOf") or [{key: schema.pop(key) for key in ("$ref",)
                                           if key in schema}]
        options = [o for o in options if o.get("type") != "null"]
        schema["anyOf"] = [*options, *variants]

    return extra


def list_or_empty(schema: JsonDict) -> None:
    """``listeners:`` left empty is allowed: say so without an anyOf, whose errors editors
    report as "not valid under any of the given schemas" instead of the entry at fault."""
    array = next(o for o in schema.pop("anyOf") if o.get("type") == "array")
    schema.update(array, type=["array", "null"])


def switch(on: bool, expected: str) -> Callable[[Any], Any]:
    """``off`` (YAML false, null) is None; ``on`` (true) an empty mapping (all defaults)."""

    def before(value: Any) -> Any:
        if v.is_off(value):
            return None
        if on and (value is True or value == "on"):
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"expected {expected}, got {show(value)}")
        return value

    return before
