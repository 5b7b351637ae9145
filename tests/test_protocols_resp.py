"""RESP2/RESP3 framing, parsing, request parsing and reply matching.

Property tests: any split of a stream frames exactly like the whole stream. Real-server
tests: sessions against a real redis-server (pipelining, MULTI/EXEC, pub/sub in RESP2 and
RESP3, sharded pub/sub, blocking commands, CLIENT REPLY, HELLO 3, RESET) are recorded byte
for byte, and the matcher must pair every reply with the command that caused it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocols.redis_cluster import ClusterRewriter
from proxy.protocols.resp import (
    Command,
    Conversation,
    Frame,
    Framer,
    ProtocolError,
    Reader,
    RequestError,
    RequestParser,
    Scanner,
    encode,
    parse,
    parse_one,
    split_inline,
)
from tests.support import ServerProcess, start_server
from tests.test_protocols_helpers import RawConnection, command, splits

# --------------------------------------------------------------------------- strategies

_text = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"r").replace(b"\n", b"n"))
# Payloads that look like RESP, redirects or pub/sub messages, to catch any searching.
_tricky = st.sampled_from([
    b"-MOVED 3999 10.0.1.231:6379\r\n", b"*3\r\n$7\r\nmessage\r\n", b"+QUEUED\r\n",
    b"$-1\r\n", b"\r\n", b">3\r\n", b"|1\r\n", b"CONFIG cluster 0 5\r\n",
])
_payload = st.one_of(st.binary(max_size=40), _tricky,
                     st.lists(_tricky, max_size=3).map(b"".join))


def _bulk(kind: bytes, data: bytes) -> bytes:
    return b"%s%d\r\n%s\r\n" % (kind, len(data), data)


def _streamed(parts: list[bytes]) -> bytes:
    return b"$?\r\n" + b"".join(b";%d\r\n%s\r\n" % (len(p), p) for p in parts if p) + b";0\r\n"


_leaf = st.one_of(
    _text.map(lambda t: b"+" + t + b"\r\n"),
    _text.map(lambda t: b"-ERR " + t + b"\r\n"),
    st.integers(-(2**63), 2**63).map(lambda i: b":%d\r\n" % i),
    st.sampled_from([b"_\r\n", b"$-1\r\n", b"*-1\r\n", b"#t\r\n", b"#f\r\n", b",3.25\r\n",
                     b",inf\r\n", b"(3492890328409238509324850943850943825024385\r\n"]),
    _payload.map(lambda p: _bulk(b"$", p)),
    _payload.map(lambda p: _bulk(b"!", b"SYNTAX " + p)),
    _payload.map(lambda p: _bulk(b"=", b"txt:" + p)),
    st.lists(_payload, max_size=3).map(_streamed),
)


def _aggregates(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    kids = st.lists(children, max_size=4)
    return st.one_of(
        st.tuples(st.sampled_from([b"*", b"~", b">"]), kids).map(
            lambda t: b"%s%d\r\n" % (t[0], len(t[1])) + b"".join(t[1])),
        st.lists(st.tuples(children, children), max_size=3).map(
            lambda kv: b"%%%d\r\n" % len(kv) + b"".join(k + v for k, v in kv)),
        st.tuples(st.lists(st.tuples(_leaf, _leaf), min_size=0, max_size=2), children).map(
            lambda t: b"|%d\r\n" % len(t[0]) + b"".join(k + v for k, v in t[0]) + t[1]),
        st.tuples(st.sampled_from([b"*", b"~"]), kids).map(
            lambda t: t[0] + b"?\r\n" + b"".join(t[1]) + b".\r\n"),
        kids.map(lambda k: b"%?\r\n" + b"".join(x + x for x in k) + b".\r\n"),
    )


frames = st.recursive(_leaf, _aggregates, max_leaves=12)
streams = st.lists(frames, min_size=1, max_size=8)
cuts = st.lists(st.integers(0, 4000), max_size=12)


def _boundaries(parts: list[bytes]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for p in parts:
        out.append((pos, pos + len(p)))
        pos += len(p)
    return out


# --------------------------------------------------------------------------- framing


@settings(max_examples=300, deadline=None)
@given(streams, cuts)
def test_framer_gives_the_same_boundaries_for_any_split(parts: list[bytes],
                                                         cut: list[int]) -> None:
    data = b"".join(parts)
    framer = Framer()
    got: list[tuple[int, int]] = []
    for chunk in splits(data, cut):
        got += framer.feed(chunk)
    assert got == _boundaries(parts)
    assert framer.position == len(data)


@settings(max_examples=200, deadline=None)
@given(streams, st.lists(st.integers(1, 7), min_size=1, max_size=5))
def test_framer_byte_by_byte_and_small_chunks(parts: list[bytes], sizes: list[int]) -> None:
    data = b"".join(parts)
    framer = Framer()
    got: list[tuple[int, int]] = []
    pos, i = 0, 0
    while pos < len(data):
        step = sizes[i % len(sizes)]
        got += framer.feed(bytearray(data[pos : pos + step]))
        pos += step
        i += 1
    assert got == _boundaries(parts)


@settings(max_examples=300, deadline=None)
@given(streams, cuts)
def test_reader_and_parse_agree_with_the_encoder(parts: list[bytes], cut: list[int]) -> None:
    reader = Reader()
    raws: list[bytes] = []
    for chunk in splits(b"".join(parts), cut):
        reader.feed(chunk)
        while (raw := reader.next_raw()) is not None:
            raws.append(raw)
    assert raws == parts
    for raw in raws:
        frame = parse_one(raw)
        again = encode(frame)
        if b"?\r\n" not in raw:
            assert again == raw  # lossless for everything but streamed forms
        assert parse_one(again) == frame


def test_every_resp3_type_parses_to_its_value() -> None:
    raw = (b"|1\r\n+ttl\r\n:10\r\n*11\r\n+OK\r\n-ERR no\r\n:-5\r\n_\r\n,1.5\r\n#t\r\n"
           b"(12345678901234567890\r\n$3\r\nab\n\r\n!4\r\nNOPE\r\n=7\r\ntxt:hey\r\n"
           b"%1\r\n~2\r\n:1\r\n:2\r\n>1\r\n$?\r\n;2\r\nhi\r\n;0\r\n")
    frame = parse_one(raw)
    assert frame.attrs is not None and frame.attrs.to_py() == {b"ttl": 10}
    assert frame.to_py() == [b"OK", b"ERR no", -5, None, 1.5, True, 12345678901234567890,
                             b"ab\n", b"NOPE", b"hey", {(1, 2): [b"hi"]}]
    assert frame.items[1].is_error and frame.items[8].is_error


def test_streamed_aggregates_and_strings_frame_and_normalize() -> None:
    raw = b"*?\r\n:1\r\n%?\r\n+a\r\n:1\r\n.\r\n$?\r\n;1\r\nx\r\n;0\r\n.\r\n"
    assert Framer().feed(raw) == [(0, len(raw))]
    assert encode(parse_one(raw)) == b"*3\r\n:1\r\n%1\r\n+a\r\n:1\r\n$1\r\nx\r\n"


def test_a_large_bulk_is_framed_without_being_held() -> None:
    """Only the scanner's counters carry over: no payload byte is buffered."""
    payload = b"x" * (4 << 20)
    scanner = Scanner()
    assert scanner.scan(b"$%d\r\n" % len(payload)) == -1
    for i in range(0, len(payload), 65536):
        assert scanner.scan(payload[i : i + 65536]) == -1
    assert scanner.scan(b"\r\n+OK\r\n") == 2
    assert scanner.idle


