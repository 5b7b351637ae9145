"""Parsed RESP values: ``Frame``, ``parse``/``encode``, and ``Reader``, which buffers a
stream and hands out whole frames.

::

    bytes --Reader--> raw frame bytes --parse()--> Frame --encode()--> bytes
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .framing import (
    _AGGREGATE_TYPES,
    _BULK_TYPES,
    _CR,
    _LINE_TYPES,
    ARRAY,
    ATTRIBUTE,
    BULK,
    CHUNK,
    END,
    MAP,
    MAX_LINE,
    NULL,
    Bytes,
    ProtocolError,
    Scanner,
    _length,
)


class Reader:
    """Buffers a stream and hands out whole frames (each frame's bytes copied once)."""

    __slots__ = ("_buf", "_scanned", "_scanner", "_start")

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._scanner = Scanner(max_line)
        self._buf = bytearray()
        self._start = 0  # first byte of the frame in progress
        self._scanned = 0  # how far the scanner has read

    def feed(self, data: Bytes) -> None:
        if self._start and self._start == len(self._buf):
            self._buf.clear()
            self._start = self._scanned = 0
        self._buf += data

    def next_raw(self) -> bytes | None:
        """The next complete frame's bytes, or None until more data is fed."""
        if self._scanned >= len(self._buf):
            return None
        end = self._scanner.scan(self._buf, self._scanned)
        if end < 0:
            self._scanned = len(self._buf)
            if self._start > len(self._buf) // 2:
                del self._buf[: self._start]
                self._scanned -= self._start
                self._start = 0
            return None
        raw = bytes(self._buf[self._start : end])
        self._start = self._scanned = end
        return raw

    def next_frame(self) -> Frame | None:
        raw = self.next_raw()
        return None if raw is None else parse_one(raw)

    def frames(self) -> list[Frame]:
        """Every complete frame buffered so far, parsed."""
        out: list[Frame] = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress."""
        return len(self._buf) - self._start


@dataclass(slots=True)
class Frame:
    """One parsed RESP value, kept lossless enough to re-encode byte for byte.

    ``kind`` is the type byte as a one-character string. ``value`` is the payload bytes for
    bulk strings (``$ ! =``; a verbatim string keeps its ``txt:`` prefix), the text after the
    type byte for one-line types (``+ - : , # (``), a list of frames for aggregates (a map or
    attribute as a flat key, value, key, value list) and None for nulls (``$-1``, ``*-1``,
    ``_``). ``attrs`` is the RESP3 attribute map that came before the value, if any.
    Streamed strings and aggregates are parsed into their plain form.
    """

    kind: str
    value: bytes | list[Frame] | None
    attrs: Frame | None = None

    @property
    def is_error(self) -> bool:
        return self.kind in "-!"

    @property
    def items(self) -> list[Frame]:
        """The elements of an aggregate (empty for a null or a non-aggregate)."""
        return self.value if isinstance(self.value, list) else []

    @property
    def bytes_value(self) -> bytes | None:
        """The payload of a string-like frame (without a verbatim ``txt:`` prefix)."""
        v = self.value
        if not isinstance(v, bytes):
            return None
        if self.kind == "=" and len(v) >= 4 and v[3:4] == b":":
            return v[4:]
        return v

    def pairs(self) -> list[tuple[Frame, Frame]]:
        """Key/value pairs of a RESP3 map or of its RESP2 form, a flat array."""
        items = self.items
        return [(items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)]

    def to_py(self, _depth: int = 0) -> Any:
        """Plain Python values: bytes, int, float, bool, None, list, dict."""
        if _depth > 64:
            raise ProtocolError("frame nested more than 64 levels deep")
        k, v = self.kind, self.value
        if v is None:
            return None
        if isinstance(v, list):
            if k == "%" or k == "|":
                d = _depth + 1
                return {_hashable(a.to_py(d)): b.to_py(d) for a, b in self.pairs()}
            return [x.to_py(_depth + 1) for x in v]
        if k == ":" or k == "(":
            return int(v)
        if k == ",":
            return float(v)
        if k == "#":
            return v == b"t"
        return self.bytes_value


def _hashable(x: Any) -> Any:
    return tuple(_hashable(i) for i in x) if isinstance(x, list) else x


def bulk(value: bytes | str, kind: str = "$") -> Frame:
    """A bulk string frame (``kind`` "$", "!" or "=")."""
    return Frame(kind, value.encode() if isinstance(value, str) else value)


def integer(value: int) -> Frame:
    return Frame(":", str(value).encode())


def parse(buf: Bytes, pos: int = 0) -> tuple[Frame, int]:
    """Parse the complete frame at ``buf[pos:]``; return it and the offset just past it.

    Iterative, so any nesting depth is fine. Raises ``ProtocolError`` for malformed or
    incomplete input (feed a ``Scanner`` first to know a frame is complete).
    """
    # Open aggregates: [frame, elements left (-1: streamed)].
    stack: list[list[Any]] = []
    attrs: Frame | None = None
    n = len(buf)
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0 or nl - pos < 2 or buf[nl - 1] != _CR:
            raise ProtocolError(f"incomplete or malformed frame at offset {pos}")
        header = buf[pos : nl - 1]
        pos = nl + 1
        t = header[0]
        kind = chr(t)
        item: Frame | None
        if t in _BULK_TYPES:
            if header == b"$?":
                parts: list[bytes] = []
                while True:
                    nl = buf.find(b"\n", pos)
                    if nl < 0 or nl - pos < 2 or buf[nl - 1] != _CR or buf[pos] != CHUNK:
                        raise ProtocolError(f"bad streamed string chunk at offset {pos}")
                    size = _length(buf[pos : nl - 1])
                    pos = nl + 1
                    if size == 0:
                        break
                    end = pos + size
                    if size < 0 or end + 2 > n or buf[end : end + 2] != b"\r\n":
                        raise ProtocolError(f"bad streamed string chunk at offset {pos}")
                    parts.append(bytes(buf[pos : pos + size]))
                    pos += size + 2
                item = Frame("$", b"".join(parts))
            else:
                size = _length(header)
                if size == -1 and t == BULK:
                    item = Frame("$", None)
                else:
                    end = pos + size
                    if size < 0 or end + 2 > n or buf[end : end + 2] != b"\r\n":
                        raise ProtocolError(f"incomplete or malformed bulk string at offset {pos}")
                    item = Frame(kind, bytes(buf[pos:end]))
                    pos = end + 2
        elif t in _LINE_TYPES:
            item = Frame(kind, None if t == NULL else bytes(header[1:]))
        elif t in _AGGREGATE_TYPES:
            streamed = header[1:] == b"?" and t != ATTRIBUTE
            count = -1 if streamed else _length(header)
            if not streamed and count < 0:
                if count != -1 or t != ARRAY:
                    raise ProtocolError(f"bad length in header {bytes(header)!r}")
                item = Frame("*", None)
            else:
                # An attribute before an attribute stays chained to it.
                frame = Frame(kind, [], attrs)
                attrs = None
                if count == 0:
                    item = frame
                else:
                    stack.append([frame, count * 2 if t in (MAP, ATTRIBUTE) and count > 0
                                  else count])
                    continue
        elif t == END:
            if not stack or stack[-1][1] != -1:
                raise ProtocolError(f"'.' outside a streamed aggregate at offset {pos}")
            item = stack.pop()[0]
        else:
            raise ProtocolError(f"unknown RESP type byte {bytes(header[:1])!r} at offset {pos}")
        # Hand the finished item to its parent, closing every aggregate it completes.
        while True:
            assert item is not None
            if item.kind == "|":
                attrs = item
                break
            if attrs is not None and not isinstance(item.value, list):
                item.attrs, attrs = attrs, None
            if not stack:
                return item, pos
            top = stack[-1]
            top[0].value.append(item)
            if top[1] > 0:
                top[1] -= 1
                if top[1] == 0:
                    item = stack.pop()[0]
                    continue
            break


def parse_one(raw: Bytes) -> Frame:
    """Parse ``raw``, which must hold exactly one frame."""
    frame, end = parse(raw)
    if end != len(raw):
        raise ProtocolError(f"{len(raw) - end} bytes after the frame")
    return frame


def encode(frame: Frame) -> bytes:
    """Serialize a frame (iteratively, so any depth is fine)."""
    out: list[bytes] = []
    todo: list[tuple[Frame, bool]] = [(frame, False)]
    while todo:
        f, attrs_done = todo.pop()
        if not attrs_done and f.attrs is not None:
            todo.append((f, True))
            todo.append((f.attrs, False))
            continue
        k, v = f.kind, f.value
        if isinstance(v, list):
            count = len(v) // 2 if k in "%|" else len(v)
            out.append(b"%s%d\r\n" % (k.encode(), count))
            todo.extend((child, False) for child in reversed(v))
        elif v is None:
            out.append(b"_\r\n" if k == "_" else b"%s-1\r\n" % k.encode())
        elif k in "$!=":
            out.append(b"%s%d\r\n%s\r\n" % (k.encode(), len(v), v))
        else:
            out.append(b"%s%s\r\n" % (k.encode(), v))
    return b"".join(out)
