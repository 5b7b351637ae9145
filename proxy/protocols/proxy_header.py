"""The PROXY protocol header (HAProxy's doc/proxy-protocol.txt, versions 1 and 2), sans-IO.

::

    load balancer --"PROXY TCP4 ..."\\r\\n | \\r\\n\\r\\n\\0\\r\\nQUIT\\n...--> listener
                                       parse(peeked bytes) -> Header | None (need more)

A load balancer (an AWS NLB with proxy protocol v2, HAProxy ``send-proxy[-v2]``) puts
the real client's address in front of the stream. ``parse`` looks at the first bytes
the listener peeked and says how long the header is and what it carries, so the
listener can consume exactly those bytes and hand the rest of the stream, untouched,
to any relay. It never reads a socket and never guesses: bytes that are not a header
are an error (the spec forbids sharing a port between headers and no headers).

Why not a library: the PyPI packages for this (``proxy-protocol``, ``proxyprotocol``)
own the socket or the asyncio stream, which the listener must not give away before it
picks a relay, and they accept more than the spec allows (leading zeros, bare LF).
This is ~100 lines checked against the spec's own examples in the tests.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Literal

Mode = Literal["off", "v1", "v2", "any"]
MODES: tuple[Mode, ...] = ("off", "v1", "v2", "any")

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's worst case line, CRLF included
# v2 allows 65535 bytes of TLVs; an NLB sends tens (a VPC endpoint id). A bound keeps a
# peer from making the listener hold a large buffer before it has said who it is.
MAX_HEADER = 1024


class HeaderError(ValueError):
    """The bytes are not an acceptable PROXY header; the message is the logged reason."""


@dataclass(frozen=True, slots=True)
class Header:
    """A complete header: ``length`` bytes to consume, and the client it names.

    ``source`` is None for a v2 LOCAL command (the proxy's own health check) or a v1
    UNKNOWN line: the connection's real peer is then the client, per the spec.
    """

    version: int
    length: int
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def _v1_number(text: bytes, what: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[:1] == b"0") or int(text) > 65535:
        raise HeaderError(f"v1 {what} {text[:8]!r} is not a port (0-65535, no leading zero)")
    return int(text)


def _v1_address(text: bytes, family: bytes) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise HeaderError(f"v1 address {text[:40]!r} is not an IP address") from None
    if (family == b"TCP4") != (address.version == 4):
        raise HeaderError(f"v1 address {text[:40]!r} does not match {family.decode()}")
    if address.version == 4 and str(address).encode() != text:
        # ipaddress refuses leading zeros already; this also refuses anything non-canonical.
        raise HeaderError(f"v1 address {text!r} is not in canonical form")
    return str(address)


def _parse_v1(data: bytes) -> Header | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise HeaderError(f"v1 line without CRLF in its first {V1_MAX} bytes")
        if b"\n" in data:
            raise HeaderError("v1 line ends with a bare LF, not CRLF")
        return None
    line = data[:end]
    parts = line.split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return Header(1, end + 2)  # the rest of the line is ignored, per the spec
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise HeaderError(f"v1 line {line[:60]!r} is not PROXY TCP4|TCP6 src dst sport dport")
    family = parts[1]
    source = _v1_address(parts[2], family)
    destination = _v1_address(parts[3], family)
    sport = _v1_number(parts[4], "source port")
    dport = _v1_number(parts[5], "destination port")
    return Header(1, end + 2, (source, sport), (destination, dport))


def _parse_v2(data: bytes) -> Header | None:
    if len(data) < 16:
        return None
    ver_cmd, fam, length = struct.unpack_from("!BBH", data, 12)
    if ver_cmd >> 4 != 2:
        raise HeaderError(f"v2 version {ver_cmd >> 4} (only 2 exists)")
    command = ver_cmd & 0xF
    if command > 1:
        raise HeaderError(f"v2 command {command} is neither LOCAL (0) nor PROXY (1)")
    total = 16 + length
    if total > MAX_HEADER:
        raise HeaderError(f"v2 header of {total} bytes is longer than {MAX_HEADER}")
    if len(data) < total:
        return None
    family, transport = fam >> 4, fam & 0xF
    if family > 3 or transport > 2:
        raise HeaderError(f"v2 family/protocol byte 0x{fam:02x} is not defined")
    if command == 0 or fam == 0x00:
        return Header(2, total)  # LOCAL, or UNSPEC: use the connection's own peer
    if family in (1, 2) and transport == 1:
        size = 4 if family == 1 else 16
        if length < 2 * size + 4:
            raise HeaderError(f"v2 address block of {length} bytes is too short for "
                              f"{'IPv4' if family == 1 else 'IPv6'}")
        body = data[16:16 + 2 * size + 4]
        src = str(ipaddress.ip_address(body[:size]))
        dst = str(ipaddress.ip_address(body[size:2 * size]))
        sport, dport = struct.unpack_from("!HH", body, 2 * size)
        return Header(2, total, (src, sport), (dst, dport))
    # UDP or AF_UNIX: a valid header, but not a TCP client this listener can admit by IP.
    raise HeaderError(f"v2 family/protocol 0x{fam:02x} is not TCP over IPv4 or IPv6")


def parse(data: bytes, mode: Mode) -> Header | None:
    """The header at the start of ``data``, or None while more bytes are needed.

    ``mode`` is which versions the listener accepts (``any``: both). Raises
    ``HeaderError`` as soon as the bytes cannot become an acceptable header.
    """
    if mode == "off":
        raise ValueError("parse() needs a mode other than off")
    probe = min(len(data), len(V2_SIGNATURE))
    if data[:probe] == V2_SIGNATURE[:probe]:
        if probe < len(V2_SIGNATURE):
            # Both prefixes are needed to tell: "\r\n" may still turn out to be neither.
            return None
        if mode == "v1":
            raise HeaderError("a v2 header on a listener that accepts v1 only")
        return _parse_v2(data)
    probe = min(len(data), len(V1_PREFIX))
    if data[:probe] == V1_PREFIX[:probe]:
        if probe < len(V1_PREFIX):
            return None
        if mode == "v2":
            raise HeaderError("a v1 header on a listener that accepts v2 only")
        return _parse_v1(data)
    raise HeaderError(f"no PROXY header: the stream starts with {data[:16]!r}")
