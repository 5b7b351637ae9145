"""Ask a cluster which nodes it has: one short connection, one or two commands.

::

    cacheport --CLUSTER SHARDS (else CLUSTER SLOTS)----------------------> seed / a known node
    cacheport --config get cluster (else get AmazonElastiCache:cluster)--> configuration endpoint
    cacheport --ROLE (a replica: then ROLE at its master; then ROLE at each replica)--> seed

Redis: CLUSTER SHARDS (7.0+) lists every node with its role and health, including
masters without slots and failed nodes; older servers (or an ACL that denies it) get
CLUSTER SLOTS, which lists only nodes serving slots. Memcached: ``config get cluster``
(engine 1.4.14+), else ``get AmazonElastiCache:cluster``. A replication group (cluster
mode disabled): ROLE at the seed, followed to the master, whose reply lists its
connected replicas; each replica is then asked ROLE too, and one that does not answer
or whose link to the master is not ``connected`` is reported ``failed``. Parsing is the sans-IO code
in ``proxy.protocols``; this module only moves the bytes, each step under a deadline.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..config import Address, Secret, UpstreamTlsConfig
from ..protocols.memcache import AutoDiscoveryError, parse_config_reply
from ..protocols.redis_cluster import ClusterNode, TopologyError, parse_topology
from ..protocols.redis_role import Role, RoleError, parse_role
from ..protocols.resp import ProtocolError, Reader
from ..tls import client_context

MAX_REPLY = 16 << 20  # a CLUSTER SHARDS reply of 500 nodes is well under 1 MiB


class DiscoveryError(Exception):
    """No usable topology from that address; the message says why."""


@dataclass(frozen=True, slots=True)
class Node:
    """One cache node as cacheport tracks it.

    ``identity`` is what keeps its port (node id / hostname); ``address`` is where
    cacheport dials it; ``endpoints`` are every internal ``(host, port)`` the cluster may
    tell a client about it (ip, hostname, preferred endpoint; plain and TLS port).
    """

    identity: str
    address: Address
    hostname: str = ""
    role: str = "master"
    health: str = "online"
    slots: tuple[tuple[int, int], ...] = ()
    endpoints: tuple[tuple[str, int], ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Discovery:
    """The nodes one query returned, and how they were found."""

    nodes: tuple[Node, ...]
    source: str  # the command that answered
    queried: str  # the address that answered
    version: int | None = None  # Memcached config version


def _context(tls: UpstreamTlsConfig | None) -> ssl.SSLContext | None:
    return client_context(tls) if tls is not None else None


async def _open(address: Address, tls: UpstreamTlsConfig | None, server_name: str | None,
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        ctx = _context(tls)
    except (ssl.SSLError, OSError) as exc:
        raise DiscoveryError(f"cannot set up TLS: {exc}") from None
    name = None
    if ctx is not None:
        name = (tls.server_name if tls is not None and tls.server_name else None) \
            or server_name or address.host
    try:
        return await asyncio.open_connection(address.host, address.port, ssl=ctx,
                                             server_hostname=name, limit=MAX_REPLY)
    except ssl.SSLError as exc:
        raise DiscoveryError(f"TLS handshake with {address} failed: "
                             f"{exc.reason or exc}") from None
    except OSError as exc:
        raise DiscoveryError(f"cannot connect to {address}: {exc.strerror or exc}") from None


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(1):
            await writer.wait_closed()
    except (OSError, TimeoutError, ssl.SSLError):
        pass


# --------------------------------------------------------------------------- Redis


Auth = tuple[str | None, Secret]  # (ACL username or None, password)


def _command(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


async def _resp_call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     request: bytes) -> bytes:
    writer.write(request)
    frames = Reader()
    total = 0
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            raise DiscoveryError("the node closed the connection")
        total += len(chunk)
        if total > MAX_REPLY:
            raise DiscoveryError(f"reply larger than {MAX_REPLY} bytes")
        frames.feed(chunk)
        try:
            raw = frames.next_raw()
        except ProtocolError as exc:
            raise DiscoveryError(f"reply is not RESP: {exc}") from None
        if raw is not None:
            return raw


def _node_of(n: ClusterNode, tls: bool) -> Node | None:
    port = n.tls_port if tls and n.tls_port else (n.port or n.tls_port)
    if not port:
        return None
    hosts = [h for h in dict.fromkeys((n.host, n.ip, n.hostname)) if h and h != "?"]
    ports = [p for p in dict.fromkeys((n.port, n.tls_port)) if p]
    return Node(
        identity=n.node_id,
        address=Address(n.ip or n.host, port),
        hostname=n.hostname,
        role=n.role,
        health=n.health,
        slots=n.slots,
        endpoints=tuple((h, p) for h in hosts for p in ports),
    )


async def _authenticate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        address: Address, auth: Auth | None) -> None:
    if auth is None:
        return
    username, password = auth
    words = [b"AUTH", *([username.encode()] if username else []), password.reveal().encode()]
    answer = await _resp_call(reader, writer, _command(*words))
    if answer[:1] == b"-":
        # The server's words, never the password: "WRONGPASS invalid username-...".
        reason = answer[1:].decode("utf-8", "replace").strip().split(" ", 1)[0]
        raise DiscoveryError(f"{address}: auth failed ({reason})")


async def _role_at(address: Address, tls: UpstreamTlsConfig | None, server_name: str | None,
                   auth: Auth | None) -> tuple[Role, str]:
    """ROLE at ``address``, and the IP that really answered (the node's identity)."""
    reader, writer = await _open(address, tls, server_name)
    try:
        peer = writer.get_extra_info("peername")
        here = str(peer[0]) if peer else address.host
        await _authenticate(reader, writer, address, auth)
        raw = await _resp_call(reader, writer, _command(b"ROLE"))
        if raw.startswith(b"-NOAUTH"):
            raise DiscoveryError(f"{address} wants AUTH; give the cluster a health: block with "
                                 "username and password (or password_env / password_file)")
        try:
            return parse_role(raw), here
        except RoleError as exc:
            raise DiscoveryError(f"{address}: {exc}") from None
    finally:
        await _close(writer)


async def discover_replication_at(address: Address, tls: UpstreamTlsConfig | None,
                                  server_name: str | None = None, auth: Auth | None = None,
                                  each: float = 2.0) -> Discovery:
    """The master (following a replica's ROLE once) and its replicas, each probed.

    Identities are ``ip:port`` as the master's connection saw them, so the name the seed
    was given (a DNS name that moves on failover) never keys a port.
    """
    role, ip = await _role_at(address, tls, server_name, auth)
    queried = str(address)
    if not role.is_master:
        if role.master is None:
            raise DiscoveryError(f"{address} is a {role.role}, not a Redis primary or replica")
        master = Address(*role.master)
        role, ip = await _role_at(master, tls, server_name, auth)
        queried = f"{address} -> {master}"
        if not role.is_master:
            raise DiscoveryError(f"{master}, the master of {address}, says it is a "
                                 f"{role.role} (chained replication is not followed)")
        address = master
    primary = Address(ip, address.port)
    master_id = str(primary)

    async def probe(host: str, port: int) -> str:
        try:
            async with asyncio.timeout(each):
                seen, _ = await _role_at(Address(host, port), tls, server_name, auth)
        except (TimeoutError, DiscoveryError):
            return "failed"
        if seen.role != "slave" or seen.link != "connected":
            return "failed"  # not (yet) in sync, or replicating from elsewhere
        return "online"

    healths = await asyncio.gather(*(probe(h, p) for h, p in role.replicas))
    nodes = [Node(identity=master_id, address=primary, role="master",
                  endpoints=((primary.host, primary.port),))]
    for (host, port), health in zip(role.replicas, healths, strict=True):
        nodes.append(Node(identity=f"{Address(host, port)}", address=Address(host, port),
                          role="replica", health=health, endpoints=((host, port),)))
    return Discovery(tuple(nodes), "ROLE", queried)


async def discover_redis_at(address: Address, tls: UpstreamTlsConfig | None,
                            server_name: str | None = None, auth: Auth | None = None
                            ) -> Discovery:
    """CLUSTER SHARDS at ``address``, falling back to CLUSTER SLOTS on an error reply."""
    reader, writer = await _open(address, tls, server_name)
    try:
        # An entry that names no host ("", NULL or "?", and no ip) is the node this
        # connection reached: a lone node without cluster-announce-ip does not know its own
        # address, but a node learns every peer's address from the peer's connection, so
        # only its own can be unknown. Dial it where it answered.
        peer = writer.get_extra_info("peername")
        here = str(peer[0]) if peer else address.host
        await _authenticate(reader, writer, address, auth)
        errors = []
        for source in ("shards", "slots"):
            raw = await _resp_call(reader, writer, _command(b"CLUSTER", source.upper().encode()))
            if raw[:1] == b"-":
                message = raw[1:].decode("utf-8", "replace").strip()
                if message.startswith("NOAUTH"):
                    raise DiscoveryError(
                        f"{address} wants AUTH; give the cluster a health: block with "
                        "username and password (or password_env / password_file)")
                errors.append(f"CLUSTER {source.upper()}: {message}")
                continue
            try:
                topology = parse_topology(raw, source, here)
            except TopologyError as exc:
                raise DiscoveryError(str(exc)) from None
            nodes = [node for n in topology.nodes if (node := _node_of(n, tls is not None))]
            return Discovery(tuple(nodes), f"CLUSTER {source.upper()}", str(address))
        raise DiscoveryError("; ".join(errors))
    finally:
        await _close(writer)


# --------------------------------------------------------------------------- Memcached


def _mc_complete(buf: bytes) -> int:
    """Length of a whole reply at the start of ``buf``; 0 while incomplete; -1 for an error."""
    nl = buf.find(b"\r\n")
    if nl < 0:
        return 0
    line = buf[:nl]
    if line == b"END":
        return -1  # get of a missing key: no configuration here
    if line.startswith((b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")) or b" " not in line:
        return -1
    words = line.split()
    if len(words) < 4 or not words[3].isdigit():
        raise DiscoveryError(f"unexpected reply line {line[:80]!r}")
    end = nl + 2 + int(words[3]) + 2 + 5
    return end if len(buf) >= end else 0


async def _mc_call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   request: bytes) -> bytes | None:
    writer.write(request)
    buf = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            raise DiscoveryError("the node closed the connection")
        buf += chunk
        if len(buf) > MAX_REPLY:
            raise DiscoveryError(f"reply larger than {MAX_REPLY} bytes")
        end = _mc_complete(buf)
        if end < 0:
            return None
        if end:
            return buf[:end]


async def discover_memcached_at(address: Address, tls: UpstreamTlsConfig | None,
                                server_name: str | None = None) -> Discovery:
    """``config get cluster``, falling back to ``get AmazonElastiCache:cluster``."""
    reader, writer = await _open(address, tls, server_name)
    try:
        for source, request in (("config get cluster", b"config get cluster\r\n"),
                                ("get AmazonElastiCache:cluster",
                                 b"get AmazonElastiCache:cluster\r\n")):
            raw = await _mc_call(reader, writer, request)
            if raw is None:
                continue
            try:
                config = parse_config_reply(raw)
            except AutoDiscoveryError as exc:
                raise DiscoveryError(f"{source}: {exc}") from None
            nodes = tuple(
                Node(identity=n.hostname, address=Address(n.ip or n.hostname, n.port),
                     hostname=n.hostname, role="node",
                     endpoints=((n.hostname, n.port),))
                for n in config.nodes)
            return Discovery(nodes, source, str(address), config.version)
        raise DiscoveryError(f"{address} answers neither 'config get cluster' nor 'get "
                             "AmazonElastiCache:cluster'; is it an ElastiCache configuration "
                             "endpoint?")
    finally:
        await _close(writer)


async def discover(engine: str, candidates: Sequence[Address], tls: UpstreamTlsConfig | None,
                   each: float, server_names: dict[Address, str] | None = None,
                   auth: Auth | None = None) -> Discovery:
    """Try each candidate (the seed first) until one answers, ``each`` seconds apiece."""
    errors: list[str] = []
    for address in dict.fromkeys(candidates):
        name = (server_names or {}).get(address)
        try:
            async with asyncio.timeout(each):
                if engine == "redis-cluster":
                    return await discover_redis_at(address, tls, name, auth)
                if engine == "redis-replication":
                    return await discover_replication_at(address, tls, name, auth, each / 2)
                return await discover_memcached_at(address, tls, name)
        except TimeoutError:
            errors.append(f"{address}: no answer within {each:g}s")
        except DiscoveryError as exc:
            errors.append(f"{address}: {exc}")
    raise DiscoveryError("; ".join(errors) or "no address to ask")
