"""The admin endpoint's HTTP/1.1: one request per connection, parsed with hard limits.

Pure parsing (``parse_head``, ``body_length``) apart from the one coroutine that reads
a request off a stream (``read_request``). Every limit is a constant here: what a client
may send (a 16 KiB head, a 64 KiB body, no chunked bodies) and how long it may take
(``READ_TIMEOUT`` for the whole request), so a slow or malformed request costs at most
one small buffer and ends in a clean close.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from .. import __version__

SERVER_HEADER = f"cacheport/{__version__}"
MAX_HEAD = 16 * 1024  # request line and headers; also the stream reader's buffer limit
MAX_BODY = 64 * 1024  # no route reads a body; a reload sends none
READ_TIMEOUT = 5.0  # for the whole request, head and body: a slow sender is cut here
WRITE_TIMEOUT = 30.0  # for the whole answer: a client that never reads is cut here
MAX_CONNECTIONS = 64  # at once; more are closed unanswered

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable"}
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                         "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes = b""
    source: str = ""  # the peer's IP address


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    # A large body (a scrape of thousands of listeners) in pieces, written one at a
    # time: no copy of megabytes in one go on the loop. Sent after ``body``.
    parts: tuple[bytes, ...] = ()

    @classmethod
    def text(cls, status: int, text: str, headers: dict[str, str] | None = None) -> Response:
        return cls(status, (text + "\n").encode(), headers=headers or {})

    @classmethod
    def json(cls, status: int, doc: Any) -> Response:
        body = json.dumps(doc, indent=2, sort_keys=False).encode() + b"\n"
        return cls(status, body, "application/json")


class Malformed(Exception):
    """The request cannot be served; ``response`` says why (400, 413, 431, 501)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _bad(status: int, text: str) -> Malformed:
    return Malformed(Response.text(status, text))


def parse_head(head: bytes) -> Request:
    """The request line and headers (up to and including the blank line); ``Malformed``
    for anything but ``METHOD /target HTTP/1.x`` and ``Name: value`` lines."""
    if len(head) > MAX_HEAD:
        raise _bad(431, "request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if (len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0]
            or not set(parts[0]) <= _TOKEN_CHARS or not parts[1].startswith("/")):
        raise _bad(400, "expected an HTTP/1.x request line")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise _bad(400, "malformed header line")  # never echoed: it may hold a token
        headers[name.lower()] = value.strip()
    path, _, query = target.partition("?")
    return Request(method.upper(), path, query, headers)


def body_length(headers: dict[str, str]) -> int:
    """How many body bytes follow the head; ``Malformed`` for chunked or oversized bodies."""
    if "transfer-encoding" in headers:
        raise _bad(501, "request bodies in Transfer-Encoding are not accepted")
    text = headers.get("content-length")
    if text is None:
        return 0
    if not text.isdigit() or len(text) > 18:
        raise _bad(400, "bad Content-Length")
    length = int(text)
    if length > MAX_BODY:
        raise _bad(413, "request body too large")
    return length


async def read_request(reader: asyncio.StreamReader, source: str) -> Request:
    """One request off ``reader`` (the caller bounds the time); ``Malformed`` if it is not
    one, ``asyncio.IncompleteReadError`` if the client left first."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _bad(431, "request head too large") from None
    request = parse_head(head)
    length = body_length(request.headers)
    body = await reader.readexactly(length) if length else b""
    return Request(request.method, request.path, request.query, request.headers, body, source)


def encode_head(response: Response, head_only: bool) -> bytes:
    """Status line, headers and ``response.body`` (``parts`` follow it on the wire)."""
    headers = {
        "Content-Type": response.content_type,
        "Content-Length": str(len(response.body) + sum(map(len, response.parts))),
        "Cache-Control": "no-store",
        "Connection": "close",
        # ``cacheport healthcheck`` tells this endpoint from another process on the port
        "Server": SERVER_HEADER,
        **response.headers,
    }
    head = f"HTTP/1.1 {response.status} {REASONS.get(response.status, '')}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + (b"" if head_only else response.body)
