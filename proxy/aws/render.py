"""A ``Translation`` -> the annotated YAML port map (pure), in import-iptables' manner:
every entry says what it came from, and what could not be translated is listed."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from ..iptables.render import _count, _oneline, _scalar
from .model import ImportedCluster, ImportedListener, Source, Translation, Untranslated


def _source_lines(source: Source, notes: Sequence[str]) -> list[str]:
    out = [f"  # from {source.kind} {_oneline(source.ident)}: {_oneline(source.detail)}"]
    if source.arn:
        out.append(f"  #   {_oneline(source.arn)}")
    out += [f"  # note: {_oneline(n)}" for n in notes]
    return out


def _auth_lines(name: str) -> list[str]:
    variable = "CACHEPORT_" + "".join(c if c.isalnum() else "_" for c in name).upper() + \
        "_PASSWORD"
    return ["    # health:                       # uncomment: the AUTH token / RBAC password",
            f"    #   password_env: {variable}"]


def _cluster(c: ImportedCluster, announce: str, listen: str) -> list[str]:
    out = _source_lines(c.source, c.notes)
    out += [f"  - name: {_scalar(c.name)}",
            f"    engine: {c.engine}",
            f"    seed: {_scalar(str(c.seed))}",
            f"    announce: {_scalar(announce)}",
            f"    listen: {_scalar(listen)}",
            f"    ports: {c.ports[0]}-{c.ports[1]}"]
    for key in ("seed_port", "primary_port", "reader_port"):
        value = getattr(c, key)
        if value is not None:
            out.append(f"    {key}: {value}")
    if c.upstream_tls:
        out.append("    upstream_tls: on")
    if c.auth:
        out += _auth_lines(c.name)
    return out


def _listener(lc: ImportedListener, listen: str) -> list[str]:
    out = _source_lines(lc.source, lc.notes)
    host = f"{listen}:" if listen != "0.0.0.0" else ""
    out += [f"  - name: {_scalar(lc.name)}",
            f"    listen: {_scalar(f'{host}{lc.port}')}",
            f"    upstream: {_scalar(str(lc.upstream))}",
            f"    protocol: {lc.protocol}"]
    if lc.upstream_tls:
        out.append("    upstream_tls: on")
    if lc.auth:
        out += _auth_lines(lc.name)
    return out


def _untranslated(items: Sequence[Untranslated], title: str) -> list[str]:
    if not items:
        return []
    out = ["", f"# {title}"]
    for item in items:
        out.append(f"#   {item.source.kind} {_oneline(item.source.ident)}")
        for i, part in enumerate(textwrap.wrap(_oneline(item.reason), 86)):
            out.append(f"#     {'->' if i == 0 else '  '} {part}")
    return out


def render_yaml(t: Translation, *, region: str, announce: str, allow: Sequence[str],
                listen: str = "0.0.0.0") -> str:
    """The port map: a header, ``defaults`` with the allow list, clusters, listeners,
    then what was not translated."""
    needed = [u for u in t.untranslated if u.needed]
    not_needed = [u for u in t.untranslated if not u.needed]
    out = [
        f"# cacheport port map, written by `cacheport import-aws` from the ElastiCache API "
        f"in {_oneline(region)}.",
        "#",
        f"# {_count(len(t.clusters), 'cluster')} and {_count(len(t.listeners), 'listener')}; "
        f"{len(needed)} item(s) to review and {len(not_needed)} covered otherwise are",
        "# listed at the end. Clients connect to the announce address and the ports below,",
        "# with TLS off towards cacheport: it makes the TLS connection to the cache itself",
        "# (upstream_tls). Re-run the import when caches are created or deleted; nodes",
        "# added to or removed from a cache are followed without it.",
        "#",
        "#   cacheport check FILE     validate the map",
        "#   cacheport run -c FILE    serve it",
        "",
        "defaults:",
        "  allow:",
        *[f"    - {_scalar(cidr)}" for cidr in allow],
    ]
    if t.clusters:
        out += ["", "clusters:"]
        for c in t.clusters:
            out += _cluster(c, announce, listen)
    if t.listeners:
        out += ["", "listeners:"]
        for lc in t.listeners:
            out += _listener(lc, listen)
    out += _untranslated(not_needed, "Not needed: covered otherwise (the reason is under each):")
    out += _untranslated(needed, "REVIEW: not translated, or translated with a gap:")
    return "\n".join(out) + "\n"


def entry_dicts(t: Translation, announce: str, listen: str = "0.0.0.0"
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The same entries as plain YAML data (clusters, listeners), for the ``aws:`` source
    to add to the port map's text. Entries needing a secret are left out (listed as
    Untranslated by the translation already): without it discovery could only fail."""
    clusters: list[dict[str, Any]] = []
    for c in t.clusters:
        if c.auth:
            continue
        entry: dict[str, Any] = {"name": c.name, "engine": c.engine, "seed": str(c.seed),
                                 "announce": announce, "listen": listen,
                                 "ports": f"{c.ports[0]}-{c.ports[1]}"}
        for key in ("seed_port", "primary_port", "reader_port"):
            if getattr(c, key) is not None:
                entry[key] = getattr(c, key)
        if c.upstream_tls:
            entry["upstream_tls"] = True
        clusters.append(entry)
    listeners: list[dict[str, Any]] = []
    for lc in t.listeners:
        if lc.auth:
            continue
        item: dict[str, Any] = {"name": lc.name, "listen": f"{listen}:{lc.port}",
                                "upstream": str(lc.upstream), "protocol": lc.protocol}
        if lc.upstream_tls:
            item["upstream_tls"] = True
        listeners.append(item)
    return clusters, listeners
