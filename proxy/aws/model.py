"""What translation produces and rendering consumes: port map entries made from the
ElastiCache API's descriptions, each naming what it came from, and what became none."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..config import Address, Engine, Protocol


@dataclass(frozen=True, slots=True)
class Source:
    """One described resource, quoted in the YAML comments and the warnings."""

    kind: str  # "replication group", "cache cluster", "serverless cache"
    ident: str  # its id / name
    arn: str = ""
    detail: str = ""  # engine, version, shape, encryption: one line

    def __str__(self) -> str:
        return f"{self.kind} {self.ident}"


@dataclass(frozen=True, slots=True)
class ImportedCluster:
    """A ``clusters:`` entry: cacheport discovers the nodes behind ``seed``."""

    name: str
    engine: Engine
    seed: Address
    ports: tuple[int, int]
    source: Source
    seed_port: int | None = None
    primary_port: int | None = None
    reader_port: int | None = None
    upstream_tls: bool = False
    auth: bool = False  # AUTH token / RBAC: discovery and checks need credentials
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ImportedListener:
    """A plain ``listeners:`` entry, for an endpoint with nothing to discover."""

    name: str
    port: int
    upstream: Address
    protocol: Protocol
    source: Source
    upstream_tls: bool = False
    auth: bool = False
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Untranslated:
    """A resource (or part of one) that became no entry, and why.

    ``needed`` is False for what needs no entry of its own (a replication group's member
    cache clusters); True for what the operator must look at.
    """

    source: Source
    reason: str
    needed: bool = True


@dataclass(frozen=True, slots=True)
class Translation:
    clusters: tuple[ImportedCluster, ...]
    listeners: tuple[ImportedListener, ...]
    untranslated: tuple[Untranslated, ...]
    blocks: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # source -> ports

    @property
    def entries(self) -> int:
        return len(self.clusters) + len(self.listeners)
