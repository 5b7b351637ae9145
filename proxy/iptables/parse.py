"""iptables text -> listeners (pure): ``iptables-save``, ``iptables -t nat -S`` or the
``sudo iptables -t nat -A PREROUTING ... -j DNAT`` commands themselves.

Only a nat-table PREROUTING DNAT rule for one TCP port to one address is a port forward that
a listener can take over; every other line comes back as an ``Untranslated`` with its reason.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..config import Address, Protocol, _conflicts
from .model import ImportedListener, SourceLine, Untranslated

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