@pytest.mark.parametrize(("raw", "message"), [
    (b"?what\r\n", "unknown RESP type"),
    (b"$3\r\nabcd\r\n", "not followed by CRLF"),
    (b"*x\r\n", "bad length"),
    (b"$-2\r\n", "bad length"),
    (b"+OK\n", "not ended by CRLF"),
    (b".\r\n", "outside a streamed aggregate"),
    (b";3\r\n", "outside a streamed string"),
])
def test_malformed_replies_raise_a_specific_error(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        Framer().feed(raw)


def test_an_endless_line_is_refused() -> None:
    scanner = Scanner(max_line=1000)
    with pytest.raises(ProtocolError, match="longer than 1000"):
        scanner.scan(b"+" + b"a" * 2000)


def test_parse_rejects_incomplete_frames() -> None:
    with pytest.raises(ProtocolError, match="incomplete"):
        parse(b"*2\r\n:1\r\n")
    with pytest.raises(ProtocolError, match="after the frame"):
        parse_one(b":1\r\n:2\r\n")


# --------------------------------------------------------------------------- requests

_args = st.lists(st.binary(max_size=30), min_size=1, max_size=5)
_words = st.lists(st.text("abcXYZ019-_:", min_size=1, max_size=8), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_args.map(lambda a: ("m", a)), _words.map(lambda w: ("i", w))),
                max_size=10), cuts)
