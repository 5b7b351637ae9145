"""ElastiCache descriptions (the API's own dict shapes) -> port map entries; pure.

========================================  =================================================
described as                              becomes
========================================  =================================================
replication group, cluster mode enabled   ``engine: redis-cluster``, seed = configuration
                                          endpoint, ``seed_port`` + a node range
replication group, cluster mode disabled  ``engine: redis-replication``, seed = primary
                                          endpoint, ``primary_port``, ``reader_port``, range
cache cluster, memcached                  ``engine: memcached``, seed = configuration
                                          endpoint, ``seed_port`` + a node range
cache cluster, redis/valkey, no group     a listener to its one node
cache cluster in a replication group      nothing of its own (its group's entry covers it)
serverless cache, redis/valkey            ``engine: redis-cluster`` with ``upstream_tls``
serverless cache, memcached               a listener with ``upstream_tls``
========================================  =================================================

Ranges never overlap: each entry takes the next block of ports from ``first_port``,
starting on a multiple of 10 so they read well. What cannot be translated (no endpoint
yet, the 6380 reader endpoint of a serverless cache, AUTH that needs a secret) is
returned as ``Untranslated``, never dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..config import Address
from .model import ImportedCluster, ImportedListener, Source, Translation, Untranslated

Described = Mapping[str, Any]

MAX_PORT = 65535
MIN_RANGE = 8  # room for nodes added and replaced (a replaced node's port rests a while)
REPLICATION_RANGE = 12  # 1 primary + up to 5 replicas, twice
SERVERLESS_RANGE = 4  # the endpoint announces itself; a few spare


class TranslateError(ValueError):
    """The flags cannot make a port map (ports run out); the message says why."""


def _endpoint(value: Any) -> Address | None:
    if not isinstance(value, Mapping) or not value.get("Address") or not value.get("Port"):
        return None
    return Address(str(value["Address"]), int(value["Port"]))


def _name(ident: str, taken: set[str]) -> str:
    """A port map name (letters, digits, '.', '_', '-'; at most 64), unique."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", ident).lstrip("_.-")[:60] or "cache"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def _range_for(nodes: int) -> int:
    return min(max(MIN_RANGE, 2 * nodes), 1024)


