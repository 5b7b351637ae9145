"""Migrating from iptables: DNAT port forwards to a cacheport port map, and back.

::

    iptables-save | iptables -t nat -S | "sudo iptables -t nat -A ..." lines
        --parse_rules()-->   ImportedListener...  +  Untranslated...   (pure)
        --render_yaml()-->   annotated YAML port map                     (pure)
    Config --render_iptables()--> "iptables -t nat -A PREROUTING ..." lines (pure)

Only a nat-table PREROUTING DNAT rule for one TCP port to one address is a port
forward that a listener can take over. Every other line comes back as an
``Untranslated`` with its reason, so the caller lists it: nothing is dropped
silently. ``cmd_import`` and ``cmd_export`` do the file and terminal I/O.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import shlex
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import (
    Address,
    Config,
    ConfigError,
    ListenerConfig,
    Protocol,
    _conflicts,
    load_config,
    load_yaml,
    parse_config,
)

EXIT_OK = 0
EXIT_CONFIG = 2

# The upstream port says which engine an ElastiCache node runs.
GUESSED_PROTOCOLS: dict[int, Protocol] = {11211: "memcached", 6379: "redis"}

SNAT_NOT_NEEDED = (
    "cacheport opens its own connection to the node from this host's address, "
    "so the node's replies come back to this host without source NAT (keep the rule only "
    "if this host is also the NAT gateway for other traffic)"
)
IP_FORWARD_NOT_NEEDED = (
    "cacheport does not route packets; it accepts the client's connection and "
    "opens its own to the node (keep it only if this host also routes other traffic)"
)
SAVE_NOT_NEEDED = (
    "this saves the iptables rules across reboots; cacheport's port map is its YAML "
    "file (after deleting the DNAT rules, save once more, or they come back at boot)"
)

_IPTABLES = ("iptables", "iptables-legacy", "iptables-nft",
             "ip6tables", "ip6tables-legacy", "ip6tables-nft")
_SAVE_COMMANDS = ("iptables-save", "ip6tables-save", "iptables-legacy-save", "iptables-nft-save")

# Long and short spellings of the options a port-forward rule uses.
_VALUE_OPTIONS = {
    "-t": "table", "--table": "table",
    "-p": "protocol", "--protocol": "protocol",
    "-s": "source", "--source": "source", "--src": "source",
    "-d": "destination", "--destination": "destination", "--dst": "destination",
    "-i": "in_interface", "--in-interface": "in_interface",
    "-o": "out_interface", "--out-interface": "out_interface",
    "-m": "match", "--match": "match",
    "-j": "target", "--jump": "target",
    "--dport": "dport", "--destination-port": "dport",
    "--comment": "comment",
}
_COMMANDS = {
    "-A": "append", "--append": "append", "-I": "insert", "--insert": "insert",
    "-P": "policy", "--policy": "policy", "-N": "new", "--new-chain": "new",
    "-D": "delete", "--delete": "delete", "-R": "replace", "--replace": "replace",
    "-F": "flush", "--flush": "flush", "-X": "delete-chain", "--delete-chain": "delete-chain",
    "-Z": "zero", "--zero": "zero", "-E": "rename-chain", "--rename-chain": "rename-chain",
    "-L": "list", "--list": "list", "-S": "list", "--list-rules": "list",
}
_LISTING_FLAGS = ("-n", "--numeric", "-v", "--verbose", "-x", "--exact", "--line-numbers")
# Target options, matched like getopt_long does: exact, or an unambiguous prefix
# (the NAT-instance guide writes --to for DNAT's --to-destination).
_TARGET_OPTIONS: dict[str, tuple[str, ...]] = {
    "DNAT": ("to-destination", "random", "persistent"),
    "SNAT": ("to-source", "random", "random-fully", "persistent"),
    "MASQUERADE": ("to-ports", "random", "random-fully"),
    "REDIRECT": ("to-ports", "random"),
}
_TARGET_VALUE_OPTIONS = ("to-destination", "to-source", "to-ports")


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


class _Skip(Exception):
    def __init__(self, reason: str, *, needed: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.needed = needed


@dataclass
class _Args:
    """The options of one iptables command line, before any judgement."""

    table: str
    command: str | None = None
    chain: str | None = None
    policy: str | None = None
    protocol: str | None = None
    source: str | None = None
    destination: str | None = None
    in_interface: str | None = None
    out_interface: str | None = None
    dport: str | None = None
    comment: str | None = None
    target: str | None = None
    to: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Forward:
    """One translatable DNAT rule."""

    line: SourceLine
    listen: Address
    upstream: Address
    sources: tuple[str, ...] | None
    comment: str | None
    interface: str | None


# ---------------------------------------------------------------------------
# iptables text -> listeners


def parse_rules(text: str) -> tuple[list[ImportedListener], list[Untranslated]]:
    """Translate iptables rules into listeners; everything else comes back with its reason.

    Accepts ``iptables-save`` output, ``iptables -t nat -S`` output and shell lines
    such as ``sudo iptables -t nat -A PREROUTING ... -j DNAT --to 10.0.1.230:11211``.
    Rules without a ``*table`` header or ``-t`` are in the nat table for bare ``-A``
    lines (what ``iptables -t nat -S`` prints) and in filter for ``iptables`` commands,
    as iptables itself would have it.
    """
    table: str | None = None  # from the "*nat" headers of iptables-save output
    forwards: list[_Forward] = []
    untranslated: list[Untranslated] = []
    for line in _logical_lines(text):
        try:
            tokens = shlex.split(line.text, comments=True)
        except ValueError as exc:
            untranslated.append(Untranslated(line, f"cannot split the line into words: {exc}"))
            continue
        if not tokens:
            continue
        head = tokens[0]
        if head.startswith("*") and len(tokens) == 1:
            table = head[1:]
            continue
        if head.startswith(":") or head == "COMMIT":
            # iptables-save chain headers (":PREROUTING ACCEPT [0:0]") carry no rule.
            if head == "COMMIT":
                table = None
            continue
        try:
            forward = _translate_line(line, tokens, table)
        except _Skip as skip:
            untranslated.append(Untranslated(line, skip.reason, needed=skip.needed))
            continue
        if forward is not None:
            forwards.append(forward)
    listeners, clashes = _assemble(forwards)
    untranslated.extend(clashes)
    untranslated.sort(key=lambda u: u.line.number)
    return listeners, untranslated


def _logical_lines(text: str) -> Iterator[SourceLine]:
    """Non-blank lines, with shell continuations (a trailing backslash) joined."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending:
            start = number
        if stripped.endswith("\\") and not stripped.startswith("#"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        pending = []
        if joined and not joined.startswith("#"):
            yield SourceLine(start, joined)
    if pending and (joined := " ".join(part for part in pending if part)):
        yield SourceLine(start, joined)


def _strip_prefix(tokens: list[str]) -> list[str]:
    """Drop a shell prompt, an ``iptables-save -c`` counter and ``sudo`` with its options."""
    rest = list(tokens)
    if rest and rest[0] == "$":
        rest.pop(0)
    if rest and rest[0].startswith("[") and rest[0].endswith("]") and ":" in rest[0]:
        rest.pop(0)  # "[12:720] -A PREROUTING ..." from iptables-save -c
    if rest and rest[0] in ("sudo", "doas"):
        rest.pop(0)
        while rest and rest[0].startswith("-"):
            option = rest.pop(0)
            if option in ("-u", "-g", "-C", "-h", "-p", "-r", "-t", "-U") and rest:
                rest.pop(0)
    return rest


def _translate_line(line: SourceLine, tokens: list[str], table: str | None) -> _Forward | None:
    tokens = _strip_prefix(tokens)
    if not tokens:
        raise _Skip("no command after the prefix")
    program = tokens[0].rsplit("/", 1)[-1]
    if program in _IPTABLES:
        args = _parse_args(tokens[1:], default_table="filter")
    elif program.startswith("-"):
        # A bare rule: iptables-save (under a "*table" header) or iptables -t nat -S.
        args = _parse_args(tokens, default_table=table or "nat")
    elif program in _SAVE_COMMANDS or (
        program in ("service", "systemctl", "netfilter-persistent") and "save" in tokens
    ):
        raise _Skip(SAVE_NOT_NEEDED, needed=False)
    elif any("ip_forward" in token for token in tokens):
        raise _Skip(IP_FORWARD_NOT_NEEDED, needed=False)
    else:
        raise _Skip(f"not an iptables rule ({program!r} is not iptables)")
    return _classify(line, args)


def _parse_args(tokens: list[str], *, default_table: str) -> _Args:
    """Read the options of one iptables command; an option it does not know is a skip."""
    args = _Args(table=default_table)
    i = 0

    def value(option: str) -> str:
        nonlocal i
        if i >= len(tokens):
            raise _Skip(f"option {option} is missing its value")
        i += 1
        return tokens[i - 1]

    while i < len(tokens):
        token = tokens[i]
        i += 1
        inline: str | None = None
        if token.startswith("--") and "=" in token:
            token, inline = token.split("=", 1)
        if token == "!":
            negated = tokens[i] if i < len(tokens) else ""
            raise _Skip(f"negated match '! {negated}': a listener cannot express "
                        "'everything except'")
        if token in _COMMANDS:
            if args.command is not None:
                raise _Skip(f"two commands in one line ({token})")
            args.command = _COMMANDS[token]
            if args.command == "list":
                break  # a listing changes nothing; its other options do not matter
            if i < len(tokens) and not tokens[i].startswith("-"):
                args.chain = value(token)
            if args.command == "insert" and i < len(tokens) and tokens[i].isdigit():
                i += 1  # -I CHAIN RULENUM
            if args.command == "policy" and i < len(tokens):
                args.policy = value(token)
            continue
        if token in _VALUE_OPTIONS:
            text = inline if inline is not None else value(token)
            _set_option(args, _VALUE_OPTIONS[token], text, token)
            continue
        if args.target in _TARGET_OPTIONS and token.startswith("--"):
            name = _long_option(token[2:], _TARGET_OPTIONS[args.target])
            if name is not None:
                if name in _TARGET_VALUE_OPTIONS:
                    args.to.append(inline if inline is not None else value(token))
                continue  # --random / --persistent: no effect with one address and port
        if token in ("-w", "--wait"):
            if i < len(tokens) and tokens[i].isdigit():
                i += 1
            continue
        if token in ("-c", "--set-counters"):
            value(token)
            value(token)
            continue
        if token in _LISTING_FLAGS:
            continue
        if token in ("-g", "--goto"):
            raise _Skip(f"jump with {token}: only rules that DNAT themselves are port forwards")
        if token.startswith("-"):
            raise _Skip(f"option {token} is not understood; translate this rule by hand")
        raise _Skip(f"unexpected word {token!r}")
    return args


def _set_option(args: _Args, key: str, text: str, option: str) -> None:
    if key == "match":
        name = text.lower()
        if name == "multiport":
            raise _Skip("multiport match (several ports in one rule): write one rule per "
                        "port, a listener serves one port")
        if name not in ("tcp", "udp", "comment"):
            raise _Skip(f"match '-m {text}' is not understood; translate this rule by hand")
        return
    if key == "protocol":
        text = {"6": "tcp", "17": "udp"}.get(text, text.lower())
    if key == "target" and args.target is not None:
        raise _Skip(f"two targets in one rule ({option} {text})")
    if key in ("source", "destination", "dport") and getattr(args, key) is not None:
        raise _Skip(f"{option} given twice")
    setattr(args, key, text)


def _long_option(name: str, options: tuple[str, ...]) -> str | None:
    """getopt_long's rule: an exact name, or a prefix of exactly one."""
    if name in options:
        return name
    candidates = [option for option in options if option.startswith(name)]
    return candidates[0] if len(candidates) == 1 else None


def _classify(line: SourceLine, args: _Args) -> _Forward | None:
    """Decide whether the rule is a port forward a listener can take over."""
    command = args.command
    if command == "list":
        raise _Skip("lists rules; changes nothing", needed=False)
    if command == "new" or (command == "policy" and args.policy == "ACCEPT"):
        return None  # chain bookkeeping (iptables -S prints "-P PREROUTING ACCEPT")
    if command == "policy":
        raise _Skip(f"policy {args.policy} for chain {args.chain}: not a port forward; keep "
                    "or remove it yourself")
    if command is None:
        raise _Skip("no -A or -I: not a rule")
    if command not in ("append", "insert"):
        raise _Skip(f"'{command}' changes other rules; only rules that add a port forward "
                    "(-A, -I) are translated")
    chain = args.chain or "?"
    if args.table != "nat":
        raise _Skip(f"{args.table} table: not a port forward (only nat-table DNAT rules are "
                    "translated); keep or remove it yourself")
    if chain == "POSTROUTING" and args.target in ("MASQUERADE", "SNAT"):
        raise _Skip(SNAT_NOT_NEEDED, needed=False)
    if chain != "PREROUTING":
        raise _Skip(f"chain {chain}: only PREROUTING rules forward other hosts' connections")
    if args.target != "DNAT":
        raise _Skip(f"target {args.target or '(none)'}: only DNAT rules are port forwards")
    if args.protocol is None:
        raise _Skip("no '-p tcp': the rule forwards every protocol; a listener forwards "
                    "one TCP port")
    if args.protocol != "tcp":
        raise _Skip(f"-p {args.protocol}: cacheport forwards TCP only")
    if args.out_interface is not None:
        raise _Skip(f"-o {args.out_interface} in PREROUTING is not understood")
    if args.dport is None:
        raise _Skip("no --dport: the rule forwards every port; a listener serves one port")
    if ":" in args.dport:
        raise _Skip(f"port range --dport {args.dport}: write one rule per port, a listener "
                    "serves one port")
    port = _port(args.dport, "--dport")
    if not args.to:
        raise _Skip("DNAT without --to-destination")
    if len(args.to) > 1:
        raise _Skip("several --to-destination: round-robin over nodes; a listener has one "
                    "upstream")
    upstream = _upstream(args.to[0], port)
    listen_host = _listen_host(args.destination, upstream)
    return _Forward(
        line=line,
        listen=Address(listen_host, port),
        upstream=upstream,
        sources=_sources(args.source),
        comment=args.comment,
        interface=args.in_interface,
    )


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise _Skip(f"{what} {text!r} is not a port number (1-65535)")
    return int(text)


def _upstream(value: str, dport: int) -> Address:
    """``--to-destination ADDR[:PORT]``; without a port the kernel keeps --dport."""
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1 :] if end >= 0 else ""
        if end < 0 or (rest and not rest.startswith(":")):
            raise _Skip(f"--to-destination {value}: expected [IPv6]:PORT")
        host, port_text = value[1:end], rest[1:]
    elif value.count(":") > 1:
        host, port_text = value, ""  # a bare IPv6 address, no port
    else:
        host, _, port_text = value.partition(":")
    if not host:
        raise _Skip(f"--to-destination {value} keeps the packet's address: a redirect to a "
                    "port on this host, not to a cache node")
    if "-" in host:
        raise _Skip(f"address range --to-destination {value}: spreads connections over "
                    "several nodes; a listener has one upstream")
    if "-" in port_text:
        raise _Skip(f"port range --to-destination {value}: a listener has one upstream port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _Skip(f"--to-destination {value}: {host!r} is not an IP address") from None
    port = _port(port_text, "--to-destination port") if port_text else dport
    return Address(str(ip), port)


def _listen_host(destination: str | None, upstream: Address) -> str:
    """``-d ADDRESS`` becomes the listen address; without it, every address of the family."""
    if destination is None:
        return "::" if upstream.is_ipv6 else "0.0.0.0"
    try:
        network = ipaddress.ip_network(destination, strict=False)
    except ValueError:
        raise _Skip(f"-d {destination!r} is not an address") from None
    if network.prefixlen != network.max_prefixlen:
        raise _Skip(f"-d {destination} is a network: a listener binds one address; use -d "
                    "with a single address of this host, or none")
    return str(network.network_address)


def _sources(value: str | None) -> tuple[str, ...] | None:
    """``-s A[,B...]`` as normalised CIDRs; None means every source."""
    if value is None:
        return None
    cidrs: list[str] = []
    for part in value.split(","):
        try:
            network = ipaddress.ip_network(part.strip(), strict=False)
        except ValueError:
            raise _Skip(f"-s {part!r} is not an address or CIDR") from None
        if network.prefixlen == 0:
            return None
        if str(network) not in cidrs:
            cidrs.append(str(network))
    return tuple(cidrs)


@dataclass
class _Builder:
    first: _Forward
    sources: tuple[str, ...] | None
    lines: list[SourceLine]
    comments: list[str]
    interfaces: list[str]


def _assemble(forwards: list[_Forward]) -> tuple[list[ImportedListener], list[Untranslated]]:
    """One listener per listen address; rules that differ only by -s merge into its allow.

    iptables uses the first rule that matches, so a later rule for a port that is
    already forwarded elsewhere never ran for the sources the first one took: it is
    reported, not merged.
    """
    builders: list[_Builder] = []
    clashes: list[Untranslated] = []
    for fwd in forwards:
        owner = next((b for b in builders if _conflicts(b.first.listen, fwd.listen)), None)
        if owner is None:
            builders.append(_Builder(fwd, fwd.sources, [fwd.line],
                                     [fwd.comment] if fwd.comment else [],
                                     [fwd.interface] if fwd.interface else []))
            continue
        first = owner.first
        if first.listen != fwd.listen or first.upstream != fwd.upstream:
            clashes.append(Untranslated(
                fwd.line,
                f"port {fwd.listen.port} is already forwarded to {first.upstream} by line "
                f"{first.line.number} (listen {first.listen}); iptables uses the first rule "
                "that matches, and a listener has one upstream",
            ))
            continue
        if owner.sources is None or (
            fwd.sources is not None and set(fwd.sources) <= set(owner.sources)
        ):
            earlier = ", ".join(str(ln.number) for ln in owner.lines)
            clashes.append(Untranslated(
                fwd.line, f"duplicate: line {earlier} already forwards port {fwd.listen.port} "
                f"to {first.upstream} for these sources", needed=False))
            continue
        merged = None if fwd.sources is None else (
            owner.sources + tuple(s for s in fwd.sources if s not in owner.sources))
        owner.sources = merged
        owner.lines.append(fwd.line)
        if fwd.comment and fwd.comment not in owner.comments:
            owner.comments.append(fwd.comment)
        if fwd.interface and fwd.interface not in owner.interfaces:
            owner.interfaces.append(fwd.interface)
    listeners = [
        ImportedListener(
            name="",
            listen=b.first.listen,
            upstream=b.first.upstream,
            protocol=GUESSED_PROTOCOLS.get(b.first.upstream.port, "tcp"),
            allow=b.sources,
            lines=tuple(b.lines),
            comments=tuple(b.comments),
            interfaces=tuple(b.interfaces),
        )
        for b in builders
    ]
    return _named(listeners), clashes


def _named(listeners: list[ImportedListener]) -> list[ImportedListener]:
    """``memcached-11212``; with the listen address too where two share a port."""
    bases = [f"{lc.protocol}-{lc.listen.port}" for lc in listeners]
    named = []
    for base, lc in zip(bases, listeners, strict=True):
        name = base
        if bases.count(base) > 1:
            host = lc.listen.host
            tag = ("any6" if lc.listen.is_ipv6 else "any") if lc.listen.is_wildcard else host
            name = f"{base}-{tag.replace(':', '-')}"
        named.append(dataclasses.replace(lc, name=name))
    return named


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
            f"# The rules matched only packets arriving on {', '.join(interfaces)} (-i).",
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


def _oneline(text: str) -> str:
    """Text safe inside a one-line YAML comment."""
    return " ".join(text.split())


def _scalar(text: str) -> str:
    """A plain YAML scalar where YAML reads it back as the same string, else double-quoted."""
    try:
        plain = yaml.safe_load(f"k: {text}") == {"k": text}
    except yaml.YAMLError:
        plain = False
    if plain:
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
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


# ---------------------------------------------------------------------------
# Command line


class InputError(Exception):
    """The rules could not be read; the message names the input."""


def read_input(name: str) -> tuple[str, str]:
    """Read ``name`` (``-`` is standard input) as UTF-8; returns (text, display name)."""
    label = "standard input" if name == "-" else name
    try:
        if name == "-":
            if sys.stdin.isatty():
                print("cacheport: reading iptables rules from the terminal; end with Ctrl-D",
                      file=sys.stderr)
            data = sys.stdin.buffer.read()
        else:
            data = Path(name).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{label}: is a directory, expected a file of iptables rules") from None
    except OSError as exc:
        raise InputError(f"{label}: cannot read: {exc.strerror}") from None
    try:
        return data.decode("utf-8"), label
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected the "
            "output of iptables-save or iptables -t nat -S") from None


