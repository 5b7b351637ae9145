"""Memcached text-protocol framing and ElastiCache auto-discovery rewriting.

The verbatim ElastiCache example (shared/PROTOCOLS.md (a)) is the reference vector. Real
memcached sessions (storage commands whose data blocks contain auto-discovery text,
noreply, meta commands, the binary protocol) must pass byte for byte under any split; a
real ``get AmazonElastiCache:cluster`` (the old-engine form, stored in memcached) is
rewritten.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocols.memcache import (
    AD_KEY,
    AutoDiscoveryConfig,
    AutoDiscoveryError,
    AutoDiscoveryNode,
    AutoDiscoveryRewriter,
    McProtocolError,
    McReply,
    ReplyFramer,
    RequestFramer,
    announce_mapper,
    format_config_block,
    format_config_reply,
    parse_config_block,
    parse_config_reply,
)
from tests.support import ServerProcess, start_server
from tests.test_protocols_helpers import RawConnection, splits

EXAMPLE = (
    b"CONFIG cluster 0 136\r\n"
    b"12\n"
    b"myCluster.pc4ldq.0001.use1.cache.amazonaws.com|10.82.235.120|11211 "
    b"myCluster.pc4ldq.0002.use1.cache.amazonaws.com|10.80.249.27|11211\n"
    b"\r\n"
    b"END\r\n"
)
HOSTS = ("myCluster.pc4ldq.0001.use1.cache.amazonaws.com",
         "myCluster.pc4ldq.0002.use1.cache.amazonaws.com")
PORTS = {HOSTS[0]: 11300, HOSTS[1]: 11301}


def _rewriter(ports: dict[str, int] | None = None, seen: list[AutoDiscoveryNode] | None = None
              ) -> AutoDiscoveryRewriter:
    table = PORTS if ports is None else ports
    return AutoDiscoveryRewriter(
        announce_mapper("nat.example.com", "203.0.113.7", lambda n: table.get(n.hostname)),
        on_unmapped=None if seen is None else seen.append)


EXPECTED = (b"CONFIG cluster 0 71\r\n12\n"
            b"nat.example.com|203.0.113.7|11300 nat.example.com|203.0.113.7|11301\n\r\nEND\r\n")


# --------------------------------------------------------------------------- the format


def test_the_elasticache_example_parses_and_formats_byte_for_byte() -> None:
    config = parse_config_reply(EXAMPLE)
    assert config == AutoDiscoveryConfig(12, (
        AutoDiscoveryNode(HOSTS[0], "10.82.235.120", 11211),
        AutoDiscoveryNode(HOSTS[1], "10.80.249.27", 11211),
    ))
    assert format_config_reply(config) == EXAMPLE
    assert len(format_config_block(config)) == 136
    old = format_config_reply(config, form="get")
    assert old.startswith(b"VALUE AmazonElastiCache:cluster 0 136\r\n12\n")
    assert parse_config_reply(old) == config


def test_the_example_is_rewritten_with_the_byte_count_recomputed() -> None:
    rw = _rewriter()
    out = rw.feed_reply(EXAMPLE)
    assert out == EXPECTED
    assert rw.rewritten == 1
    config = parse_config_reply(out)
    assert config.version == 12
    assert [n.port for n in config.nodes] == [11300, 11301]


def test_a_node_without_private_ip_keeps_its_separators() -> None:
    block = b"3\nhost-a||11211 host-b|10.0.0.2|11211\n"
    config = parse_config_block(block)
    assert config.nodes[0] == AutoDiscoveryNode("host-a", "", 11211)
    assert format_config_block(config) == block


def test_an_empty_node_list_is_valid() -> None:
    assert parse_config_block(b"7\n\n") == AutoDiscoveryConfig(7, ())
    assert format_config_block(AutoDiscoveryConfig(7, ())) == b"7\n\n"


@pytest.mark.parametrize(("block", "message"), [
    (b"12\nhost|ip|11211", "each ended by LF"),
    (b"v12\nhost|ip|11211\n", "not a number"),
    (b"12\nhost|11211\n", "not hostname|ip|port"),
    (b"12\nhost|ip|port\n", "not hostname|ip|port"),
])
def test_malformed_blocks_say_what_is_wrong(block: bytes, message: str) -> None:
    with pytest.raises(AutoDiscoveryError, match=message):
        parse_config_block(block)


def test_a_reply_without_configuration_is_an_error() -> None:
    with pytest.raises(AutoDiscoveryError, match="no cluster configuration: b'ERROR'"):
        parse_config_reply(b"ERROR\r\n")
    with pytest.raises(AutoDiscoveryError, match="not 136 bytes"):
        parse_config_reply(EXAMPLE.replace(b" 136\r\n", b" 136\r\nx"))


def test_unmapped_nodes_are_reported_and_left_as_they_are() -> None:
    seen: list[AutoDiscoveryNode] = []
    out = _rewriter({HOSTS[0]: 11300}, seen).feed_reply(EXAMPLE)
    config = parse_config_reply(out)
    assert config.nodes[1] == AutoDiscoveryNode(HOSTS[1], "10.80.249.27", 11211)
    assert seen == [AutoDiscoveryNode(HOSTS[1], "10.80.249.27", 11211)]


def test_a_malformed_configuration_passes_unchanged_and_is_counted() -> None:
    bad = b"CONFIG cluster 0 5\r\nhello\r\nEND\r\n"
    rw = _rewriter()
    assert rw.feed_reply(bad) == bad
    assert rw.malformed == 1 and rw.rewritten == 0


# --------------------------------------------------------------------------- streams

_value = st.one_of(
    st.binary(max_size=60),
    st.sampled_from([EXAMPLE, b"CONFIG cluster 0 3\r\n", b"VALUE AmazonElastiCache:cluster 0 1",
                     b"\r\nEND\r\n", b"END\r\n" * 3, b"\n", b"\r"]),
)


@st.composite
def reply_units(draw: st.DrawFn, ad: bool = True) -> tuple[bytes, bytes]:
    """(what the server sends, what the client must receive) for one reply unit."""
    kinds = ["value", "va", "line"] + (["config", "oldget", "gets"] if ad else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "value":
        v = draw(_value)
        raw = b"VALUE k%d 0 %d\r\n%s\r\nEND\r\n" % (draw(st.integers(0, 9)), len(v), v)
        return raw, raw
    if kind == "va":
        v = draw(_value)
        raw = b"VA %d t0 f5\r\n%s\r\n" % (len(v), v)
        return raw, raw
    if kind == "line":
        raw = draw(st.sampled_from([b"STORED\r\n", b"END\r\n", b"HD\r\n", b"EN\r\n",
                                    b"MN\r\n", b"NOT_FOUND\r\n", b"ERROR\r\n", b"42\r\n",
                                    b"CLIENT_ERROR bad data chunk\r\n", b"VERSION 1.6.18\r\n",
                                    b"STAT pid 1\r\nSTAT uptime 2\r\nEND\r\n"]))
        return raw, raw
    version = draw(st.integers(1, 999))
    nodes = tuple(AutoDiscoveryNode(h, f"10.0.0.{i}", 11211)
                  for i, h in enumerate(draw(st.lists(st.sampled_from(HOSTS), max_size=3))))
    config = AutoDiscoveryConfig(version, nodes)
    mapped = AutoDiscoveryConfig(version, tuple(
        AutoDiscoveryNode("nat.example.com", "203.0.113.7", PORTS[n.hostname]) for n in nodes))
    if kind == "config":
        return format_config_reply(config), format_config_reply(mapped)
    flags = draw(st.integers(0, 5))
    if kind == "oldget":
        return format_config_reply(config, "get", flags), format_config_reply(mapped, "get",
                                                                              flags)
    block, new = format_config_block(config), format_config_block(mapped)
    return (b"VALUE %s %d %d 77\r\n%s\r\nEND\r\n" % (AD_KEY, flags, len(block), block),
            b"VALUE %s %d %d 77\r\n%s\r\nEND\r\n" % (AD_KEY, flags, len(new), new))


@settings(max_examples=300, deadline=None)
@given(st.lists(reply_units(), min_size=1, max_size=10),
       st.lists(st.integers(0, 3000), max_size=12))
def test_rewriting_does_not_depend_on_how_replies_are_split(
        units: list[tuple[bytes, bytes]], cut: list[int]) -> None:
    stream = b"".join(u[0] for u in units)
    expected = b"".join(u[1] for u in units)
    rw = _rewriter()
    out = b"".join(bytes(rw.feed_reply(c)) for c in splits(stream, cut))
    assert out == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(reply_units(ad=False), min_size=1, max_size=10),
       st.lists(st.integers(0, 3000), max_size=12))
def test_replies_with_nothing_to_rewrite_are_returned_as_is(
        units: list[tuple[bytes, bytes]], cut: list[int]) -> None:
    stream = b"".join(u[0] for u in units)
    rw = _rewriter()
    chunks = splits(stream, cut)
    out = [rw.feed_reply(c) for c in chunks]
    assert b"".join(bytes(o) for o in out) == stream
    # Only a line cut in two is ever held back.
    assert sum(o is not c for o, c in zip(out, chunks, strict=True)) <= 2 * len(cut)


@settings(max_examples=200, deadline=None)
@given(st.lists(reply_units(), min_size=1, max_size=8),
       st.lists(st.integers(0, 3000), max_size=12))
def test_reply_framer_units_do_not_depend_on_the_split(
        units: list[tuple[bytes, bytes]], cut: list[int]) -> None:
    stream = b"".join(u[0] for u in units)
    whole = ReplyFramer().feed(stream)
    framer = ReplyFramer()
    assert [r for c in splits(stream, cut) for r in framer.feed(c)] == whole
    assert whole[-1].end == len(stream)
    assert all(a.end == b.start for a, b in itertools.pairwise(whole))


_key = st.text("abcdefgh:-_", min_size=1, max_size=10).map(str.encode)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, tuple[bytes, int, bool]]:
    kind = draw(st.sampled_from(["set", "cas", "append", "ms", "get", "gat", "mg", "md", "mn",
                                 "incr", "delete", "config"]))
    key = draw(_key)
    noreply = draw(st.booleans())
    nr = b" noreply" if noreply else b""
    if kind in ("set", "append", "cas"):
        v = draw(_value)
        cas = b" 99" if kind == "cas" else b""
        return (b"%s %s 0 0 %d%s%s\r\n%s\r\n" % (kind.encode(), key, len(v), cas, nr, v),
                (kind.encode(), len(v), noreply))
    if kind == "ms":
        v = draw(_value)
        q = b" q" if noreply else b""
        return b"ms %s %d T0%s\r\n%s\r\n" % (key, len(v), q, v), (b"ms", len(v), noreply)
    if kind == "get":
        keys = draw(st.lists(_key, min_size=1, max_size=4))
        return b"gets " + b" ".join(keys) + b"\r\n", (b"gets", -1, False)
    if kind == "gat":
        return b"gat 10 %s\r\n" % key, (b"gat", -1, False)
    if kind in ("mg", "md"):
        q = b" q" if noreply else b""
        return b"%s %s v k%s\r\n" % (kind.encode(), key, q), (kind.encode(), -1, noreply)
    if kind == "mn":
        return b"mn\r\n", (b"mn", -1, False)
    if kind == "incr":
        return b"incr %s 5%s\r\n" % (key, nr), (b"incr", -1, noreply)
    if kind == "delete":
        return b"delete %s%s\n" % (key, nr), (b"delete", -1, noreply)
    return b"config get cluster\r\n", (b"config", -1, False)


@settings(max_examples=300, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=10), st.lists(st.integers(0, 2000),
                                                               max_size=12))
def test_request_framer_gives_the_same_commands_for_any_split(
        reqs: list[tuple[bytes, tuple[bytes, int, bool]]], cut: list[int]) -> None:
    stream = b"".join(r[0] for r in reqs)
    framer = RequestFramer()
    got = [r for c in splits(stream, cut) for r in framer.feed(c)]
    assert [(r.command, r.data_len, r.noreply) for r in got] == [r[1] for r in reqs]
    assert got[-1].end == len(stream)
    rw = _rewriter()
    assert all(rw.feed_request(c) is c for c in splits(stream, cut))


def test_request_framer_reads_keys_and_no_block_after_a_bad_length() -> None:
    got = RequestFramer().feed(b"get a b c\r\ngat 5 x y\r\nset k 0 0 abc\r\nmn\r\n")
    assert [r.keys for r in got] == [(b"a", b"b", b"c"), (b"x", b"y"), (b"k",), ()]
    assert [r.data_len for r in got] == [-1, -1, -1, -1]


def test_binary_protocol_is_refused_by_the_framers() -> None:
    with pytest.raises(McProtocolError, match="binary protocol"):
        RequestFramer().feed(b"\x80\x0b" + b"\x00" * 22)


# --------------------------------------------------------------------------- real memcached


@pytest.fixture(scope="module")
def memcached() -> Iterator[ServerProcess]:
    """One memcached for the module (it takes a second to stop)."""
    with start_server("memcached") as server:
        yield server


def _session(port: int, steps: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    """Send each request; read until the reply stream ends with the given marker."""
    conn = RawConnection(port)
    try:
        for data, marker in steps:
            before = len(conn.received)
            conn.send(data)
            conn.read_until(lambda r, b=before, m=marker: r[b:].endswith(m))
        return bytes(conn.sent), bytes(conn.received)
    finally:
        conn.close()


def _check_splits(sent: bytes, received: bytes, expected: bytes) -> None:
    rng = random.Random(5)
    rw = _rewriter()
    rw.feed_request(sent)
    assert rw.feed_reply(received) == expected
    for _ in range(40):
        rw = _rewriter()
        rw.feed_request(sent)
        cut = [rng.randrange(len(received) + 1) for _ in range(rng.randrange(1, 25))]
        assert b"".join(bytes(rw.feed_reply(c)) for c in splits(received, cut)) == expected


def test_real_traffic_with_auto_discovery_text_in_values_passes_byte_exact(
        memcached: ServerProcess) -> None:
    tricky = [EXAMPLE, EXAMPLE.replace(b"CONFIG cluster", b"VALUE " + AD_KEY),
              b"VA 3 t\r\nabc\r\n", bytes(range(256)) * 40]
    steps: list[tuple[bytes, bytes]] = []
    for i, v in enumerate(tricky):
        steps.append((b"set k%d 0 0 %d\r\n%s\r\n" % (i, len(v), v), b"STORED\r\n"))
        steps.append((b"set q%d 0 0 %d noreply\r\n%s\r\nmn\r\n" % (i, len(v), v), b"MN\r\n"))
    steps += [
        (b"get k0 k1 k2 k3 nokey\r\n", b"END\r\n"),
        (b"gets k0\r\n", b"END\r\n"),
        (b"gat 100 k1 q1\r\n", b"END\r\n"),
        (b"mg k0 v k f t\r\nmg nokey v q\r\nmn\r\n", b"MN\r\n"),
        (b"ms m1 %d T0\r\n%s\r\nmg m1 v\r\n" % (len(EXAMPLE), EXAMPLE),
         b"\r\n" + EXAMPLE + b"\r\n"),
        (b"ma cnt N0 J5\r\nma cnt v\r\nmd m1 q\r\nmd m1\r\nmn\r\n", b"MN\r\n"),
        (b"incr nokey 1\r\ntouch k0 10\r\ndelete q0 noreply\r\ndelete q0\r\n", b"NOT_FOUND\r\n"),
        (b"config get cluster\r\n", b"ERROR\r\n"),  # plain memcached has no config command
        (b"version\r\nstats slabs\r\n", b"END\r\n"),
    ]
    sent, received = _session(memcached.port, steps)
    assert EXAMPLE in received and b"VALUE k1 0" in received
    _check_splits(sent, received, received)


def test_real_get_of_the_old_engine_key_is_rewritten(memcached: ServerProcess) -> None:
    """Engines before 1.4.14 serve the configuration as the key AmazonElastiCache:cluster."""
    block = format_config_block(parse_config_reply(EXAMPLE))
    sent, received = _session(memcached.port, [
        (b"set %s 0 0 %d\r\n%s\r\n" % (AD_KEY, len(block), block), b"STORED\r\n"),
        (b"get %s\r\n" % AD_KEY, b"END\r\n"),
        (b"gets other %s\r\n" % AD_KEY, b"END\r\n"),
        (b"mg %s v\r\n" % AD_KEY, b"\r\n"),
    ])
    new_block = b"12\nnat.example.com|203.0.113.7|11300 nat.example.com|203.0.113.7|11301\n"
    assert len(new_block) == 71
    expected = received.replace(b"VALUE %s 0 136\r\n%s" % (AD_KEY, block),
                                b"VALUE %s 0 71\r\n%s" % (AD_KEY, new_block), 1)
    gets_at = expected.index(b"VALUE %s 0 136 " % AD_KEY)
    cas = expected[gets_at:].split(b"\r\n", 1)[0].rsplit(b" ", 1)[1]
    expected = expected.replace(b"VALUE %s 0 136 %s\r\n%s" % (AD_KEY, cas, block),
                                b"VALUE %s 0 71 %s\r\n%s" % (AD_KEY, cas, new_block))
    assert expected.count(new_block) == 2
    assert expected.endswith(b"VA 136\r\n" + block + b"\r\n")  # meta get: not rewritten
    _check_splits(sent, received, expected)


def test_real_binary_protocol_connection_is_passed_untouched(memcached: ServerProcess) -> None:
    # A binary-protocol "version" request: magic 0x80, opcode 0x0b, no key, no body.
    request = struct.pack(">BBHBBHIIQ", 0x80, 0x0B, 0, 0, 0, 0, 0, 0, 0)
    conn = RawConnection(memcached.port)
    try:
        conn.send(request)
        received = conn.read_until(lambda r: len(r) >= 24 and len(r) >= 24 + struct.unpack(
            ">I", r[8:12])[0])
    finally:
        conn.close()
    assert received[0] == 0x81
    rw = _rewriter()
    rw.feed_request(request)
    assert rw.opaque and rw.feed_reply(received) is received


def test_real_reply_framer_splits_a_get_into_value_and_end(memcached: ServerProcess) -> None:
    _, received = _session(memcached.port, [(b"set a 0 0 5\r\nEND\r\n\r\n", b"STORED\r\n"),
                                            (b"get a\r\n", b"END\r\n")])
    assert ReplyFramer().feed(received) == [
        McReply(b"STORED", -1, 0, 8), McReply(b"VALUE a 0 5", 5, 8, 28),
        McReply(b"END", -1, 28, 33)]
