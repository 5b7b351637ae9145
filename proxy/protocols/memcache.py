"""Memcached text protocol framing and ElastiCache auto-discovery rewriting (sans-IO).

::

    client --feed_request--> AutoDiscoveryRewriter --(bytes unchanged)--> configuration node
    client <--feed_reply---  AutoDiscoveryRewriter <---------------------- configuration node
                             |  CONFIG cluster 0 <n> / VALUE AmazonElastiCache:cluster 0 <n>
                             |    <version>\\n<host|ip|port ...>\\n   -> announced entries,
                             |                                          <n> recomputed
                             +- everything else: byte for byte

The auto-discovery reply (``config get cluster``, or ``get AmazonElastiCache:cluster`` on
engines before 1.4.14) is::

    CONFIG cluster 0 136\\r\\n
    12\\n
    host1|10.82.235.120|11211 host2|10.80.249.27|11211\\n
    \\r\\n
    END\\r\\n

where 136 counts the version line and the node line, each with its LF, and the CRLF after
them ends the data block as for any memcached value.

Replies are framed line by line, and a data block (after ``VALUE``, ``VA`` and ``CONFIG``
lines) is skipped by its byte count, so a stored value that contains such text is never
mistaken for one. Only a ``CONFIG cluster`` or ``VALUE AmazonElastiCache:cluster`` block
is held until complete; other blocks are forwarded as they arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

Bytes = bytes | bytearray

AD_KEY: Final = b"AmazonElastiCache:cluster"
"""The key old engines (< 1.4.14) serve the cluster configuration under."""
MAX_LINE: Final = 1 << 20
"""Longest command or reply line accepted (1 MiB)."""

_STORAGE: Final = frozenset((b"set", b"add", b"replace", b"append", b"prepend", b"cas"))
_META: Final = frozenset((b"mg", b"ms", b"md", b"ma", b"mn", b"me"))
_BINARY_REQUEST: Final = 0x80
_BINARY_RESPONSE: Final = 0x81


# A block length past 10 digits is no length memcached would send or read (it takes an
# int); and int() of 4,301 digits raises ValueError, not McProtocolError.
_MAX_DIGITS: Final = 10


class McProtocolError(ValueError):
    """Bytes that are not the memcached text protocol (or are the binary one)."""


class AutoDiscoveryError(ValueError):
    """An auto-discovery reply or data block that does not have the ElastiCache format."""


# --------------------------------------------------------------------------- the format


@dataclass(frozen=True, slots=True)
class AutoDiscoveryNode:
    """One ``hostname|ip|port`` entry; ``ip`` is "" when ElastiCache omits it."""

    hostname: str
    ip: str
    port: int

    def entry(self) -> bytes:
        return f"{self.hostname}|{self.ip}|{self.port}".encode()


@dataclass(frozen=True, slots=True)
class AutoDiscoveryConfig:
    """The cluster configuration: its version (bumped on every node change) and nodes."""

    version: int
    nodes: tuple[AutoDiscoveryNode, ...]


def parse_config_block(block: Bytes) -> AutoDiscoveryConfig:
    """Parse the data block: ``<version>\\n<entry> <entry> ...\\n``."""
    lines = bytes(block).split(b"\n")
    if len(lines) != 3 or lines[2] != b"":
        raise AutoDiscoveryError(
            f"expected a version line and a node line, each ended by LF: {bytes(block[:80])!r}")
    version_s = lines[0].rstrip(b"\r")
    # Bounded digit counts: int() of 4,301 digits raises ValueError, not ours.
    if not version_s.isdigit() or len(version_s) > 20:
        raise AutoDiscoveryError(f"config version {version_s[:20]!r} is not a number")
    nodes = []
    for entry in lines[1].rstrip(b"\r").split(b" "):
        if not entry:
            continue
        parts = entry.split(b"|")
        if len(parts) != 3 or not parts[2].isdigit() or not parts[0] \
                or len(parts[2]) > 5 or int(parts[2]) > 65535:
            raise AutoDiscoveryError(f"node entry {entry[:80]!r} is not hostname|ip|port")
        try:  # names and addresses are ASCII; anything else would fail later, less clearly
            host, ip = parts[0].decode("ascii"), parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise AutoDiscoveryError(f"node entry {entry[:80]!r} is not ASCII") from None
        nodes.append(AutoDiscoveryNode(host, ip, int(parts[2])))
    return AutoDiscoveryConfig(int(version_s), tuple(nodes))


def format_config_block(config: AutoDiscoveryConfig) -> bytes:
    return b"%d\n%s\n" % (config.version, b" ".join(n.entry() for n in config.nodes))


def format_config_reply(config: AutoDiscoveryConfig,
                        form: Literal["config", "get"] = "config", flags: int = 0) -> bytes:
    """The whole reply, as to ``config get cluster`` or to ``get AmazonElastiCache:cluster``."""
    block = format_config_block(config)
    head = b"CONFIG cluster" if form == "config" else b"VALUE " + AD_KEY
    return b"%s %d %d\r\n%s\r\nEND\r\n" % (head, flags, len(block), block)


def parse_config_reply(raw: Bytes) -> AutoDiscoveryConfig:
    """Parse a whole reply (either form, up to and including ``END``)."""
    nl = raw.find(b"\r\n")
    if nl < 0:
        raise AutoDiscoveryError("reply has no header line")
    header = bytes(raw[:nl])
    tokens = header.split()
    if header.startswith((b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")) or header == b"END":
        raise AutoDiscoveryError(f"no cluster configuration: {header[:80]!r}")
    if len(tokens) < 4 or not (
        (tokens[0] == b"CONFIG" and tokens[1] == b"cluster")
        or (tokens[0] == b"VALUE" and tokens[1] == AD_KEY)
    ) or not tokens[3].isdigit() or len(tokens[3]) > 20:
        raise AutoDiscoveryError(f"unexpected header {header[:80]!r}")
    size = int(tokens[3])
    start = nl + 2
    if raw[start + size : start + size + 2] != b"\r\n":
        raise AutoDiscoveryError(f"data block is not {size} bytes followed by CRLF")
    if raw[start + size + 2 :] != b"END\r\n":
        raise AutoDiscoveryError("reply does not end with END")
    return parse_config_block(raw[start : start + size])


# --------------------------------------------------------------------------- framing


@dataclass(frozen=True, slots=True)
class McRequest:
    """One command: its first word, the other words of its line, and its data block.

    ``data_len`` is -1 for commands without a block. ``noreply`` is set for a classic
    ``noreply`` or a meta ``q`` flag (the server may then send nothing). ``start``/``end``
    are stream offsets of the whole command, block included.
    """

    command: bytes
    args: tuple[bytes, ...]
    data_len: int
    noreply: bool
    start: int
    end: int

    @property
    def keys(self) -> tuple[bytes, ...]:
        """The keys a retrieval command (get/gets/gat/gats) asks for."""
        if self.command in (b"get", b"gets"):
            return self.args
        if self.command in (b"gat", b"gats"):
            return self.args[1:]
        return self.args[:1]


@dataclass(frozen=True, slots=True)
class McReply:
    """One reply unit: a line, plus the data block a VALUE / VA / CONFIG line announces.

    A multi-key get reply is several units (each VALUE, then END).
    """

    line: bytes
    data_len: int
    start: int
    end: int


def _words(line: Bytes) -> list[bytes]:
    """Memcached splits on single spaces and ignores empty tokens."""
    return [w for w in bytes(line).split(b" ") if w]


def _request_data_len(words: list[bytes]) -> int:
    cmd = words[0]
    if cmd in _STORAGE:
        idx = 4
    elif cmd == b"ms":
        idx = 2
    else:
        return -1
    # memcached reads a block only after a valid length; otherwise it answers
    # CLIENT_ERROR and reads the next line as a command (proto_text.c).
    if len(words) > idx and words[idx].isdigit() and len(words[idx]) <= _MAX_DIGITS:
        return int(words[idx])
    return -1


def _reply_data_len(line: Bytes) -> int:
    """The block length after a VALUE / VA / CONFIG line, -1 for other lines."""
    c = line[0]
    if c == 0x56:  # V
        if line.startswith(b"VALUE "):
            idx = 3
        elif line.startswith(b"VA "):
            idx = 1
        else:
            return -1
    elif c == 0x43 and line.startswith(b"CONFIG "):
        idx = 3
    else:
        return -1
    words = _words(line.rstrip(b"\r\n"))
    if len(words) <= idx or not words[idx].isdigit() or len(words[idx]) > _MAX_DIGITS:
        raise McProtocolError(f"bad length in reply line {bytes(line[:80])!r}")
    return int(words[idx])


class _LineFramer:
    """Shared state for line + optional data block framing."""

    __slots__ = ("_block", "_line", "_start", "_unit", "position")

    def __init__(self) -> None:
        self._line = bytearray()  # a line cut by the end of a chunk
        self._block = 0  # data block bytes (with CRLF) still to skip
        self._unit: tuple[bytes, int] | None = None  # the line whose block is being skipped
        self._start = 0  # stream offset where the unit in progress began
        self.position = 0  # total bytes fed

    def _units(self, data: Bytes, data_len: Callable[[bytes], int]
               ) -> list[tuple[bytes, int, int, int]]:
        """(line, data_len, start, end) of every unit completed in ``data``."""
        out: list[tuple[bytes, int, int, int]] = []
        n = len(data)
        base = self.position
        pos = 0
        pending = self._unit
        if base == 0 and n and data[0] in (_BINARY_REQUEST, _BINARY_RESPONSE):
            raise McProtocolError("binary protocol, not the text protocol")
        while True:
            if self._block:
                take = min(self._block, n - pos)
                self._block -= take
                pos += take
                if self._block:
                    break
                assert pending is not None
                out.append((pending[0], pending[1], self._start, base + pos))
                self._start = base + pos
                pending = None
                continue
            if pos >= n:
                break
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line += data[pos:]
                if len(self._line) > MAX_LINE:
                    raise McProtocolError(f"line longer than {MAX_LINE} bytes")
                break
            if self._line:
                self._line += data[pos : nl + 1]
                line = bytes(self._line)
                self._line.clear()
            else:
                line = bytes(data[pos : nl + 1])
            pos = nl + 1
            text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            size = data_len(line)
            if size >= 0:
                pending = (text, size)
                self._block = size + 2
                continue
            out.append((text, -1, self._start, base + pos))
            self._start = base + pos
        self._unit = pending
        self.position = base + n
        return out


class RequestFramer(_LineFramer):
    """Splits a client's text-protocol stream into commands (storage blocks skipped)."""

    __slots__ = ()

    def feed(self, data: Bytes) -> list[McRequest]:
        out = []
        for line, size, start, end in self._units(data, self._size):
            words = _words(line)
            if not words:
                continue  # an empty line: memcached answers ERROR, no command
            cmd = words[0]
            if cmd in _META:
                noreply = b"q" in words[2:]
            else:
                noreply = words[-1] == b"noreply" and len(words) > 1
            out.append(McRequest(cmd, tuple(words[1:]), size, noreply, start, end))
        return out

    @staticmethod
    def _size(line: bytes) -> int:
        words = _words(line.rstrip(b"\r\n"))
        return _request_data_len(words) if words else -1