def _round10(port: int) -> int:
    return -(-port // 10) * 10


class _Ports:
    """Hands out non-overlapping blocks, each starting on a multiple of 10.

    A block in ``keep`` (from an earlier read, by source) is handed back as it was, and
    new blocks start above every kept one, so re-reading the API never moves a port.
    """

    def __init__(self, first: int, keep: Mapping[str, tuple[int, int]]) -> None:
        self.keep = keep
        self.next = max([first, *(_round10(s + c) for s, c in keep.values())])
        self.blocks: dict[str, tuple[int, int]] = {}

    def take(self, count: int, source: Source) -> tuple[int, int]:
        """(first port, how many) for ``source``."""
        key = f"{source.kind}:{source.ident}"
        block = self.keep.get(key)
        if block is None:
            start = self.next
            if start + count - 1 > MAX_PORT:
                raise TranslateError(f"no {count} ports left above {start} for {source}; "
                                     "pass a lower --first-port")
            self.next = _round10(start + count)
            block = (start, count)
        self.blocks[key] = block
        return block


def _tls(described: Described) -> bool:
    return bool(described.get("TransitEncryptionEnabled"))


def _auth_note(described: Described) -> tuple[bool, tuple[str, ...]]:
    if described.get("AuthTokenEnabled"):
        return True, ("AUTH token enabled: discovery and health checks need it (health: "
                      "password_env)",)
    users = described.get("UserGroupIds") or ([described["UserGroupId"]]
                                              if described.get("UserGroupId") else [])
    if users:
        return True, (f"RBAC user group(s) {', '.join(map(str, users))}: discovery and "
                      "health checks need a user (health: username, password_env)",)
    return False, ()


def _group(rg: Described, ports: _Ports, names: set[str]
           ) -> tuple[ImportedCluster | None, list[Untranslated]]:
    ident = str(rg.get("ReplicationGroupId", "?"))
    engine_name = str(rg.get("Engine") or "redis")
    groups = rg.get("NodeGroups") or []
    members = sum(len(g.get("NodeGroupMembers") or []) for g in groups) or \
        len(rg.get("MemberClusters") or [])
    cluster_mode = bool(rg.get("ClusterEnabled")) or rg.get("ClusterMode") == "enabled"
    tls = _tls(rg)
    shape = (f"cluster mode enabled, {len(groups)} shard(s)" if cluster_mode
             else "cluster mode disabled")
    detail = ", ".join(x for x in (engine_name, shape, f"{members} node(s)",
                                   rg.get("CacheNodeType"),
                                   "in-transit encryption" if tls else "") if x)
    source = Source("replication group", ident, str(rg.get("ARN", "")), detail)
    out: list[Untranslated] = []
    status = rg.get("Status")
    if status not in (None, "available", "modifying", "snapshotting"):
        out.append(Untranslated(source, f"status is {status!r}; translated anyway, check it "
                                        "once it is available"))
    global_info = rg.get("GlobalReplicationGroupInfo") or {}
    if global_info.get("GlobalReplicationGroupId"):
        out.append(Untranslated(source, "member of global datastore "
                                f"{global_info['GlobalReplicationGroupId']} "
                                f"({global_info.get('GlobalReplicationGroupMemberRole')}); only "
                                "this region's group is translated", needed=False))
    auth, notes = _auth_note(rg)
    if auth:
        out.append(Untranslated(source, notes[0]))
    if cluster_mode:
        seed = _endpoint(rg.get("ConfigurationEndpoint"))
        if seed is None:
            out.insert(0, Untranslated(source, "no configuration endpoint yet (still being "
                                               "created?); nothing to discover from"))
            return None, out
        start, count = ports.take(_range_for(members) + 1, source)
        return ImportedCluster(_name(ident, names), "redis-cluster", seed,
                               (start + 1, start + count - 1), source, seed_port=start,
                               upstream_tls=tls, auth=auth, notes=notes), out
    primary = _endpoint(groups[0].get("PrimaryEndpoint")) if groups else None
    if primary is None:
        out.insert(0, Untranslated(source, "no primary endpoint yet (still being created?)"))
        return None, out
    start, count = ports.take(REPLICATION_RANGE + 2, source)
    return ImportedCluster(_name(ident, names), "redis-replication", primary,
                           (start + 2, start + count - 1), source,
                           primary_port=start, reader_port=start + 1, upstream_tls=tls,
                           auth=auth, notes=notes), out


def _cache_cluster(cc: Described, ports: _Ports, names: set[str]
                   ) -> tuple[ImportedCluster | ImportedListener | None, list[Untranslated]]:
    ident = str(cc.get("CacheClusterId", "?"))
    engine_name = str(cc.get("Engine") or "?")
    nodes = cc.get("CacheNodes") or []
    tls = _tls(cc)
    detail = ", ".join(x for x in (
        f"{engine_name} {cc.get('EngineVersion', '')}".strip(),
        f"{cc.get('NumCacheNodes', len(nodes))} node(s)", cc.get("CacheNodeType"),
        "in-transit encryption" if tls else "") if x)
    source = Source("cache cluster", ident, str(cc.get("ARN", "")), detail)
    if cc.get("ReplicationGroupId"):
        return None, [Untranslated(source, f"member of replication group "
                                           f"{cc['ReplicationGroupId']}, whose entry covers it",
                                   needed=False)]
    auth, notes = _auth_note(cc)
    extra = [Untranslated(source, notes[0])] if auth else []
    if engine_name == "memcached":
        seed = _endpoint(cc.get("ConfigurationEndpoint"))
        if seed is None:
            return None, [Untranslated(source, "no configuration endpoint yet (still being "
                                               "created?)")]
        listed = ", ".join(f"{n.get('CacheNodeId')}={_endpoint(n.get('Endpoint'))}"
                           for n in nodes)
        size = _range_for(max(len(nodes), int(cc.get("NumCacheNodes") or 0)))
        start, count = ports.take(size + 1, source)
        node_note = (f"nodes now: {listed}",) if listed else ()
        return ImportedCluster(_name(ident, names), "memcached", seed,
                               (start + 1, start + count - 1), source, seed_port=start,
                               upstream_tls=tls, notes=node_note), extra
    if engine_name in ("redis", "valkey"):
        upstream = _endpoint(nodes[0].get("Endpoint")) if nodes else None
        if upstream is None:
            return None, [Untranslated(source, "no node endpoint yet (still being created?)")]
        port, _ = ports.take(1, source)
        return ImportedListener(_name(ident, names), port, upstream, "redis", source,
                                upstream_tls=tls, auth=auth, notes=notes), extra
    return None, [Untranslated(source, f"engine {engine_name!r} is not one cacheport knows")]


def _serverless(sc: Described, ports: _Ports, names: set[str]
                ) -> tuple[ImportedCluster | ImportedListener | None, list[Untranslated]]:
    ident = str(sc.get("ServerlessCacheName", "?"))
    engine_name = str(sc.get("Engine") or "?")
    detail = ", ".join(x for x in (
        f"{engine_name} {sc.get('FullEngineVersion') or sc.get('MajorEngineVersion') or ''}"
        .strip(), "serverless, TLS only") if x)
    source = Source("serverless cache", ident, str(sc.get("ARN", "")), detail)
    endpoint = _endpoint(sc.get("Endpoint"))
    if endpoint is None:
        return None, [Untranslated(source, f"no endpoint yet (status {sc.get('Status')!r})")]
    out: list[Untranslated] = []
    auth, notes = _auth_note(sc)
    if auth:
        out.append(Untranslated(source, notes[0]))
    reader = _endpoint(sc.get("ReaderEndpoint"))
    if reader is not None:
        out.append(Untranslated(source, f"reader endpoint {reader} (reads from replicas) is "
                                        "not translated; the main endpoint serves reads too",
                                needed=False))
    if engine_name == "memcached":
        port, _ = ports.take(1, source)
        return ImportedListener(_name(ident, names), port, endpoint, "memcached", source,
                                upstream_tls=True, notes=notes), out
    if engine_name in ("redis", "valkey"):
        start, count = ports.take(SERVERLESS_RANGE + 1, source)
        return ImportedCluster(_name(ident, names), "redis-cluster", endpoint,
                               (start + 1, start + count - 1), source, seed_port=start,
                               upstream_tls=True, auth=auth, notes=notes), out
    return None, [Untranslated(source, f"engine {engine_name!r} is not one cacheport knows")]


def translate(groups: Sequence[Described], cache_clusters: Sequence[Described],
              serverless: Sequence[Described], *, first_port: int = 30000,
              keep: Mapping[str, tuple[int, int]] | None = None) -> Translation:
    """Every description -> an entry or an ``Untranslated``; ports from ``first_port`` up,
    except that a source in ``keep`` (``Translation.blocks`` of an earlier read) keeps
    its block."""
    ports = _Ports(first_port, keep or {})
    names: set[str] = set()
    clusters: list[ImportedCluster] = []
    listeners: list[ImportedListener] = []
    untranslated: list[Untranslated] = []

    def add(entry: ImportedCluster | ImportedListener | None, notes: list[Untranslated]
             ) -> None:
        if isinstance(entry, ImportedCluster):
            clusters.append(entry)
        elif isinstance(entry, ImportedListener):
            listeners.append(entry)
        untranslated.extend(notes)

    for rg in sorted(groups, key=lambda d: str(d.get("ReplicationGroupId"))):
        add(*_group(rg, ports, names))
    for cc in sorted(cache_clusters, key=lambda d: str(d.get("CacheClusterId"))):
        add(*_cache_cluster(cc, ports, names))
    for sc in sorted(serverless, key=lambda d: str(d.get("ServerlessCacheName"))):
        add(*_serverless(sc, ports, names))
    return Translation(tuple(clusters), tuple(listeners), tuple(untranslated), ports.blocks)


IDENT_KEYS = ("ReplicationGroupId", "CacheClusterId", "ServerlessCacheName")


def ident_of(described: Described) -> str:
    return next((str(described[k]) for k in IDENT_KEYS if described.get(k)), "")


def select(items: Iterable[Described], ids: Sequence[str],
           tags: Mapping[str, str], tags_of: Callable[[str], Mapping[str, str]]
           ) -> list[Described]:
    """Keep what ``ids`` names (a cache cluster also by its group's id) and what carries
    every tag in ``tags``; ``tags_of(arn)`` is asked only when tags are given."""
    out = []
    for item in items:
        if ids and ident_of(item) not in ids and item.get("ReplicationGroupId") not in ids:
            continue
        if tags:
            have = tags_of(str(item.get("ARN", "")))
            if any(have.get(k) != v for k, v in tags.items()):
                continue
        out.append(item)
    return out


def parse_tag(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` from the command line."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key, value

