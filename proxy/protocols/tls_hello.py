"""The server name a TLS client asks for, read from its ClientHello (no TLS terminated).

::

    client --[record 22 | handshake 1: ClientHello ... server_name ...]--> parse() -> name

Like nginx's ``ssl_preread`` and HAProxy's ``req.ssl_sni``: the listener peeks at the
first bytes, ``parse`` says "need more", "here is the hello (and how many bytes of
records carried it)" or why the bytes are refused, and the stream then goes to the
upstream untouched. Sans-IO, bounded: a hello may span records (RFC 8446 §5.1 lets a
handshake message be fragmented) and TCP segments, but never more than ``MAX_HELLO``
bytes of records.

Layout (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2, RFC 6066 §3)::

    record:       type(1)=22  legacy_version(2)=3.x  length(2)<=2^14  fragment
    handshake:    msg_type(1)=1  length(3)  ClientHello
    ClientHello:  legacy_version(2) random(32) session_id<0..32> cipher_suites<2..2^16-2>
                  compression_methods<1..2^8-1> [extensions<8..2^16-1>]
    extension:    type(2) data<0..2^16-1>; server_name (0): ServerNameList<1..2^16-1>
    ServerName:   name_type(1)=0 (host_name)  HostName<1..2^16-1>
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HANDSHAKE_RECORD = 22
CLIENT_HELLO = 1
SERVER_NAME = 0  # the extension's type
HOST_NAME = 0  # the ServerName's name_type
MAX_RECORD = 1 << 14  # a plaintext record's fragment (RFC 8446 §5.1)
MAX_HELLO = 16 << 10  # bytes of records a hello may take before it is refused
_RECORD_HEADER = 5
# A DNS name (RFC 1123 labels; '_' tolerated as resolvers do), no trailing dot.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


class HelloError(ValueError):
    """Bytes that are not a ClientHello cacheport will route; ``reason`` is the counter's."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _malformed(detail: str) -> HelloError:
    return HelloError("client_hello_malformed", detail)


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What routing needs: the name asked for (None: no server_name) and the record bytes
    that carried the hello (they stay in the stream for the upstream)."""

    server_name: str | None
    length: int


def parse(data: bytes, limit: int = MAX_HELLO) -> ClientHello | None:
    """The ClientHello at the start of ``data``, or None while it is incomplete.

    Raises ``HelloError``: ``not_tls`` (the first bytes are no TLS handshake record),
    ``client_hello_malformed`` or ``client_hello_too_large`` (over ``limit`` bytes).
    """
    if data[:1] and data[0] != HANDSHAKE_RECORD:
        raise HelloError("not_tls", f"first byte {data[0]:#04x} is not a TLS handshake record")
    if len(data) >= 2 and data[1] != 3:
        raise HelloError("not_tls", f"record version {data[1]}.x is not TLS")
    body = bytearray()
    pos = 0
    while len(data) - pos >= _RECORD_HEADER:
        kind, major = data[pos], data[pos + 1]
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        if kind != HANDSHAKE_RECORD or major != 3:
            raise _malformed(f"record type {kind} version {major}.x before the hello ended")
        if length == 0 or length > MAX_RECORD:
            raise _malformed(f"handshake record of {length} bytes")
        end = pos + _RECORD_HEADER + length
        if end > limit:
            raise HelloError("client_hello_too_large", f"more than {limit} bytes of records")
        if end > len(data):
            break
        body += data[pos + _RECORD_HEADER:end]
        pos = end
        if len(body) >= 4:
            if body[0] != CLIENT_HELLO:
                raise _malformed(f"handshake message {body[0]} is not a ClientHello")
            size = 4 + int.from_bytes(body[1:4], "big")
            # The rest needs at least one more record header per 2^14 bytes.
            if pos + (size - len(body)) > limit:
                raise HelloError("client_hello_too_large",
                                 f"a ClientHello of {size - 4} bytes (limit {limit})")
            if len(body) >= size:
                if len(body) > size:
                    raise _malformed("bytes after the ClientHello in its records")
                return ClientHello(_server_name(bytes(body[4:size])), pos)
    if len(data) >= limit:
        raise HelloError("client_hello_too_large", f"more than {limit} bytes of records")
    return None


class _Reader:
    """Big-endian fields and length-prefixed vectors; running short is malformed."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _malformed(f"{what} runs past the end of its field")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def number(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, width: int, what: str, low: int = 0, high: int | None = None) -> bytes:
        chunk = self.take(self.number(width, what), what)
        if len(chunk) < low or (high is not None and len(chunk) > high):
            raise _malformed(f"{what} of {len(chunk)} bytes")
        return chunk

    @property
    def done(self) -> bool:
        return self.pos == len(self.data)


def _server_name(hello: bytes) -> str | None:
    r = _Reader(hello)
    r.take(2, "legacy_version")
    r.take(32, "random")
    r.vector(1, "legacy_session_id", 0, 32)
    if len(r.vector(2, "cipher_suites", 2)) % 2:
        raise _malformed("cipher_suites of an odd length")
    r.vector(1, "compression_methods", 1)
    if r.done:
        return None  # no extensions (a TLS 1.0-era hello): no name
    extensions = _Reader(r.vector(2, "extensions"))
    if not r.done:
        raise _malformed("bytes after the extensions")
    seen: set[int] = set()
    name = None
    while not extensions.done:
        kind = extensions.number(2, "extension type")
        data = extensions.vector(2, "extension")
        if kind in seen:  # RFC 8446 §4.2: at most one of each
            raise _malformed(f"extension {kind} twice")
        seen.add(kind)
        if kind == SERVER_NAME:
            name = _host_name(data)
    return name


def _host_name(data: bytes) -> str:
    outer = _Reader(data)
    names = _Reader(outer.vector(2, "server_name_list", 1))
    if not outer.done:
        raise _malformed("bytes after server_name_list")
    host = None
    while not names.done:
        kind = names.number(1, "name_type")
        value = names.vector(2, "server name", 1)
        if kind != HOST_NAME:
            continue  # no other type is defined; skip what a future one would be
        if host is not None:  # RFC 6066 §3: one name per type
            raise _malformed("two host_name entries")
        host = _check_name(value)
    if host is None:
        raise _malformed("server_name without a host_name")
    return host


def _check_name(value: bytes) -> str:
    """The name as DNS would take it (lower case), or malformed: it may become a host."""
    try:
        name = value.decode("ascii").lower()
    except UnicodeDecodeError:
        raise _malformed("server name is not ASCII") from None
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise _malformed(f"server name {name[:64]!r} is not a DNS name")
    return name
