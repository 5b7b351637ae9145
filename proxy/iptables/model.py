"""What parsing produces and rendering consumes: listeners translated from rules, and the
lines that became none (each with its reason, so nothing is dropped silently)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Address, Protocol


@dataclass(frozen=True, slots=True)
class SourceLine:
    """One line of the input, quoted back in the YAML comments and the warnings."""

    number: int
    text: str


@dataclass(frozen=True, slots=True)
class ImportedListener:
    """A listener translated from one or more DNAT rules (several when they differ by -s)."""

    name: str
    listen: Address
    upstream: Address
    protocol: Protocol
    allow: tuple[str, ...] | None  # CIDRs from -s; None when a rule let every source through
    lines: tuple[SourceLine, ...]
    comments: tuple[str, ...] = ()  # -m comment --comment texts
    interfaces: tuple[str, ...] = ()  # -i names, which a listener cannot match


@dataclass(frozen=True, slots=True)
class Untranslated:
    """A line that became no listener, and why.

    ``needed`` is False for what cacheport makes unnecessary (the SNAT/MASQUERADE
    rule, ip_forward, saving the rules); True for a rule the operator must look at.
    """

    line: SourceLine
    reason: str
    needed: bool = True
