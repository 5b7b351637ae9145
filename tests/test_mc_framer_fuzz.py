"""The engine's C Memcached framer against the Python auto-discovery rewriter it replaces.

::

    ops: [("req", chunk) | ("rep", chunk)] --AutoDiscoveryRewriter.feed_*------> bytes | error
                                           --_engine.Framer(memcache=True)
                                             + NativeMcFraming.answer ----------> bytes | error

Hypothesis builds reply streams -- get/gets/gat values (whose data holds ``CONFIG
cluster``, ``VALUE AmazonElastiCache:cluster`` and CRLFs), meta ``VA`` blocks, both
auto-discovery forms, errors, ``noreply`` silence -- cut into random chunks with random
corruption, and plain random bytes; both must forward the same bytes and fail on the same
chunk. An AddressSanitizer build of the framer runs a corpus of the same streams.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.cluster.relay import NativeMcFraming
from proxy.protocols.memcache import AutoDiscoveryNode, AutoDiscoveryRewriter
from proxy.relay.engine import _engine, native_available
from tests.framer_diff import (
    Ops,
    asan_cases,
    check_under_address_sanitizer,
    compare,
    conversation,
    framer_run,
    noise,
    rewriter_run,
)

pytestmark = pytest.mark.skipif(not native_available(), reason="the engine is not built here")

PORTS = {"n1.cache": 7001, "n2.cache": 7002}


def mapper(node: AutoDiscoveryNode) -> AutoDiscoveryNode | None:
    port = PORTS.get(node.hostname)
    return None if port is None else AutoDiscoveryNode("nat.example", "192.0.2.1", port)


def python_run(ops: Ops) -> tuple[list[bytes], int | None]:
    return rewriter_run(AutoDiscoveryRewriter(mapper), ops)


def c_run(ops: Ops) -> tuple[list[bytes], int | None]:
    """Asks answered as the engine's hub answers them."""
    framing = NativeMcFraming(_engine.NodeMap(memcache=True), mapper,
                              on_unmapped=lambda node: None,
                              on_protocol_error=lambda who: None)
    return framer_run(_engine.Framer(memcache=True),
                      lambda ev: framing.answer(ev[1], ev[2], b""), ops)


def same_output(ops: Ops) -> tuple[bool, str]:
    return compare(python_run, c_run, ops)


def value(key: bytes, data: bytes, *extra: bytes) -> bytes:
    return b" ".join([b"VALUE", key, b"0", b"%d" % len(data), *extra]) + b"\r\n" + data + b"\r\n"


BLOCK = b"7\nn1.cache|10.0.0.1|11211 n2.cache|10.0.0.2|11211 n9.cache||11211\n"
REQUESTS = [b"config get cluster\r\n", b"get k\r\n", b"gets a b\r\n", b"set k 0 0 5\r\nhello\r\n",
            b"set k 0 0 5 noreply\r\nhello\r\n", b"mg k v\r\n", b"ms k 2\r\nhi\r\n",
            b"get AmazonElastiCache:cluster\r\n", b"version\r\n", b"mn\r\n", b"\x80\x00\x00"]
REPLIES = [
    b"CONFIG cluster 0 %d\r\n%s\r\nEND\r\n" % (len(BLOCK), BLOCK),
    value(b"AmazonElastiCache:cluster", BLOCK) + b"END\r\n",
    b"CONFIG  cluster  0 %d \r\n%s\r\nEND\r\n" % (len(BLOCK), BLOCK),   # extra spaces
    b"CONFIG cluster 0 9\r\nnot a cfg\r\nEND\r\n",                       # malformed block
    value(b"k", b"CONFIG cluster 0 3\r\nabc\r\nEND\r\n") + b"END\r\n",  # stored lookalike
    value(b"k", b"VALUE AmazonElastiCache:cluster 0 1\r\n", b"42") + b"END\r\n",
    value(b"a", b"x" * 3000) + value(b"b", b"") + b"END\r\n",
    b"VA 2 f\r\nhi\r\n", b"VA 0\r\n\r\n", b"HD\r\n", b"EN\r\n", b"MN\r\n", b"STORED\r\n",
    b"END\r\n", b"ERROR\r\n", b"CLIENT_ERROR bad data chunk\r\n", b"SERVER_ERROR oom\r\n",
    b"VERSION 1.6.21\r\n", b"VALUE k 0 x\r\n", b"VA\r\n", b"CONFIGX\r\n", b"VALUES\r\n",
    b"VALUE k 0 99999999999999999999999\r\n", b"\n", b"\r\n", b"\x81\x00\x00\x00",
]


@st.composite
def conversations(draw: st.DrawFn) -> Ops:
    # the usual start: the client speaks first
    return conversation(draw, REQUESTS, REPLIES, max_requests=8, max_replies=12,
                        max_chunk=400, opening=64)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(conversations())
def test_c_and_python_forward_the_same_bytes(ops: Ops) -> None:
    ok, why = same_output(ops)
    assert ok, why


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(noise())
def test_random_bytes_fail_or_pass_alike(ops: Ops) -> None:
    ok, why = same_output(ops)
    assert ok, why


def test_both_auto_discovery_forms_are_rewritten_and_lookalike_values_are_not() -> None:
    stored = value(b"k", b"CONFIG cluster 0 3\r\nabc\r\nEND\r\n") + b"END\r\n"
    reply = b"CONFIG cluster 0 %d\r\n%s\r\nEND\r\n" % (len(BLOCK), BLOCK)
    ops: Ops = [("req", b"get k\r\nconfig get cluster\r\n"), ("rep", stored + reply[:30]),
                ("rep", reply[30:])]
    out, err = c_run(ops)
    assert err is None
    text = b"".join(out)
    assert text.startswith(stored)
    assert b"nat.example|192.0.2.1|7001 nat.example|192.0.2.1|7002 n9.cache||11211" in text
    assert same_output(ops)[0]


def test_an_overlong_line_and_a_bad_length_are_clean_errors() -> None:
    ops: Ops = [("req", b"get k\r\n"), ("rep", b"X" * 700_000), ("rep", b"Y" * 700_000)]
    assert c_run(ops)[1] == 2 and same_output(ops)[0]
    assert c_run([("req", b"get k\r\n"), ("rep", b"VALUE k 0 -1\r\n")])[1] == 1


def test_a_binary_connection_passes_untouched() -> None:
    reply = b"CONFIG cluster 0 %d\r\n%s\r\nEND\r\n" % (len(BLOCK), BLOCK)
    for ops in ([("req", b"\x80\x01"), ("rep", reply)], [("rep", b"\x81" + reply)]):
        assert c_run(ops) == (python_run(ops)[0], None)
        assert b"".join(c_run(ops)[0]).endswith(reply)


def test_a_binary_looking_byte_after_held_bytes_loses_nothing() -> None:
    # Before any request, a reply chunk starting 0x81 is binary only if nothing is held.
    ops: Ops = [("rep", b"\0" * 5), ("rep", b"\x81\r\n")]
    out, err = c_run(ops)
    assert (b"".join(out), err) == (b"\0" * 5 + b"\x81\r\n", None)
    assert same_output(ops)[0]


# -- AddressSanitizer --------------------------------------------------------------

def test_mc_framer_under_address_sanitizer(tmp_path: Path) -> None:
    """Random and structured streams through an ASan/UBSan build of the framer in
    Memcached mode: no error, and the same output as the framer in the extension."""
    cases = asan_cases(random.Random(25), REQUESTS, REPLIES, sampled=0.6, opening=True)
    check_under_address_sanitizer(tmp_path, cases, memcache=True)
