"""Listeners -> the annotated YAML port map, and a port map -> DNAT rules (both pure)."""

from __future__ import annotations

import ipaddress
import re
import textwrap
from collections.abc import Sequence

import yaml

from ..config import Address, Config, ListenerConfig
from .model import ImportedListener, Untranslated

# ---------------------------------------------------------------------------
# listeners -> YAML


def open_allow(listen: Address) -> str:
    """The allow entry that admits every client of the listener's address family."""
    return "::/0" if listen.is_ipv6 else "0.0.0.0/0"


def render_yaml(
    listeners: Sequence[ImportedListener],
    untranslated: Sequence[Untranslated] = (),
    *,
    source: str = "standard input",
) -> str:
    """The annotated port map: a header, one commented listener per rule, then the leftovers."""
    rules = sum(len(lc.lines) for lc in listeners)
    skipped = [u for u in untranslated if u.needed]
    not_needed = [u for u in untranslated if not u.needed]
    out = [
        f"# cacheport port map, translated by `cacheport import-iptables` from {_oneline(source)}.",
        "#",
        f"# {_count(rules, 'DNAT rule')} became {_count(len(listeners), 'listener')}; "
        f"{len(not_needed)} line(s) cacheport does not need and",
        f"# {len(skipped)} line(s) it could not translate are listed at the end of this file.",
        "# The protocol was guessed from the node's port (11211 memcached, 6379 redis, else tcp).",
        "#",
        "# Delete the DNAT rules when cacheport takes over: they rewrite the packets in",
        "# PREROUTING, before any socket on this host sees them, so while they exist new",
        "# connections bypass cacheport.",
    ]
    interfaces = sorted({name for lc in listeners for name in lc.interfaces})
    if interfaces:
        out += [
            "#",
            f"# The rules matched only packets arriving on {_oneline(', '.join(interfaces))} (-i).",
            "# A listener on 0.0.0.0 accepts on every interface; put that interface's",
            "# address in 'listen' to narrow it.",
        ]
    out += [
        "#",
        "#   cacheport check FILE     validate the map",
        "#   cacheport run -c FILE    serve it",
        "",
        "listeners:",
    ]
    for lc in listeners:
        out += [f"  # line {ln.number}: {_oneline(ln.text)}" for ln in lc.lines]
        out += [f"  # comment: {_oneline(text)}" for text in lc.comments]
        out += [
            f"  - name: {_scalar(lc.name)}",
            f"    listen: {_scalar(str(lc.listen))}",
            f"    upstream: {_scalar(str(lc.upstream))}",
            f"    protocol: {lc.protocol}",
        ]
        out += _allow_lines(lc)
    out += _untranslated_lines(
        not_needed, "Not needed with cacheport (the reason is under each line):")
    out += _untranslated_lines(
        skipped, "NOT TRANSLATED: review these lines and port them by hand if they matter:")
    return "\n".join(out) + "\n"


def _allow_lines(lc: ImportedListener) -> list[str]:
    if lc.allow is None:
        return ["    allow:",
                f"      - {_scalar(open_allow(lc.listen))}  # the rule had no -s: every source"
                " got through; narrow this to your clients"]
    return ["    allow:"] + [f"      - {_scalar(cidr)}" for cidr in lc.allow]


def _untranslated_lines(items: Sequence[Untranslated], title: str) -> list[str]:
    if not items:
        return []
    out = ["", f"# {title}"]
    for item in items:
        out.append(f"#   line {item.line.number}: {_oneline(item.line.text)}")
        reason = textwrap.wrap(_oneline(item.reason), 88)
        out += [f"#     {'->' if i == 0 else '  '} {part}" for i, part in enumerate(reason)]
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# What YAML may not hold even in a comment (its printable set is tab, LF, CR, 0x20-0x7E,
# NEL, 0xA0-0xD7FF, 0xE000-0xFFFD and above): shown as escapes instead.
_UNPRINTABLE = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _escaped(text: str) -> str:
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100
                            else f"\\u{ord(m[0]):04x}", text)