class ReplyFramer(_LineFramer):
    """Splits a server's text-protocol stream into reply units (value blocks skipped)."""

    __slots__ = ()

    def feed(self, data: Bytes) -> list[McReply]:
        return [McReply(line, size, start, end)
                for line, size, start, end in self._units(data, _reply_data_len)]


# --------------------------------------------------------------------------- the rewriter

NodeMapper = Callable[[AutoDiscoveryNode], "AutoDiscoveryNode | None"]
"""Internal node entry -> the entry clients should see (announce|announce-ip|mapped-port),
or None for a node that has no port yet."""


def announce_mapper(announce: str, announce_ip: str,
                    port_for: Callable[[AutoDiscoveryNode], int | None]) -> NodeMapper:
    """The usual mapper: every node becomes ``announce|announce_ip|<its port>``."""
    def mapper(node: AutoDiscoveryNode) -> AutoDiscoveryNode | None:
        port = port_for(node)
        return None if port is None else AutoDiscoveryNode(announce, announce_ip, port)
    return mapper


def rewrite_config_block(block: Bytes, mapper: NodeMapper,
                         on_unmapped: Callable[[AutoDiscoveryNode], None] | None = None
                         ) -> bytes:
    """Map every entry of a data block, keeping the version (raises AutoDiscoveryError)."""
    config = parse_config_block(block)
    nodes = []
    for node in config.nodes:
        mapped = mapper(node)
        if mapped is None:
            if on_unmapped is not None:
                on_unmapped(node)
            mapped = node
        nodes.append(mapped)
    return format_config_block(AutoDiscoveryConfig(config.version, tuple(nodes)))