def test_request_parser_gives_the_same_commands_for_any_split(
        cmds: list[tuple[str, list[bytes] | list[str]]], cut: list[int]) -> None:
    stream = bytearray()
    expected = []
    for form, args in cmds:
        if form == "m":
            raw = [a if isinstance(a, bytes) else a.encode() for a in args]
            stream += command(*raw)
        else:
            raw = [a.encode() for a in args if isinstance(a, str)]
            stream += b" ".join(raw) + b"\r\n"
        expected.append((raw[0].lower(), tuple(raw[1:3]), len(raw) - 1))
    parser = RequestParser()
    got = []
    for chunk in splits(bytes(stream), cut):
        got += [(c.name, c.args, c.argc) for c in parser.feed(chunk)]
    assert got == expected
    assert parser.idle


def test_request_parser_skips_big_arguments_and_keeps_leading_ones() -> None:
    value = b"v" * 100_000
    parser = RequestParser(capture=2, max_capture=64)
    stream = command("SET", "key", value, "EX", "10") + command("CLUSTER", "SLOTS")
    got = []
    for chunk in splits(stream, range(0, len(stream), 777)):
        got += parser.feed(chunk)
    assert got == [Command(b"set", (b"key",), 4), Command(b"cluster", (b"SLOTS",), 1)]


def test_empty_commands_are_no_commands() -> None:
    """Redis ignores *0, *-1 and blank inline lines and sends no reply for them."""
    assert RequestParser().feed(b"*0\r\n*-1\r\n\r\n   \r\n\n*1\r\n$4\r\nPING\r\n") == [
        Command(b"ping", (), 0)]


@pytest.mark.parametrize(("line", "args"), [
    (b"set k v", [b"set", b"k", b"v"]),
    (b'  set "a b" \'c d\'  ', [b"set", b"a b", b"c d"]),
    (b'set "\\x41\\n\\"" \'it\\\'s\'', [b"set", b"A\n\"", b"it's"]),
    (b'set a"b c"', [b"set", b"ab c"]),
    (b"", []),
])
def test_inline_commands_split_like_redis(line: bytes, args: list[bytes]) -> None:
    assert split_inline(line) == args


@pytest.mark.parametrize("line", [b'set "abc', b'set "a"b', b"set 'abc"])
def test_unbalanced_inline_quotes_are_an_error(line: bytes) -> None:
    with pytest.raises(ProtocolError, match="unbalanced quotes"):
        split_inline(line)


def test_malformed_request_keeps_the_commands_before_it() -> None:
    with pytest.raises(RequestError, match="expected '\\$'") as info:
        RequestParser().feed(command("GET", "a") + b"*1\r\n:12\r\n")
    assert info.value.commands == [Command(b"get", (b"a",), 1)]


# --------------------------------------------------------------------------- matching


def _match(requests: bytes, replies: bytes, watched: tuple[bytes, ...] = ()
           ) -> tuple[list[bytes | None], Conversation]:
    conv = Conversation(watched)
    for cmd in RequestParser().feed(requests):
        conv.request(cmd)
    reader = Reader()
    reader.feed(replies)
    names = []
    while (raw := reader.next_raw()) is not None:
        reply = conv.reply(raw)
        names.append(None if reply.command is None else reply.command.name)
    return names, conv