def _oneline(text: str) -> str:
    """Text safe inside a one-line YAML comment."""
    return " ".join(_escaped(text).split())


def _scalar(text: str) -> str:
    """A plain YAML scalar where YAML reads it back as the same string, else double-quoted."""
    try:
        plain = yaml.safe_load(f"k: {text}") == {"k": text}
    except yaml.YAMLError:
        plain = False
    if plain:
        return text
    escaped = _escaped(text.replace("\\", "\\\\").replace('"', '\\"'))
    return f'"{escaped}"'


# ---------------------------------------------------------------------------
# Config -> iptables


def _allow_of(lc: ListenerConfig) -> list[str] | None:
    """The listener's allow entries as CIDR strings; None when it admits every source."""
    entries = lc.allow
    if entries is None:
        return None
    cidrs = [str(ipaddress.ip_network(str(entry), strict=False)) for entry in entries]
    if any(ipaddress.ip_network(cidr).prefixlen == 0 for cidr in cidrs):
        return None
    return cidrs


def render_iptables(config: Config) -> tuple[str, list[str]]:
    """The DNAT rules that forward what the port map forwards, and warnings for the rest.

    One rule per listener, or one per ``allow`` entry (``-s``). A listener DNAT
    cannot express (a DNS-named upstream, port 0, a change of address family) is
    written commented out, with the reason.
    """
    out = [
        f"# iptables rules for the cacheport port map {config.path}, written by",
        "# `cacheport export-iptables`, for comparison or as a fallback to kernel DNAT.",
        "# They forward what the listeners' listen, upstream and allow fields say, and",
        "# nothing else: no health checks, timeouts or re-resolving of DNS names.",
        "# While they exist they take every new connection on their ports away from",
        "# cacheport (DNAT happens before any socket sees the packet). As a fallback",
        "# the NAT host also needs what the original recipe had (eth0: the interface",
        "# towards the cache nodes):",
        "#   sysctl -w net.ipv4.ip_forward=1",
        "#   iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE",
    ]
    warnings: list[str] = []
    for lc in config.listeners:
        rules, problem = _export_listener(lc)
        out += ["", f"# listener {lc.name}: {lc.listen} -> {lc.upstream} ({lc.protocol})"]
        if problem is None:
            out += rules
        else:
            warnings.append(f"listener {lc.name!r}: {problem}")
            out += [f"# NOT EXPORTED: {problem}"] + [f"# {rule}" for rule in rules]
    return "\n".join(out) + "\n", warnings


def _export_listener(lc: ListenerConfig) -> tuple[list[str], str | None]:
    """The listener's rules, and why they cannot be used as they are (None: they can)."""
    program = "ip6tables" if lc.upstream.is_ipv6 else "iptables"
    destination = "" if lc.listen.is_wildcard else f" -d {lc.listen.host}"
    allow = _allow_of(lc)
    # An entry of the other address family can never match this rule's clients.
    family_allow = None if allow is None else [
        cidr for cidr in allow if (":" in cidr) == lc.upstream.is_ipv6]
    sources: list[str | None] = list(family_allow) if family_allow else [None]
    rules = [
        f"{program} -t nat -A PREROUTING{destination}{f' -s {cidr}' if cidr else ''}"
        f" -p tcp --dport {lc.listen.port} -j DNAT --to-destination {lc.upstream}"
        for cidr in sources
    ]
    problem = None
    if not lc.upstream.is_ip:
        problem = (f"upstream {lc.upstream.host} is a DNS name; DNAT needs an address, fixed "
                   "when the rule is added (cacheport re-resolves the name every dns_ttl)")
    elif lc.listen.port == 0:
        problem = "listen port 0 (any free port) has no iptables equivalent"
    elif lc.listen.is_ipv6 != lc.upstream.is_ipv6:
        problem = (f"listen {lc.listen} and upstream {lc.upstream} are of different address "
                   "families; DNAT cannot change the family")
    elif family_allow == []:
        problem = "its allow list has no entry of the upstream's address family"
    return rules, problem