class AutoDiscoveryRewriter:
    """Rewrites the auto-discovery reply on one client connection; passes the rest.

    Same shape as ``ClusterRewriter``: feed every client chunk to ``feed_request`` (returned
    unchanged) and every server chunk to ``feed_reply``; forward what they return.
    ``feed_reply`` returns ``data`` itself when nothing in it changed, and holds back only
    an incomplete reply line or an incomplete auto-discovery block. A ``CONFIG cluster``
    block is only ever a reply to ``config get cluster``, and a ``VALUE
    AmazonElastiCache:cluster`` block only to a get of that key, so the reply framing alone
    decides what to rewrite. A binary-protocol connection is passed through untouched.
    ``feed_reply`` raises ``McProtocolError`` if the server's bytes cannot be framed.
    """

    __slots__ = (
        "_block", "_hold", "_need", "_opaque", "_started", "malformed", "mapper",
        "on_unmapped", "rewritten",
    )

    def __init__(self, mapper: NodeMapper,
                 on_unmapped: Callable[[AutoDiscoveryNode], None] | None = None) -> None:
        self.mapper = mapper
        self.on_unmapped = on_unmapped
        self._hold: bytearray | None = None  # an incomplete line or AD unit, not yet sent
        self._need = -1  # bytes still missing from a held AD unit (-1: holding a line)
        self._block = 0  # bytes of a data block being passed through
        self._opaque = False
        self._started = False
        self.rewritten = 0
        self.malformed = 0  # AD blocks passed unchanged because they did not parse

    @property
    def opaque(self) -> bool:
        """True for a binary-protocol connection (never rewritten)."""
        return self._opaque

    def feed_request(self, data: Bytes) -> Bytes:
        if not self._started and data:
            self._started = True
            if data[0] == _BINARY_REQUEST:
                self._opaque = True
        return data

    def feed_reply(self, data: Bytes) -> Bytes:
        if self._opaque or not data:
            return data
        if not self._started and self._hold is None and data[0] == _BINARY_RESPONSE:
            # A binary reply before any request; not when bytes are held, which would be lost.
            self._opaque = True
            return data
        n = len(data)
        pos = emit = 0
        out: list[Bytes] | None = None
        hold = self._hold
        if hold is not None:
            out = []
            emit = n  # nothing of this chunk goes out unless said below
            if self._need < 0:
                nl = data.find(b"\n")
                if nl < 0:
                    hold += data
                    if len(hold) > MAX_LINE:
                        raise McProtocolError(f"line longer than {MAX_LINE} bytes")
                    return b""
                hold += data[: nl + 1]
                pos = nl + 1
                size = _reply_data_len(hold)
                if size >= 0 and _is_ad_header(hold):
                    self._need = size + 2
                else:
                    out.append(bytes(hold))
                    self._hold = hold = None
                    emit = pos
                    if size >= 0:
                        self._block = size + 2
            if hold is not None:
                take = min(self._need, n - pos)
                hold += data[pos : pos + take]
                pos += take
                self._need -= take
                if self._need:
                    return b"".join(out)
                out.append(self._rewrite_unit(bytes(hold)))
                self._hold = None
                emit = pos
        while True:
            if self._block:
                take = min(self._block, n - pos)
                self._block -= take
                pos += take
                if self._block:
                    break
            if pos >= n:
                break
            nl = data.find(b"\n", pos)
            if nl < 0:
                if out is None:
                    out = []
                out.append(data[emit:pos])
                self._hold = bytearray(data[pos:])
                self._need = -1
                emit = n
                break
            c = data[pos]
            if c != 0x56 and c != 0x43:  # neither V(ALUE/A) nor C(ONFIG): a plain line
                pos = nl + 1
                continue
            line = data[pos : nl + 1]
            size = _reply_data_len(line)
            if size < 0:
                pos = nl + 1
                continue
            if not _is_ad_header(line):
                pos = nl + 1
                self._block = size + 2
                continue
            end = nl + 1 + size + 2
            if out is None:
                out = []
            out.append(data[emit:pos])
            if end > n:
                self._hold = bytearray(data[pos:])
                self._need = end - n
                emit = n
                break
            out.append(self._rewrite_unit(bytes(data[pos:end])))
            pos = emit = end
        if out is None:
            return data
        if emit < n:
            out.append(data[emit:])
        return b"".join(out)

    def _rewrite_unit(self, raw: bytes) -> bytes:
        """A whole ``CONFIG cluster``/``VALUE AmazonElastiCache:cluster`` line + block."""
        nl = raw.index(b"\n") + 1
        header, block = raw[:nl], raw[nl:-2]
        if raw[-2:] != b"\r\n":
            raise McProtocolError("auto-discovery data block not followed by CRLF")
        try:
            new_block = rewrite_config_block(block, self.mapper, self.on_unmapped)
        except AutoDiscoveryError:
            self.malformed += 1
            return raw
        words = _words(header.rstrip(b"\r\n"))
        words[3] = b"%d" % len(new_block)
        self.rewritten += 1
        return b" ".join(words) + b"\r\n" + new_block + b"\r\n"


def _is_ad_header(line: Bytes) -> bool:
    words = _words(line.rstrip(b"\r\n"))
    return len(words) >= 4 and (
        (words[0] == b"CONFIG" and words[1] == b"cluster")
        or (words[0] == b"VALUE" and words[1] == AD_KEY)
    )
