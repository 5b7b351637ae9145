"""Rewrite node addresses in Redis Cluster replies to the NAT host's announced ports.

::

    client --feed_request--> ClusterRewriter --(bytes unchanged)--> upstream node
    client <--feed_reply---  ClusterRewriter <--------------------- upstream node
                             |  -MOVED/-ASK slot host:port       -> announce:mapped-port
                             |  CLUSTER SLOTS / SHARDS / NODES /
                             |  REPLICAS node endpoints          -> announce, mapped ports
                             +- everything else: byte for byte, usually the very same object

Replies are framed (``resp.Scanner``) and matched to the commands that caused them
(``resp.Conversation``), never found by searching the byte stream, so a stored value that
contains ``-MOVED`` comes back unchanged. Only frames that may need rewriting (errors,
replies to CLUSTER, pub/sub and MULTI bookkeeping) are held until complete; everything else
is forwarded as it arrives, however large.

The mapper turns an internal ``(host, port)`` (what the node calls itself or a peer) into
the ``(host, port)`` clients must use. A node that does not know its own address (a lone
node without ``cluster-announce-ip``) lists itself with an empty endpoint, and some
settings give NULL or ``?``: such an entry is mapped by its node id (``by_id``), never left
with the node's own port, which a client would otherwise dial directly, around the proxy.
The mapper returns None for a node it does not know yet; the rewriter then reports it
(``on_unmapped``, ``unmapped``) so the caller can refresh its topology, and leaves that
endpoint as it was (or answers a redirect with ``-TRYAGAIN`` if asked to, so the client
retries instead of dialling an unreachable address).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

from ..resp import (
    ATTRIBUTE,
    BULK_ERROR,
    CAPTURE_FOR,
    ERROR,
    PLAIN,
    PUSH,
    Bytes,
    Conversation,
    Frame,
    RequestError,
    RequestParser,
    Scanner,
    bulk,
    encode,
    integer,
    parse_one,
)
from .fields import _b, _fields, _port, _s, _str, blank

Mapper = Callable[[str, int], "tuple[str, int] | None"]
"""Internal (host, port) -> announced (host, port), or None if that node is not mapped yet."""
IdMapper = Callable[[str], "tuple[str, int] | None"]
"""Node id -> announced (host, port) of that node, or None if it is not mapped yet."""

class Remapper:
    """Looks endpoints up in the mapper and remembers the ones it could not map.

    ``upstream`` is the internal address of the node this connection goes to: an empty host
    in a redirect (``-MOVED 3999 :6380``) or a NULL endpoint in CLUSTER SLOTS means "the
    host you are connected to", i.e. this one. ``by_id`` maps a node id to its announced
    address: an entry with a blank endpoint names its node only by id.
    """

    __slots__ = ("by_id", "mapper", "on_unmapped", "unmapped", "upstream")

    def __init__(self, mapper: Mapper, upstream: tuple[str, int],
                 on_unmapped: Callable[[str, int], None] | None = None,
                 by_id: IdMapper | None = None) -> None:
        self.mapper = mapper
        self.upstream = upstream
        self.on_unmapped = on_unmapped
        self.by_id = by_id
        self.unmapped: set[tuple[str, int]] = set()

    def lookup(self, candidates: Iterable[str | None], port: int) -> tuple[str, int] | None:
        """Map the first candidate host (with ``port``) the mapper knows."""
        first: str | None = None
        for host in candidates:
            if not host or host == "?":
                continue
            if first is None:
                first = host
            mapped = self.mapper(host, port)
            if mapped is not None:
                return mapped
        if first is not None:
            self.unmapped.add((first, port))
            if self.on_unmapped is not None:
                self.on_unmapped(first, port)
        return None

    def lookup_blank(self, node_id: str | None, candidates: Iterable[str | None], port: int,
                     ) -> tuple[str, int] | None:
        """Map an entry whose endpoint is blank: by its node id first, which is exact.

        Then by the other hosts the entry gives (ip, hostname). An entry that names no host
        at all is the node this connection reached: a node learns each peer's address from
        the peer's own connection, so only its own can be unknown (and "the host you
        asked" is how a direct client reads an empty or NULL endpoint).
        """
        if node_id and self.by_id is not None:
            mapped = self.by_id(node_id)
            if mapped is not None:
                return mapped
        hosts = [h for h in candidates if not blank(h)]
        return self.lookup(hosts or [self.upstream[0]], port)


# --------------------------------------------------------------------------- redirects


@dataclass(frozen=True, slots=True)
class Redirect:
    """A parsed ``-MOVED`` or ``-ASK`` error; ``host`` is "" for the ``:port`` form."""

    kind: str  # "MOVED" or "ASK"
    slot: int
    host: str
    port: int


def parse_redirect(raw: Bytes) -> Redirect | None:
    """Parse a whole error frame (``-MOVED 3999 10.0.1.5:6379\\r\\n``); None if not a redirect."""
    if not (raw.startswith(b"-MOVED ") or raw.startswith(b"-ASK ")) or raw[-2:] != b"\r\n":
        return None
    parts = bytes(raw[1:-2]).split(b" ")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    host, colon, port = parts[2].rpartition(b":")
    if not colon or not port.isdigit():
        return None
    return Redirect(_s(parts[0]), int(parts[1]), _s(host), int(port))


def rewrite_redirect(raw: Bytes, remap: Remapper, tryagain: bool = False) -> bytes | None:
    """The redirect with the announced endpoint in place; None if not a redirect or unmapped.

    With ``tryagain`` an unmapped target becomes ``-TRYAGAIN`` (clients retry it shortly)
    instead of being left as an address the client cannot reach.
    """
    r = parse_redirect(raw)
    if r is None:
        return None
    mapped = remap.lookup([r.host or remap.upstream[0]], r.port)
    if mapped is None:
        if tryagain:
            return b"-TRYAGAIN cacheport has no port for that node yet, retry\r\n"
        return None
    return b"-%s %d %s:%d\r\n" % (_b(r.kind), r.slot, _b(mapped[0]), mapped[1])


# --------------------------------------------------------------------------- node lists

def _set_host(f: Frame, host: str) -> None:
    if f.kind not in "$+=" or f.value is None:
        f.kind = "$"
    f.value = (b"txt:" if f.kind == "=" else b"") + _b(host)


def rewrite_slots(frame: Frame, remap: Remapper) -> bool:
    """Rewrite a CLUSTER SLOTS reply in place; True if anything changed.

    Each node is ``[endpoint, port, id, {ip, hostname}]``; a NULL endpoint means "the host
    you asked", and the metadata map (7.0+) is a flat array in RESP2. A blank endpoint
    (NULL, empty or ``?``) is mapped by the node id.
    """
    changed = False
    for rng in frame.items:
        for node in rng.items[2:]:
            f = node.items
            port = _port(f[1]) if len(f) > 1 else None
            if not port:
                continue
            meta = _fields(f[3]) if len(f) > 3 else {}
            endpoint = _str(f[0])
            others = [_str(meta.get(b"ip")), _str(meta.get(b"hostname"))]
            if blank(endpoint):
                node_id = _str(f[2]) if len(f) > 2 else None
                mapped = remap.lookup_blank(node_id, others, port)
            else:
                mapped = remap.lookup([endpoint, *others], port)
            if mapped is None:
                continue
            host, new_port = mapped
            if f[0].value is None:
                f[0] = bulk(host)
            else:
                _set_host(f[0], host)
            f[1] = integer(new_port)
            for key in (b"ip", b"hostname"):
                if key in meta:
                    _set_host(meta[key], host)
            changed = True
    return changed


def _rewrite_shard_node(node: Frame, remap: Remapper) -> bool:
    f = _fields(node)
    endpoint = _str(f.get(b"endpoint"))
    others = [_str(f.get(b"ip")), _str(f.get(b"hostname"))]
    port, tls_port = _port(f.get(b"port")), _port(f.get(b"tls-port"))

    def lookup(p: int) -> tuple[str, int] | None:
        if blank(endpoint):
            return remap.lookup_blank(_str(f.get(b"id")), others, p)
        return remap.lookup([endpoint, *others], p)

    mapped = lookup(port) if port else None
    mapped_tls = lookup(tls_port) if tls_port else None
    if mapped is None and mapped_tls is None:
        return False
    host = (mapped or mapped_tls or ("", 0))[0]
    for key in (b"endpoint", b"ip", b"hostname"):
        if key in f:
            _set_host(f[key], host)
    if mapped is not None:
        f[b"port"].value = b"%d" % mapped[1]
    if mapped_tls is not None:
        f[b"tls-port"].value = b"%d" % mapped_tls[1]
    return True


def rewrite_shards(frame: Frame, remap: Remapper) -> bool:
    """Rewrite a CLUSTER SHARDS reply in place (endpoint, ip, hostname, port, tls-port)."""
    changed = False
    for shard in frame.items:
        nodes = _fields(shard).get(b"nodes")
        for node in nodes.items if nodes is not None else ():
            changed |= _rewrite_shard_node(node, remap)
    return changed


def rewrite_node_line(line: bytes, remap: Remapper) -> bytes:
    """Rewrite one CLUSTER NODES line: ``<id> <ip:port@cport[,hostname]> ...``.

    The bus port is left alone (clients never use it); aux fields a newer server may add
    after the hostname are kept, with a ``tls-port=`` one mapped too. An empty ip (a node
    that does not know its own address, so the one this connection reached) is mapped by
    the node id in the first column.
    """
    fields = line.split(b" ")
    if len(fields) < 2:
        return line
    hostport, at, rest = fields[1].partition(b"@")
    ip, colon, port_s = hostport.rpartition(b":")
    if not colon or not port_s.isdigit() or int(port_s) == 0:
        return line
    extras = rest.split(b",") if at else []
    hostname = extras[1] if len(extras) > 1 and b"=" not in extras[1] else b""
    hosts = [_s(ip), _s(hostname)]

    def lookup(port: int) -> tuple[str, int] | None:
        if not ip:
            return remap.lookup_blank(_s(fields[0]), hosts, port)
        return remap.lookup(hosts, port)

    mapped = lookup(int(port_s))
    if mapped is None:
        return line
    host = _b(mapped[0])
    for i, extra in enumerate(extras[1:], start=1):
        if i == 1 and extra == hostname and hostname:
            extras[i] = host
        elif extra.startswith(b"tls-port="):
            tls = extra[9:]
            if tls.isdigit() and int(tls):
                tmapped = lookup(int(tls))
                if tmapped is not None:
                    extras[i] = b"tls-port=%d" % tmapped[1]
    fields[1] = b"%s:%d" % (host, mapped[1]) + ((b"@" + b",".join(extras)) if at else b"")
    return b" ".join(fields)


def rewrite_nodes_text(text: bytes, remap: Remapper) -> bytes:
    """Rewrite every line of CLUSTER NODES output (line endings kept)."""
    return b"\n".join(rewrite_node_line(line, remap) if line else line
                      for line in text.split(b"\n"))


def rewrite_nodes(frame: Frame, remap: Remapper) -> bool:
    """Rewrite a CLUSTER NODES reply (a bulk string, or RESP3 verbatim ``txt:``) in place."""
    text = frame.bytes_value
    if text is None:
        return False
    new = rewrite_nodes_text(text, remap)
    if new == text:
        return False
    assert isinstance(frame.value, bytes)
    frame.value = frame.value[: len(frame.value) - len(text)] + new
    return True


def rewrite_replicas(frame: Frame, remap: Remapper) -> bool:
    """Rewrite a CLUSTER REPLICAS / SLAVES reply: an array of CLUSTER NODES lines."""
    changed = False
    for item in frame.items:
        changed |= rewrite_nodes(item, remap)
    return changed


REWRITERS: Final[dict[bytes, Callable[[Frame, Remapper], bool]]] = {
    b"slots": rewrite_slots,
    b"shards": rewrite_shards,
    b"nodes": rewrite_nodes,
    b"replicas": rewrite_replicas,
    b"slaves": rewrite_replicas,
}
"""CLUSTER subcommand (lower case) -> in-place rewriter of its reply."""

# What the native engine's framer (proxy/relay/resp_framer.c) asks Python to rewrite.
ASK_CLUSTER: Final = 1  # the reply to CLUSTER SLOTS/SHARDS/NODES/REPLICAS; spec: its rewriter
ASK_EXEC: Final = 2  # an EXEC reply; spec: a rewriter (or 0) per result
ASK_REDIRECT: Final = 3  # a redirect the engine's node map cannot answer
_REWRITER_IDS: Final[dict[int, Callable[[Frame, Remapper], bool]]] = {
    1: rewrite_slots, 2: rewrite_shards, 3: rewrite_nodes, 4: rewrite_replicas,
}


def rewrite_asked(raw: bytes, ask: int, spec: bytes, remap: Remapper,
                  tryagain: bool = False) -> bytes | None:
    """What ``ClusterRewriter._on_frame`` makes of a whole frame the engine handed over
    (its matching done in C); None when the frame goes out unchanged."""
    if ask == ASK_REDIRECT:
        return rewrite_redirect(raw, remap, tryagain)
    frame = parse_one(raw)
    changed = False
    if ask == ASK_CLUSTER:
        changed = not frame.is_error and _REWRITER_IDS[spec[0]](frame, remap)
    else:
        for rw, result in zip(spec, frame.items, strict=True):
            if rw and not result.is_error:
                changed |= _REWRITER_IDS[rw](result, remap)
    return encode(frame) if changed else None


# --------------------------------------------------------------------------- the rewriter


class ClusterRewriter:
    """Rewrites node addresses in the replies on one client connection to a cluster node.

    Call ``feed_request`` with every chunk the client sends, before it goes upstream (a
    reply is matched to the commands already fed), and ``feed_reply`` with every chunk the
    node sends; forward what they return. ``feed_reply`` returns ``data`` itself when
    nothing in it changed and holds back only an incomplete frame that may need rewriting
    (it then returns the bytes before it). Pass ``bytes`` or ``bytearray`` chunks.

    ``feed_reply`` raises ``ProtocolError`` if the node sends something that is not RESP;
    the caller should close the connection. A client that sends malformed RESP is not an
    error here: Redis answers it with an error and closes; the rewriter stops matching
    (``request_error`` says why) and still rewrites redirects, which need no matching.
    """

    __slots__ = (
        "_conv", "_hold", "_opaque", "_parser", "_scanner", "redirects_rewritten",
        "remap", "replies_rewritten", "request_error", "tryagain",
    )

    def __init__(
        self,
        mapper: Mapper,
        upstream: tuple[str, int],
        *,
        on_unmapped: Callable[[str, int], None] | None = None,
        unmapped_redirect: Literal["keep", "tryagain"] = "keep",
        by_id: IdMapper | None = None,
    ) -> None:
        self.remap = Remapper(mapper, upstream, on_unmapped, by_id)
        self.tryagain = unmapped_redirect == "tryagain"
        self._parser = RequestParser(capture_for=CAPTURE_FOR)
        self._conv = Conversation(watched=(b"cluster",))
        self._scanner = Scanner()
        self._hold: bytearray | None = None
        self._opaque = False
        self.request_error: str | None = None
        self.redirects_rewritten = 0
        self.replies_rewritten = 0

    @property
    def unmapped(self) -> set[tuple[str, int]]:
        """Internal endpoints seen on this connection that the mapper did not know."""
        return self.remap.unmapped

    @property
    def opaque(self) -> bool:
        """True once the connection stopped being request/reply (MONITOR, SYNC, PSYNC)."""
        return self._opaque

    @property
    def conversation(self) -> Conversation:
        return self._conv

    def feed_request(self, data: Bytes) -> Bytes:
        """Note the commands in a client chunk; returns the chunk unchanged."""
        if self.request_error is None and not self._opaque:
            try:
                commands = self._parser.feed(data)
            except RequestError as exc:
                self.request_error = str(exc)
                commands = exc.commands
            request = self._conv.request
            for cmd in commands:
                request(cmd)
        return data

    def feed_reply(self, data: Bytes) -> Bytes:
        """Rewrite a chunk from the node; returns the bytes to send to the client."""
        if self._opaque:
            return data
        conv = self._conv
        pending = conv.pending
        scanner = self._scanner
        n = len(data)
        pos = emit = 0
        out: list[Bytes] | None = None
        if self._hold is not None:
            end = scanner.scan(data, 0)
            if end < 0:
                self._hold += data
                return b""
            self._hold += data[:end]
            raw = bytes(self._hold)
            self._hold = None
            new = self._on_frame(raw)
            out = [raw if new is None else new]
            pos = emit = end
        elif not scanner.idle:
            # The rest of a reply that is being passed through.
            pos = scanner.scan(data, 0)
            if pos < 0:
                return data
        while pos < n:
            t = data[pos]
            if (not conv.special and pending and pending[0][0] == PLAIN and t != ERROR
                    and t != PUSH and t != ATTRIBUTE and t != BULK_ERROR):
                pending.popleft()  # the common case: a plain reply to a plain command
            elif conv.next_is_opaque():
                self._opaque = True
                break
            elif not conv.needs_whole(t):
                conv.consume(t)
            else:
                start = pos
                end = scanner.scan(data, pos)
                if end < 0:
                    if out is None:
                        out = []
                    if start > emit:
                        out.append(data[emit:start])
                    self._hold = bytearray(data[start:])
                    emit = n
                    break
                new = self._on_frame(data[start:end])
                if new is not None:
                    if out is None:
                        out = []
                    if start > emit:
                        out.append(data[emit:start])
                    out.append(new)
                    emit = end
                pos = end
                continue
            pos = scanner.scan(data, pos)
            if pos < 0:
                break
        if out is None:
            return data
        if emit < n:
            out.append(data[emit:])
        return b"".join(out)

    def _on_frame(self, raw: Bytes) -> bytes | None:
        """A whole reply frame: match it, and return its rewritten bytes if they change."""
        reply = self._conv.reply(raw)
        if raw[0] == ERROR:
            new = rewrite_redirect(raw, self.remap, self.tryagain)
            if new is not None:
                self.redirects_rewritten += 1
            return new
        cmd = reply.command
        if cmd is None:
            return None
        frame = reply.frame
        changed = False
        if cmd.name == b"cluster" and not reply.queued:
            rewrite = REWRITERS.get(cmd.arg(0) or b"")
            if rewrite is None:
                return None
            frame = frame or parse_one(raw)
            changed = not frame.is_error and rewrite(frame, self.remap)
        elif reply.exec_commands and frame is not None:
            for c, result in zip(reply.exec_commands, frame.items, strict=True):
                rewrite = REWRITERS.get(c.arg(0) or b"") if c.name == b"cluster" else None
                if rewrite is not None and not result.is_error:
                    changed |= rewrite(result, self.remap)
        if not changed or frame is None:
            return None
        self.replies_rewritten += 1
        return encode(frame)
