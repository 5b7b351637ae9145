"""The ROLE reply of a Redis / Valkey node (cluster mode disabled), parsed sans-IO.

::

    master:  ["master", offset, [[ip, port, offset], ...]]     its connected replicas
    slave:   ["slave", master_ip, master_port, state, offset]  state: connect, connecting,
                                                                sync, connected
    sentinel: ["sentinel", [names]]

A replica's ``ip`` in the master's list is the address its replication connection came
from (or its ``replica-announce-ip``); its port is the one it announced
(``REPLCONF listening-port``), so the pair is where a client reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .resp import Frame, ProtocolError, parse_one


class RoleError(ValueError):
    """A ROLE reply cacheport cannot use; the message says what was wrong."""


@dataclass(frozen=True, slots=True)
class Role:
    """What one node says it is."""

    role: str  # master, slave (replica) or sentinel
    replicas: tuple[tuple[str, int], ...] = ()  # master: its connected replicas
    master: tuple[str, int] | None = None  # replica: where it replicates from
    link: str = ""  # replica: the state of its link to the master ("connected" when in sync)

    @property
    def is_master(self) -> bool:
        return self.role == "master"


def _text(frame: Frame, what: str) -> str:
    value = frame.bytes_value
    if value is None:
        if frame.kind in ":(":
            return str(frame.to_py())
        raise RoleError(f"ROLE: {what} is not a string")
    return value.decode("utf-8", "replace")


def _port(frame: Frame, what: str) -> int:
    text = _text(frame, what)
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise RoleError(f"ROLE: {what} {text!r} is not a port")
    return int(text)


def parse_role(raw: bytes) -> Role:
    """One raw ROLE reply -> ``Role``; raises ``RoleError`` for an error or a bad shape."""
    try:
        frame = parse_one(raw)
    except ProtocolError as exc:
        raise RoleError(f"ROLE reply is not RESP: {exc}") from None
    if frame.is_error:
        raise RoleError(f"ROLE: {_text(frame, 'error')}")
    items = frame.items
    if not items:
        raise RoleError("ROLE reply is not a non-empty array")
    role = _text(items[0], "role")
    if role == "master":
        if len(items) < 3:
            raise RoleError("ROLE: a master reply has fewer than 3 elements")
        replicas = []
        for entry in items[2].items:
            fields = entry.items
            if len(fields) < 2:
                raise RoleError("ROLE: a replica entry has fewer than 2 elements")
            replicas.append((_text(fields[0], "replica ip"), _port(fields[1], "replica port")))
        return Role("master", replicas=tuple(replicas))
    if role == "slave":
        if len(items) < 4:
            raise RoleError("ROLE: a replica reply has fewer than 4 elements")
        return Role("slave", master=(_text(items[1], "master ip"),
                                     _port(items[2], "master port")),
                    link=_text(items[3], "link state"))
    return Role(role)