def test_unsubscribe_all_expects_one_reply_per_subscription() -> None:
    req = command("SUBSCRIBE", "a", "b") + command("UNSUBSCRIBE") + command("GET", "k")
    rep = (b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n"
           b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n"
           b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:1\r\n"
           b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n$-1\r\n")
    names, conv = _match(req, rep)
    assert names == [b"subscribe", b"subscribe", None, b"unsubscribe", b"unsubscribe", b"get"]
    assert not conv.pending and not conv.subscribed


def test_unsubscribe_with_nothing_subscribed_gets_one_reply() -> None:
    names, conv = _match(command("UNSUBSCRIBE") + command("PING"),
                         b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n+PONG\r\n")
    assert names == [b"unsubscribe", b"ping"] and not conv.pending


def test_an_array_looking_like_a_message_is_a_reply_outside_subscribe_mode() -> None:
    names, _ = _match(command("LRANGE", "l", 0, -1),
                      b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nb\r\n")
    assert names == [b"lrange"]


def test_server_initiated_sunsubscribe_is_unsolicited() -> None:
    """Redis 7 drops shard subscribers when a slot moves away, with no command."""
    req = command("SSUBSCRIBE", "{s}x") + command("PING")
    rep = (b"*3\r\n$10\r\nssubscribe\r\n$4\r\n{s}x\r\n:1\r\n"
           b"*3\r\n$12\r\nsunsubscribe\r\n$4\r\n{s}x\r\n:0\r\n+PONG\r\n")
    names, conv = _match(req, rep)
    assert names == [b"ssubscribe", None, b"ping"] and not conv.subscribed


def test_client_reply_off_and_skip_suppress_replies() -> None:
    req = (command("CLIENT", "REPLY", "SKIP") + command("SET", "a", 1) + command("GET", "a")
           + command("CLIENT", "REPLY", "OFF") + command("SET", "b", 2)
           + command("CLIENT", "REPLY", "ON") + command("GET", "b"))
    names, conv = _match(req, b"$1\r\n1\r\n+OK\r\n$1\r\n2\r\n")
    assert names == [b"get", b"client", b"get"] and not conv.pending


def test_exec_lists_the_queued_commands_for_its_elements() -> None:
    conv = Conversation(watched=(b"cluster",))
    for cmd in RequestParser().feed(command("MULTI") + command("CLUSTER", "SLOTS")
                                    + command("BADCMD") + command("GET", "a")
                                    + command("EXEC")):
        conv.request(cmd)
    assert conv.reply(b"+OK\r\n").command == Command(b"multi")
    assert conv.in_multi and conv.special
    assert conv.reply(b"+QUEUED\r\n").queued
    assert not conv.reply(b"-ERR unknown command 'BADCMD'\r\n").queued
    assert conv.reply(b"+QUEUED\r\n").queued
    reply = conv.reply(b"*2\r\n*0\r\n$-1\r\n")
    assert reply.exec_commands is not None
    assert [c.name for c in reply.exec_commands] == [b"cluster", b"get"]
    assert not conv.in_multi and not conv.pending


def test_hello_and_reset_switch_the_protocol() -> None:
    conv = Conversation()
    for cmd in RequestParser().feed(command("HELLO", 3) + command("HELLO", 4)
                                    + command("RESET")):
        conv.request(cmd)
    conv.reply(b"%1\r\n+proto\r\n:3\r\n")
    assert conv.protocol == 3
    conv.reply(b"-NOPROTO unsupported protocol version\r\n")
    assert conv.protocol == 3
    conv.reply(b"+RESET\r\n")
    assert conv.protocol == 2


def test_monitor_makes_the_rest_of_the_stream_opaque() -> None:
    conv = Conversation()
    for cmd in RequestParser().feed(command("GET", "a") + command("MONITOR")):
        conv.request(cmd)
    assert not conv.next_is_opaque()
    conv.reply(b"$-1\r\n")
    assert conv.next_is_opaque()


# --------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def redis_node() -> Iterator[ServerProcess]:
    with start_server("redis") as server:
        yield server


class Session:
    """A recorded client session: every byte sent and received, in order."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = RawConnection(port)
        self.expected: list[bytes | None] = []

    def call(self, data: bytes, *names: bytes | None) -> list[bytes]:
        """Send ``data``; wait for one frame per expected name (None: unsolicited)."""
        self.expected += names
        return self.conn.call(data, len(names))

    def other(self, data: bytes, replies: int = 1) -> list[bytes]:
        side = RawConnection(self.port)
        try:
            return side.call(data, replies)
        finally:
            side.close()

    def check(self) -> None:
        """The matcher pairs every reply with the right command, and the rewriter (with no
        node to rewrite) passes the recorded replies byte for byte under any split."""
        sent, received = bytes(self.conn.sent), bytes(self.conn.received)
        names, conv = _match(sent, received, watched=(b"cluster",))
        assert names == self.expected
        assert not conv.pending
        rng = random.Random(7)
        for _ in range(40):
            rw = ClusterRewriter(lambda h, p: None, ("127.0.0.1", self.port))
            rw.feed_request(sent)
            cut = [rng.randrange(len(received) + 1) for _ in range(rng.randrange(1, 20))]
            out = b"".join(bytes(rw.feed_reply(c)) for c in splits(received, cut))
            assert out == received
            assert not rw.conversation.pending and rw.request_error is None
        self.conn.close()


def test_real_pipeline_with_tricky_values_matches_and_passes_through(
        redis_node: ServerProcess) -> None:
    s = Session(redis_node.port)
    values = [b"-MOVED 3999 10.0.1.231:6379\r\n", b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n",
              b"+QUEUED\r\n", b"\x00\xff" * 300, b"x" * 200_000]
    batch = b"".join(command("SET", f"k{i}", v) + command("GET", f"k{i}")
                     for i, v in enumerate(values))
    replies = s.call(batch + b"PING\r\n\r\n*0\r\nGET k0\r\n",
                     *[n for _ in values for n in (b"set", b"get")], b"ping", b"get")
    assert replies[1] == b"$%d\r\n%s\r\n" % (len(values[0]), values[0])
    s.check()


def test_real_multi_exec_and_discard(redis_node: ServerProcess) -> None:
    s = Session(redis_node.port)
    s.call(command("MULTI") + command("SET", "m", 1) + command("INCR", "m")
           + command("EXEC"), b"multi", b"set", b"incr", b"exec")
    s.call(command("MULTI") + command("NOSUCHCMD") + command("EXEC"),
           b"multi", b"nosuchcmd", b"exec")
    s.call(command("MULTI") + command("GET", "m") + command("DISCARD") + command("GET", "m"),
           b"multi", b"get", b"discard", b"get")
    s.check()


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_real_pubsub_and_sharded_pubsub(redis_node: ServerProcess, resp3: bool) -> None:
    s = Session(redis_node.port)
    if resp3:
        s.call(command("HELLO", 3), b"hello")
    s.call(command("SUBSCRIBE", "ch1", "ch2") + command("PSUBSCRIBE", "p*"),
           b"subscribe", b"subscribe", b"psubscribe")
    assert s.other(command("PUBLISH", "ch1", "-MOVED 1 10.0.0.1:6379")) == [b":1\r\n"]
    s.conn.read_frames(1)
    s.expected.append(None)
    s.other(command("PUBLISH", "px", "hello"))
    s.conn.read_frames(1)
    s.expected.append(None)
    s.call(command("SSUBSCRIBE", "{sh}a"), b"ssubscribe")
    s.other(command("SPUBLISH", "{sh}a", "shard message"))
    s.conn.read_frames(1)
    s.expected.append(None)
    s.call(command("PING"), b"ping")
    if resp3:
        s.call(command("GET", "nokey"), b"get")  # allowed while subscribed in RESP3
    s.call(command("UNSUBSCRIBE") + command("PUNSUBSCRIBE") + command("SUNSUBSCRIBE"),
           b"unsubscribe", b"unsubscribe", b"punsubscribe", b"sunsubscribe")
    s.call(command("UNSUBSCRIBE") + command("GET", "nokey"), b"unsubscribe", b"get")
    s.check()


def test_real_resp3_tracking_invalidations_are_unsolicited(redis_node: ServerProcess) -> None:
    s = Session(redis_node.port)
    s.call(command("HELLO", 3) + command("CLIENT", "TRACKING", "ON") + command("GET", "tk"),
           b"hello", b"client", b"get")
    s.other(command("SET", "tk", "changed"))
    s.conn.read_frames(1)
    s.expected.append(None)
    s.call(command("GET", "tk") + command("HELLO", 2) + command("GET", "tk"),
           b"get", b"hello", b"get")
    s.check()


def test_real_blocking_command_keeps_pipelined_order(redis_node: ServerProcess) -> None:
    s = Session(redis_node.port)
    s.conn.send(command("BLPOP", "bl", 5) + command("GET", "after"))
    s.expected += [b"blpop", b"get"]
    s.other(command("RPUSH", "bl", "v"))
    assert s.conn.read_frames(2)[0] == b"*2\r\n$2\r\nbl\r\n$1\r\nv\r\n"
    s.check()


def test_real_client_reply_and_reset(redis_node: ServerProcess) -> None:
    s = Session(redis_node.port)
    s.call(command("CLIENT", "REPLY", "OFF") + command("SET", "cr", 1)
           + command("CLIENT", "REPLY", "ON") + command("GET", "cr"), b"client", b"get")
    s.call(command("CLIENT", "REPLY", "SKIP") + command("SET", "cr", 2) + command("GET", "cr"),
           b"get")
    s.call(command("HELLO", 3) + command("SUBSCRIBE", "r") + command("RESET")
           + command("GET", "cr"), b"hello", b"subscribe", b"reset", b"get")
    s.check()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=6))
def test_frames_survive_a_parse_encode_round_trip_as_values(values: list[bytes]) -> None:
    frame = Frame("*", [Frame("$", v) for v in values])
    assert parse_one(encode(frame)) == frame
