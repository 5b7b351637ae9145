"""The PROXY header parser against HAProxy's doc/proxy-protocol.txt (its examples and rules)."""

from __future__ import annotations

import socket
import struct

import pytest

from proxy.protocols.proxy_header import MAX_HEADER, V2_SIGNATURE, Header, HeaderError, parse

# Section 2.1's example, verbatim, followed by the request it precedes.
V1_EXAMPLE = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n"


def v2(command: int, fam: int, body: bytes) -> bytes:
    """A v2 header as section 2.2 lays it out: signature, ver|cmd, fam, len, body."""
    return V2_SIGNATURE + bytes([0x20 | command, fam]) + struct.pack("!H", len(body)) + body


def v2_tcp4(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return v2(1, 0x11, body + tlvs)


def test_v1_example_from_the_spec_is_consumed_up_to_its_crlf() -> None:
    header = parse(V1_EXAMPLE, "v1")
    assert header == Header(1, 47, ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert V1_EXAMPLE[header.length:].startswith(b"GET /")


def test_v1_longest_lines_the_spec_lists_are_accepted() -> None:
    four = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(four) == 56 and parse(four, "any") is not None
    six = b"PROXY TCP6 " + b":".join([b"ffff"] * 8) * 1 + b" " + \
        b":".join([b"ffff"] * 8) + b" 65535 65535\r\n"
    assert len(six) == 104
    header = parse(six, "any")
    assert header is not None and header.source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                                                    65535)


def test_v1_unknown_uses_the_real_peer_and_ignores_the_rest_of_the_line() -> None:
    assert parse(b"PROXY UNKNOWN\r\nx", "v1") == Header(1, 15)
    worst = b"PROXY UNKNOWN " + b":".join([b"ffff"] * 8) + b" " + \
        b":".join([b"ffff"] * 8) + b" 65535 65535\r\n"
    assert len(worst) == 107 and parse(worst, "v1") == Header(1, 107)


@pytest.mark.parametrize("partial", [b"", b"P", b"PROXY", b"PROXY TCP4 1.2.3.4", b"\r\n",
                                     V2_SIGNATURE[:11], V2_SIGNATURE + b"\x21\x11\x00"])
def test_an_incomplete_header_asks_for_more(partial: bytes) -> None:
    assert parse(partial, "any") is None


@pytest.mark.parametrize("line, why", [
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n", "bare LF"),
    (b"PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n", "not an IP"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n", "no leading zero"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n", "not a port"),
    (b"PROXY TCP4 ::1 ::1 1 2\r\n", "does not match"),
    (b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n", "does not match"),
    (b"PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "is not PROXY"),
    (b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n", "is not PROXY"),
    (b"PROXY TCP4 " + b"1" * 120, "without CRLF"),
])
def test_v1_lines_that_do_not_match_exactly_are_refused(line: bytes, why: str) -> None:
    with pytest.raises(HeaderError, match=why):
        parse(line, "v1")


def test_v2_tcp4_with_tlvs_is_consumed_whole() -> None:
    tlv = bytes([0x04]) + struct.pack("!H", 3) + b"abc"  # PP2_TYPE_NOOP
    data = v2_tcp4("198.51.100.27", "10.0.0.5", 40000, 6379, tlv) + b"*1\r\n$4\r\nPING\r\n"
    header = parse(data, "v2")
    assert header == Header(2, 16 + 12 + 6, ("198.51.100.27", 40000), ("10.0.0.5", 6379))
    assert data[header.length:] == b"*1\r\n$4\r\nPING\r\n"


def test_v2_tcp6() -> None:
    body = socket.inet_pton(socket.AF_INET6, "2001:db8::1") + \
        socket.inet_pton(socket.AF_INET6, "2001:db8::2") + struct.pack("!HH", 1, 2)
    header = parse(v2(1, 0x21, body), "any")
    assert header is not None and header.source == ("2001:db8::1", 1)


def test_v2_local_ignores_its_address_block_but_skips_it() -> None:
    # "Receivers MUST always consider this field to skip the appropriate number of bytes
    # and must not assume zero is presented for LOCAL connections."
    data = v2(0, 0x11, b"\x00" * 12) + b"rest"
    assert parse(data, "v2") == Header(2, 28)


@pytest.mark.parametrize("data, why", [
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version 1"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12, "command 2"),
    (V2_SIGNATURE + b"\x21\x41\x00\x0c" + b"\x00" * 12, "not defined"),
    (V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4, "too short"),
    (V2_SIGNATURE + b"\x21\x12\x00\x0c" + b"\x00" * 12, "not TCP"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", f"longer than {MAX_HEADER}"),
    (b"*1\r\n$4\r\nPING\r\n", "no PROXY header"),
    (b"GET / HTTP/1.1\r\n", "no PROXY header"),
    (b"\r\n\r\nxx", "no PROXY header"),
])
def test_v2_and_other_bytes_that_are_not_a_header_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(HeaderError, match=why):
        parse(data, "any")


def test_a_listener_refuses_the_version_it_was_not_configured_for() -> None:
    with pytest.raises(HeaderError, match="v1 only"):
        parse(v2_tcp4("1.2.3.4", "5.6.7.8", 1, 2), "v1")
    with pytest.raises(HeaderError, match="v2 only"):
        parse(V1_EXAMPLE, "v2")
    assert parse(V1_EXAMPLE, "any") is not None
    assert parse(v2_tcp4("1.2.3.4", "5.6.7.8", 1, 2), "any") is not None