def cmd_import(args: argparse.Namespace) -> int:
    """``cacheport import-iptables``: rules in, port map out, every leftover reported."""
    try:
        text, label = read_input(args.file)
    except InputError as exc:
        print(f"cacheport: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    listeners, untranslated = parse_rules(text)
    for item in untranslated:
        kind = "warning: skipped" if item.needed else "note: not needed"
        print(f"cacheport: {kind}: {label}:{item.line.number}: {item.reason}\n"
              f"    {item.line.text}", file=sys.stderr)
    if not listeners:
        found = f"{len(untranslated)} line(s) skipped" if untranslated else "no rules found"
        print(f"cacheport: {label}: no DNAT port forward could be translated ({found}); "
              "nothing written", file=sys.stderr)
        return EXIT_CONFIG
    document = render_yaml(listeners, untranslated, source=label)
    target = args.output or "<output>"
    try:
        parse_config(load_yaml(document, target), target)
    except ConfigError as exc:
        print(f"cacheport: the translated port map is not valid: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.output:
        try:
            Path(args.output).write_text(document, encoding="utf-8")
        except OSError as exc:
            print(f"cacheport: {args.output}: cannot write: {exc.strerror}", file=sys.stderr)
            return EXIT_CONFIG
    else:
        sys.stdout.write(document)
    skipped = sum(1 for u in untranslated if u.needed)
    print(f"cacheport: {_count(len(listeners), 'listener')} from "
          f"{_count(sum(len(lc.lines) for lc in listeners), 'DNAT rule')}"
          f"{f' written to {args.output}' if args.output else ''}; {skipped} line(s) skipped, "
          f"{len(untranslated) - skipped} not needed", file=sys.stderr)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """``cacheport export-iptables``: the port map as DNAT rules."""
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"cacheport: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    text, warnings = render_iptables(config)
    sys.stdout.write(text)
    for warning in warnings:
        print(f"cacheport: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``import-iptables`` and ``export-iptables`` to the ``cacheport`` command."""
    imp = sub.add_parser(
        "import-iptables",
        help="translate iptables DNAT rules into a port map",
        description="Read iptables-save or `iptables -t nat -S` output, or the "
        "`iptables -t nat -A PREROUTING ... -j DNAT` commands themselves, and write the "
        "equivalent port map. Lines it cannot translate are listed as comments in the map "
        "and as warnings. Exit status 0 when at least one rule was translated, 2 when none "
        "was or the input cannot be read.",
    )
    imp.add_argument("file", nargs="?", default="-", metavar="FILE|-",
                     help="the rules (default: standard input)")
    imp.add_argument("-o", "--output", metavar="FILE",
                     help="write the port map to FILE instead of standard output")
    imp.set_defaults(func=cmd_import)
    exp = sub.add_parser(
        "export-iptables",
        help="print the iptables DNAT rules equivalent to a port map",
        description="Print one `iptables -t nat -A PREROUTING ... -j DNAT` rule per listener "
        "(one per allow entry), for comparison or as a fallback.",
    )
    exp.add_argument("file", metavar="FILE", help="YAML port map")
    exp.set_defaults(func=cmd_export)
