"""Fuzzing the ClientHello reader (issue 28: every network parser is fuzzed).

Whatever the bytes, ``parse`` returns None (need more), a ClientHello no longer than
what it was given, or raises ``HelloError`` with a known reason -- never another
exception, never a hang. A real hello keeps its name however it is cut into records and
segments, and a hello with bytes flipped or cut is read or refused, nothing else.
"""

from __future__ import annotations

import ssl

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocols.tls_hello import MAX_HELLO, ClientHello, HelloError, parse

REASONS = {"not_tls", "client_hello_malformed", "client_hello_too_large"}
NAME = "node-0002.abc123.use1.cache.amazonaws.com"


def _hello(name: str | None, version: ssl.TLSVersion) -> bytes:
    ctx = ssl.create_default_context()
    if name is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


HELLOS = [_hello(NAME, ssl.TLSVersion.TLSv1_3), _hello(NAME, ssl.TLSVersion.TLSv1_2),
          _hello(None, ssl.TLSVersion.TLSv1_3)]


def _check(data: bytes, limit: int = MAX_HELLO) -> ClientHello | None:
    try:
        found = parse(data, limit)
    except HelloError as exc:
        assert exc.reason in REASONS, exc.reason
        return None
    assert found is None or 0 < found.length <= len(data)
    return found


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_are_read_refused_or_wait(data: bytes) -> None:
    _check(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_behind_a_handshake_record_header(tail: bytes) -> None:
    """Past the first check: a record header that looks right, then anything."""
    _check(b"\x16\x03\x01" + tail)
    _check(b"\x16\x03\x01" + len(tail).to_bytes(2, "big") + b"\x01" + tail)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(HELLOS), st.lists(st.integers(1, 700), min_size=1, max_size=40),
       st.integers(0, 2000))
def test_a_real_hello_in_any_records_and_any_prefix(hello: bytes, sizes: list[int],
                                                    prefix: int) -> None:
    body, stream, i = hello[5:], b"", 0
    while i < len(body):
        size = sizes[len(stream) % len(sizes)]
        piece = body[i:i + size]
        stream += bytes([22, 3, 1]) + len(piece).to_bytes(2, "big") + piece
        i += size
    expected = parse(hello)
    assert expected is not None
    assert parse(stream) == ClientHello(expected.server_name, len(stream))
    if prefix < len(stream):
        assert parse(stream[:prefix]) is None  # a legal stream cut short only waits


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(HELLOS), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)),
                                         min_size=1, max_size=8), st.integers(0, 2000))
def test_a_real_hello_with_bytes_flipped_or_cut(hello: bytes, flips: list[tuple[int, int]],
                                                cut: int) -> None:
    data = bytearray(hello)
    for at, value in flips:
        data[at % len(data)] = value
    _check(bytes(data))
    _check(bytes(data[:cut]))
    _check(bytes(data), limit=cut + 1)
