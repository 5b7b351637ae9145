"""Bytes from the network, fuzzed: the RESP and memcached framers and parsers, the PROXY
protocol header. Whatever arrives, each parser answers or raises its own error (the
relay turns that into a clean close); never another exception, a hang or a result that
depends on how the bytes were split.

Inputs are raw bytes and byte-level mutations (flip, insert, delete, splice, repeat) of
valid streams, so the fuzzer gets past the first header. The example count comes from
the Hypothesis profile (tests/conftest.py): ``ci`` by default, ``--hypothesis-profile
long`` by hand. With atheris installed, ``python -m tests.test_fuzz_wire NAME [atheris
args]`` runs test NAME under libFuzzer's coverage-guided engine instead.
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.protocols import proxy_header
from proxy.protocols.memcache import (
    AutoDiscoveryError,
    AutoDiscoveryNode,
    AutoDiscoveryRewriter,
    McProtocolError,
    ReplyFramer,
    RequestFramer,
    parse_config_block,
    parse_config_reply,
)
from proxy.protocols.resp import (
    Conversation,
    Framer,
    ProtocolError,
    Reader,
    RequestError,
    RequestParser,
    parse,
    parse_one,
)

# -- inputs ---------------------------------------------------------------------------

RESP_SEEDS = [
    b"+OK\r\n", b"-ERR unknown\r\n", b":42\r\n", b"$5\r\nhello\r\n", b"$-1\r\n", b"*-1\r\n",
    b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", b"*0\r\n", b"_\r\n", b"#t\r\n", b",3.14\r\n",
    b"(12345678901234567890\r\n", b"!3\r\nerr\r\n", b"=8\r\ntxt:abcd\r\n",
    b"%1\r\n+k\r\n:1\r\n", b"~2\r\n:1\r\n:2\r\n", b">3\r\n+message\r\n+c\r\n+m\r\n",
    b"|1\r\n+ttl\r\n:3\r\n+v\r\n", b"$?\r\n;4\r\nHell\r\n;1\r\no\r\n;0\r\n",
    b"*?\r\n:1\r\n.\r\n", b"PING\r\n", b"SET k v\r\n", b'"a b" \'c\'\r\n',
    b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nval\r\n",
]
MC_SEEDS = [
    b"get k\r\n", b"gets a b c\r\n", b"set k 0 0 5\r\nhello\r\n", b"cas k 0 0 1 9\r\nx\r\n",
    b"append k 0 0 2 noreply\r\nab\r\n", b"delete k\r\n", b"incr k 1\r\n",
    b"mg k v t\r\n", b"ms k 3 T0\r\nabc\r\n", b"md k q\r\n", b"mn\r\n",
    b"config get cluster\r\n", b"VALUE k 0 5\r\nhello\r\nEND\r\n", b"STORED\r\n",
    b"VA 3 t\r\nabc\r\n", b"HD\r\n", b"EN\r\n", b"ERROR\r\n", b"END\r\n",
    b"CONFIG cluster 0 40\r\n12\nhost|10.0.0.1|11211 h2|10.0.0.2|11212\n\r\nEND\r\n",
    b"VALUE AmazonElastiCache:cluster 0 23\r\n3\nmc1|10.0.0.1|11211\n\r\nEND\r\n",
]


def _v2(command: int, family: int, body: bytes) -> bytes:
    return proxy_header.V2_SIGNATURE + bytes([0x20 | command, family]) + \
        struct.pack("!H", len(body)) + body


PROXY_SEEDS = [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 6379\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 51000 6379\r\n",
    b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
    _v2(1, 0x11, bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 51000, 6379)),
    _v2(1, 0x21, ipaddress.ip_address("2001:db8::1").packed
        + ipaddress.ip_address("2001:db8::2").packed + struct.pack("!HH", 1, 2)),
    _v2(0, 0x00, b""),
    _v2(1, 0x11, bytes(12) + b"\x03\x00\x04abcd"),  # a TLV after the addresses
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes], pieces: int = 4) -> bytes:
    """A few seeds joined, then a handful of byte-level edits."""
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(seeds), min_size=1,
                                            max_size=pieces))))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "digits", "dup", "cut"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "digits":  # a length or a count: the framers' favourite trap
            data[at:at] = draw(st.sampled_from(
                [b"-1", b"-2", b"0", b"99999999999", b"1_0", b" 1", b"+1", b"\xd9\xa3",
                 b"9" * 30, b"\r\n", b"\n", b"\r"]))
        elif op == "dup":
            data[at:at] = data[at:at + draw(st.integers(1, 32))]
        elif op == "cut":
            del data[at:]
    return bytes(data)


def wire(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), mutated(seeds))


cuts = st.lists(st.integers(0, 400), max_size=8)


def chunks(data: bytes, cut: list[int]) -> list[bytes]:
    points = sorted({c for c in cut if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def fed(feed: Callable[[bytes], list[Any]], parts: list[bytes],
        error: type[Exception]) -> tuple[list[Any], bool]:
    """Everything ``feed`` returned over ``parts``, and whether it raised ``error``."""
    out: list[Any] = []
    for part in parts:
        try:
            out.extend(feed(part))
        except error:
            return out, True
    return out, False


# -- RESP -----------------------------------------------------------------------------


@settings(deadline=None)
@given(wire(RESP_SEEDS), cuts)
def test_resp_framer_takes_any_bytes_the_same_way_in_any_split(data: bytes,
                                                               cut: list[int]) -> None:
    whole, whole_failed = fed(Framer().feed, [data], ProtocolError)
    split, split_failed = fed(Framer().feed, chunks(data, cut), ProtocolError)
    assert whole_failed == split_failed
    if not whole_failed:
        assert whole == split
    else:  # the frames before the bad byte are the same
        assert whole[:len(split)] == split[:len(whole)]


@settings(deadline=None)
@given(wire(RESP_SEEDS))
def test_resp_frames_the_framer_finds_parse_whole(data: bytes) -> None:
    """The framer (hot path) and the parser (the rewriting relays) agree on boundaries."""
    frames, _failed = fed(Framer().feed, [data], ProtocolError)
    for start, end in frames:
        try:
            _frame, stop = parse(data, start)
        except ProtocolError:
            continue  # framing checks less than parsing (payloads are not looked at)
        assert stop == end, (start, end, stop)


@settings(deadline=None)
@given(wire(RESP_SEEDS), cuts)
def test_resp_reader_gives_frames_or_a_protocol_error(data: bytes, cut: list[int]) -> None:
    reader = Reader()
    for part in chunks(data, cut):
        reader.feed(part)
        try:
            reader.frames()
        except ProtocolError:
            return
    try:
        parse_one(data)
    except ProtocolError:
        pass


@settings(deadline=None)
@given(wire(RESP_SEEDS), cuts)
def test_resp_request_parser_takes_any_bytes_the_same_way_in_any_split(
        data: bytes, cut: list[int]) -> None:
    def feed(parser: RequestParser) -> Callable[[bytes], list[Any]]:
        def one(part: bytes) -> list[Any]:
            try:
                return parser.feed(part)
            except RequestError as exc:
                got.extend(exc.commands)
                raise
        got: list[Any] = []
        return one

    whole_parser, split_parser = RequestParser(), RequestParser()
    whole, whole_failed = fed(feed(whole_parser), [data], RequestError)
    split, split_failed = fed(feed(split_parser), chunks(data, cut), RequestError)
    assert whole_failed == split_failed
    if not whole_failed:
        assert whole == split


@settings(deadline=None)
@given(st.lists(wire(RESP_SEEDS), min_size=1, max_size=4), wire(RESP_SEEDS))
def test_resp_conversation_matches_any_replies(requests: list[bytes], replies: bytes) -> None:
    """Commands and replies of any shape: the matcher answers or raises ProtocolError."""
    conversation = Conversation()
    parser = RequestParser()
    try:
        for request in requests:
            for command in parser.feed(request):
                conversation.request(command)
        reader = Reader()
        reader.feed(replies)
        while (raw := reader.next_raw()) is not None:
            conversation.reply(raw)
    except ProtocolError:
        pass


# -- memcached ------------------------------------------------------------------------


@settings(deadline=None)
@given(wire(MC_SEEDS), cuts)
def test_memcached_request_framer_takes_any_bytes_the_same_way_in_any_split(
        data: bytes, cut: list[int]) -> None:
    whole, whole_failed = fed(RequestFramer().feed, [data], McProtocolError)
    split, split_failed = fed(RequestFramer().feed, chunks(data, cut), McProtocolError)
    assert whole_failed == split_failed
    if not whole_failed:
        assert whole == split


@settings(deadline=None)
@given(wire(MC_SEEDS), cuts)
def test_memcached_reply_framer_takes_any_bytes_the_same_way_in_any_split(
        data: bytes, cut: list[int]) -> None:
    whole, whole_failed = fed(ReplyFramer().feed, [data], McProtocolError)
    split, split_failed = fed(ReplyFramer().feed, chunks(data, cut), McProtocolError)
    assert whole_failed == split_failed
    if not whole_failed:
        assert whole == split


def _mapper(node: AutoDiscoveryNode) -> AutoDiscoveryNode | None:
    return AutoDiscoveryNode("proxy.example", "192.0.2.1", 20000 + node.port % 1000)


@settings(deadline=None)
@given(wire(MC_SEEDS), cuts)
# A reply byte 0x81 (binary) after held bytes, before any request: nothing held is lost.
@example(b"\0\0\0\0\0\x81", [5])
def test_memcached_auto_discovery_rewriter_takes_any_reply_in_any_split(
        data: bytes, cut: list[int]) -> None:
    whole, whole_failed = fed(lambda d: [AutoDiscoveryRewriter(_mapper).feed_reply(d)],
                              [data], McProtocolError)
    rewriter = AutoDiscoveryRewriter(_mapper)
    split, split_failed = fed(lambda d: [rewriter.feed_reply(d)], chunks(data, cut),
                              McProtocolError)
    if not whole_failed and not split_failed:
        # Bytes held back for an incomplete line at the end are not output yet.
        assert b"".join(split) == b"".join(whole)


@settings(deadline=None)
@given(wire(MC_SEEDS))
def test_memcached_auto_discovery_parsers_raise_only_their_error(data: bytes) -> None:
    for parse_fn in (parse_config_reply, parse_config_block):
        try:
            parse_fn(data)
        except AutoDiscoveryError:
            pass


# -- PROXY protocol -------------------------------------------------------------------


@settings(deadline=None)
@given(wire(PROXY_SEEDS), st.sampled_from(["v1", "v2", "any"]), st.integers(0, 300))
def test_proxy_header_answers_any_bytes_and_more_bytes_never_change_it(
        data: bytes, mode: proxy_header.Mode, cut: int) -> None:
    def outcome(chunk: bytes) -> proxy_header.Header | str | None:
        try:
            return proxy_header.parse(chunk, mode)
        except proxy_header.HeaderError:
            return "error"

    full = outcome(data)
    if isinstance(full, proxy_header.Header):
        assert 0 < full.length <= min(len(data), proxy_header.MAX_HEADER)
    early = outcome(data[:cut])
    if early is not None:  # decided on a prefix: the rest of the stream cannot change it
        assert early == full


# -- what the fuzzing found (each a regression test) ------------------------------------


def test_auto_discovery_entries_that_are_not_ascii_are_its_error() -> None:
    # Found: UnicodeDecodeError escaped parse_config_block (discovery catches only
    # AutoDiscoveryError, so a node's garbage reply stopped its refresh).
    for block in (b"1\n\xff|10.0.0.1|11211\n", b"1\nh|\xc3|11211\n"):
        with pytest.raises(AutoDiscoveryError, match="not ASCII"):
            parse_config_block(block)


def test_auto_discovery_numbers_are_bounded() -> None:
    # Found: int() of a 4,301-digit version or port raised ValueError; a port above
    # 65535 was taken.
    for block in (b"9" * 5000 + b"\nh|10.0.0.1|11211\n", b"1\nh|10.0.0.1|" + b"9" * 5000 + b"\n",
                  b"1\nh|10.0.0.1|65536\n"):
        with pytest.raises(AutoDiscoveryError):
            parse_config_block(block)
    with pytest.raises(AutoDiscoveryError):
        parse_config_reply(b"CONFIG cluster 0 " + b"9" * 5000 + b"\r\n1\n\r\nEND\r\n")


def test_memcached_block_lengths_of_thousands_of_digits_are_framing_errors() -> None:
    # Found: the framers' int() raised a bare ValueError past 4,300 digits.
    with pytest.raises(McProtocolError):
        ReplyFramer().feed(b"VALUE k 0 " + b"9" * 5000 + b"\r\n")
    # A request with such a length is no storage block: memcached answers CLIENT_ERROR
    # and reads the next line as a command.
    got = RequestFramer().feed(b"set k 0 0 " + b"9" * 5000 + b"\r\nget k\r\n")
    assert [r.command for r in got] == [b"set", b"get"]


def test_resp_lengths_are_digits_as_redis_reads_them() -> None:
    # Found: int() took "1_0", " 1" and "+1" as lengths; Redis's string2ll does not.
    for bad in (b"$1_0\r\n0123456789\r\n", b"$ 1\r\nx\r\n", b"*+1\r\n:1\r\n",
                b"$\xd9\xa3\r\nabc\r\n"):
        with pytest.raises(ProtocolError):
            Framer().feed(bad)
        with pytest.raises(ProtocolError):
            parse_one(bad)
    with pytest.raises(RequestError):
        RequestParser().feed(b"*1\r\n$1_0\r\nPINGPINGPI\r\n")
    assert parse_one(b"$-1\r\n").value is None
    assert Framer().feed(b"*-1\r\n:-5\r\n") == [(0, 5), (5, 10)]


# -- atheris --------------------------------------------------------------------------

def run_under_atheris(tests: dict[str, Any]) -> None:
    """``python -m tests.MODULE NAME [atheris args]``: the Hypothesis test NAME of that
    module's ``globals()`` under libFuzzer, guided by the coverage of every proxy.* function
    imported by then (the parsers)."""
    import importlib
    import inspect

    atheris = importlib.import_module("atheris")  # optional: pip install atheris
    test = tests[sys.argv[1]]
    for module in [m for n, m in sys.modules.items() if n.startswith("proxy.")]:
        for obj in [*vars(module).values(),
                    *(v for c in vars(module).values() if isinstance(c, type)
                      for v in vars(c).values())]:
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                atheris.instrument_func(obj)  # the parsers' coverage guides the fuzzer
    atheris.Setup([sys.argv[0], *sys.argv[2:]], test.hypothesis.fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    run_under_atheris(globals())
