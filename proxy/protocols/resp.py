"""Sans-IO RESP2/RESP3: frame boundaries, parsed frames, requests and reply matching.

::

    upstream bytes --Scanner.scan--> end offset of each complete reply frame (no copy)
                   --Framer-------> (start, end) stream offsets of each frame
                   --Reader-------> raw frame bytes --parse()--> Frame --encode()--> bytes
    client bytes   --RequestParser--> Command(name, args, argc) for each command
    Commands + reply frames --Conversation--> which command each reply answers

Nothing here touches a socket. The scanner's state between chunks is tiny (the open
aggregate counts, how much of a bulk payload is left, a header line cut in two), so it can
be fed any split of the stream and never has to hold a bulk payload: a caller that passes
bytes through forwards them as they arrive.

Every RESP3 type is framed: ``$ ! =`` bulk strings, ``+ - : _ , # (`` one-line types,
``* % ~ >`` aggregates, ``|`` attributes (framed together with the value they annotate) and
streamed strings (``$?`` + ``;n`` chunks) and aggregates (``*?`` ... ``.``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

# Type bytes.
BULK: Final = 0x24  # $
BULK_ERROR: Final = 0x21  # !
VERBATIM: Final = 0x3D  # =
SIMPLE: Final = 0x2B  # +
ERROR: Final = 0x2D  # -
INTEGER: Final = 0x3A  # :
NULL: Final = 0x5F  # _
DOUBLE: Final = 0x2C  # ,
BOOLEAN: Final = 0x23  # #
BIGNUM: Final = 0x28  # (
ARRAY: Final = 0x2A  # *
MAP: Final = 0x25  # %
SET: Final = 0x7E  # ~
PUSH: Final = 0x3E  # >
ATTRIBUTE: Final = 0x7C  # |
CHUNK: Final = 0x3B  # ;  (a piece of a streamed string)
END: Final = 0x2E  # .  (end of a streamed aggregate)

_CR: Final = 0x0D
_LF: Final = 0x0A
_LINE_TYPES: Final = frozenset((SIMPLE, ERROR, INTEGER, NULL, DOUBLE, BOOLEAN, BIGNUM))
_BULK_TYPES: Final = frozenset((BULK, BULK_ERROR, VERBATIM))
_AGGREGATE_TYPES: Final = frozenset((ARRAY, MAP, SET, PUSH, ATTRIBUTE))

MAX_LINE: Final = 1 << 20
"""Longest header or one-line reply accepted (1 MiB); longer means a broken stream."""
MAX_INLINE: Final = 64 * 1024
"""Redis's own limit on an inline command or a multibulk header (PROTO_INLINE_MAX_SIZE)."""
MAX_BULK: Final = 512 * 1024 * 1024
"""Redis's default proto-max-bulk-len: the largest request argument it accepts."""

Bytes = bytes | bytearray


class ProtocolError(ValueError):
    """The byte stream is not valid RESP; the message says what was wrong and where."""


class RequestError(ProtocolError):
    """A client sent something Redis would reject and close the connection for.

    ``commands`` holds the commands parsed from the same chunk before the bad bytes.
    """

    def __init__(self, message: str, commands: list[Command]) -> None:
        super().__init__(message)
        self.commands = commands


def _length(header: Bytes) -> int:
    try:
        return int(header[1:])
    except ValueError:
        raise ProtocolError(f"bad length in header {bytes(header[:40])!r}") from None


class Scanner:
    """Finds where each top-level frame ends, across chunks, without copying payloads.

    ``scan(data, pos)`` walks ``data`` from ``pos``: it returns the offset just past the
    first top-level frame that completes in ``data``, or -1 when ``data`` ends first (all of
    ``data[pos:]`` is then consumed into the scanner's state, so the next call starts at the
    next chunk's first byte). Between frames ``idle`` is true.
    """

    __slots__ = ("_line", "_skip", "_stack", "_stream", "max_line")

    def __init__(self, max_line: int = MAX_LINE) -> None:
        # Open aggregates, innermost last: n > 0 elements left; 0 a streamed aggregate
        # (ends at "."); -n an attribute with n elements left (it is not an element itself).
        self._stack: list[int] = []
        self._skip = 0  # bytes left of the current payload, its CRLF included
        self._line = bytearray()  # a header line cut by the end of a chunk
        self._stream = False  # inside a streamed string ($?)
        self.max_line = max_line

    @property
    def idle(self) -> bool:
        """True between frames (no partial frame is in progress)."""
        return not (self._stack or self._skip or self._line or self._stream)

    @property
    def depth(self) -> int:
        """How many aggregates are open (0 at the top level)."""
        return len(self._stack)

    def reset(self) -> None:
        self._stack.clear()
        self._skip = 0
        self._line.clear()
        self._stream = False

    def scan(self, data: Bytes, pos: int = 0) -> int:
        n = len(data)
        stack = self._stack
        while True:
            if self._skip:
                # Inside a payload: pass it, checking the CRLF that closes it.
                skip = self._skip
                avail = n - pos
                if skip > avail:
                    rest = skip - avail
                    if rest == 1 and avail and data[n - 1] != _CR:
                        raise ProtocolError("bulk payload not followed by CRLF")
                    self._skip = rest
                    return -1
                end = pos + skip
                if (skip >= 2 and data[end - 2] != _CR) or data[end - 1] != _LF:
                    raise ProtocolError("bulk payload not followed by CRLF")
                self._skip = 0
                pos = end
                if self._stream:
                    continue  # a chunk of a streamed string: not an element by itself
            else:
                if pos >= n:
                    return -1
                # Read one header line.
                nl = data.find(b"\n", pos)
                if self._line:
                    if nl < 0:
                        self._line += data[pos:]
                        if len(self._line) > self.max_line:
                            raise ProtocolError(f"line longer than {self.max_line} bytes")
                        return -1
                    self._line += data[pos : nl + 1]
                    full = bytes(self._line)
                    self._line.clear()
                    pos = nl + 1
                    if len(full) < 3 or full[-2] != _CR:
                        raise ProtocolError(f"line not ended by CRLF: {full[:40]!r}")
                    header: Bytes = full[:-2]
                else:
                    if nl < 0:
                        if n - pos > self.max_line:
                            raise ProtocolError(f"line longer than {self.max_line} bytes")
                        self._line += data[pos:]
                        return -1
                    if nl - pos < 2 or data[nl - 1] != _CR:
                        raise ProtocolError(
                            f"line not ended by CRLF: {bytes(data[pos : min(nl + 1, pos + 40)])!r}"
                        )
                    header = data[pos : nl - 1]
                    pos = nl + 1
                t = header[0]
                if self._stream and t != CHUNK:
                    raise ProtocolError(f"expected ';' in a streamed string, got {chr(t)!r}")
                if t == BULK or t == VERBATIM or t == BULK_ERROR:
                    if t == BULK and header == b"$?":
                        self._stream = True
                        continue
                    size = _length(header)
                    if size < 0:
                        if size != -1 or t != BULK:
                            raise ProtocolError(f"bad length in header {bytes(header)!r}")
                    else:
                        end = pos + size + 2
                        if end > n:
                            self._skip = size + 2
                            continue
                        if data[end - 2] != _CR or data[end - 1] != _LF:
                            raise ProtocolError("bulk payload not followed by CRLF")
                        pos = end
                elif t in _LINE_TYPES:
                    pass
                elif t in _AGGREGATE_TYPES:
                    if len(header) == 2 and header[1] == 0x3F and t != ATTRIBUTE:  # "*?"
                        stack.append(0)
                        continue
                    count = _length(header)
                    if count > 0:
                        if t == MAP or t == ATTRIBUTE:
                            count *= 2
                        stack.append(-count if t == ATTRIBUTE else count)
                        continue
                    if count < 0 and (count != -1 or t != ARRAY):
                        raise ProtocolError(f"bad length in header {bytes(header)!r}")
                    if t == ATTRIBUTE:
                        continue  # an empty attribute annotates the next value
                elif t == CHUNK:
                    if not self._stream:
                        raise ProtocolError("';' outside a streamed string")
                    size = _length(header)
                    if size < 0:
                        raise ProtocolError(f"bad length in header {bytes(header)!r}")
                    if size:
                        self._skip = size + 2
                        continue
                    self._stream = False
                elif t == END:
                    if not stack or stack[-1] != 0:
                        raise ProtocolError("'.' outside a streamed aggregate")
                    stack.pop()
                else:
                    raise ProtocolError(f"unknown RESP type byte {bytes(header[:1])!r}")
            # One element is complete: close every aggregate it completes.
            while stack:
                c = stack[-1]
                if c > 1:
                    stack[-1] = c - 1
                    break
                if c == 1:
                    stack.pop()
                    continue
                if c == 0:
                    break
                if c < -1:
                    stack[-1] = c + 1
                    break
                stack.pop()  # an attribute ended: the value it annotates comes next
                break
            else:
                return pos


class Framer:
    """Frame boundaries as absolute stream offsets; holds no bytes at all.

    ``feed(chunk)`` returns ``(start, end)`` of every frame that ended in that chunk,
    counted from the first byte ever fed, so a caller that keeps its own buffer (or
    forwards bytes straight on) knows exactly where each reply starts and ends.
    """

    __slots__ = ("_scanner", "_start", "position")

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._scanner = Scanner(max_line)
        self._start = 0
        self.position = 0  # total bytes fed so far

    def feed(self, data: Bytes) -> list[tuple[int, int]]:
        frames: list[tuple[int, int]] = []
        pos = 0
        base = self.position
        n = len(data)
        while pos < n:
            end = self._scanner.scan(data, pos)
            if end < 0:
                break
            frames.append((self._start, base + end))
            self._start = base + end
            pos = end
        self.position = base + n
        return frames


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


# --------------------------------------------------------------------------- requests


class Command(NamedTuple):
    """One client command, reduced to what matching replies to it needs.

    ``name`` is lower-cased (b"" if it was too long to capture); ``args`` are the leading
    arguments after the name, as sent, as many as the parser captures (it stops at the first
    one longer than its limit); ``argc`` counts every argument after the name. (A named
    tuple: one is made per command on the hot path, and tuples are the cheapest to make.)
    """

    name: bytes
    args: tuple[bytes, ...] = ()
    argc: int = 0
    inline: bool = False

    def arg(self, i: int) -> bytes | None:
        """Argument ``i`` (0 = first after the name), lower-cased, if captured."""
        return self.args[i].lower() if i < len(self.args) else None


_WS: Final = b" \t\n\r\x0b\x0c"
_ESCAPES: Final = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_HEX: Final = b"0123456789abcdefABCDEF"


def split_inline(line: Bytes) -> list[bytes]:
    """Split an inline command the way Redis does (``sdssplitargs``): quotes and escapes."""
    nul = line.find(b"\0")
    if nul >= 0:
        line = line[:nul]
    n = len(line)
    args: list[bytes] = []
    i = 0
    while True:
        while i < n and line[i] in _WS:
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        quote = 0  # 0, '"' or "'"
        while True:
            c = line[i] if i < n else 0
            if quote == 0x22:
                if c == 0x5C and i + 3 < n and line[i + 1] == 0x78 and line[i + 2] in _HEX \
                        and line[i + 3] in _HEX:
                    cur.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 0x5C and i + 1 < n:
                    i += 1
                    cur.append(_ESCAPES.get(line[i], line[i]))
                elif c == 0x22:
                    if i + 1 < n and line[i + 1] not in _WS:
                        raise ProtocolError("unbalanced quotes in inline request")
                    i += 1
                    break
                elif i >= n:
                    raise ProtocolError("unbalanced quotes in inline request")
                else:
                    cur.append(c)
            elif quote == 0x27:
                if c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    i += 1
                    cur.append(0x27)
                elif c == 0x27:
                    if i + 1 < n and line[i + 1] not in _WS:
                        raise ProtocolError("unbalanced quotes in inline request")
                    i += 1
                    break
                elif i >= n:
                    raise ProtocolError("unbalanced quotes in inline request")
                else:
                    cur.append(c)
            else:
                if i >= n or c in b" \n\r\t":
                    break
                if c == 0x22 or c == 0x27:
                    quote = c
                else:
                    cur.append(c)
            i += 1
        args.append(bytes(cur))


class RequestParser:
    """Splits a client's byte stream into commands, multibulk (``*``) or inline.

    It follows Redis's own reading rules (``processMultibulkBuffer``, ``processInlineBuffer``):
    a ``*0`` or ``*-1`` header and an empty inline line are no command (and get no reply);
    bulk payloads are skipped, not copied, except the name and the first ``capture`` short
    arguments (only for the commands named in ``capture_for``, if given). Malformed input
    raises ``RequestError`` (Redis answers it with an error and closes the connection).
    """

    __slots__ = (
        "_args", "_cap", "_capturing", "_left", "_line", "_skip", "_total",
        "capture", "capture_for", "max_capture",
    )

    def __init__(self, capture: int = 2, max_capture: int = 512,
                 capture_for: Iterable[bytes] | None = None) -> None:
        self.capture = capture  # arguments kept after the name
        self.max_capture = max_capture  # longest argument kept
        self.capture_for = None if capture_for is None else frozenset(
            c.lower() for c in capture_for)
        self._left = 0  # bulk arguments still to read in the current command
        self._total = 0
        self._args: list[bytes] = []
        self._capturing = False  # still collecting leading arguments
        self._cap: bytearray | None = None  # an argument being captured across chunks
        self._skip = 0  # payload bytes (with CRLF) left of the current argument
        self._line = bytearray()

    @property
    def idle(self) -> bool:
        return not (self._left or self._skip or self._line)

    def _done_arg(self, value: bytes | None) -> Command | None:
        if self._capturing:
            if value is None or len(self._args) > self.capture:
                self._capturing = False
            else:
                self._args.append(value)
                if (len(self._args) == 1 and self.capture_for is not None
                        and value.lower() not in self.capture_for):
                    self._capturing = False
        self._left -= 1
        if self._left:
            return None
        args = self._args
        name = args[0].lower() if args else b""
        return Command(name, tuple(args[1:]), self._total - 1)

    def feed(self, data: Bytes) -> list[Command]:
        """Commands completed by ``data``; raises ``RequestError`` for malformed input."""
        out: list[Command] = []
        try:
            self._feed(data, out)
        except ProtocolError as exc:
            raise RequestError(str(exc), out) from None
        return out

    def _whole(self, data: Bytes, pos: int, n: int) -> tuple[Command, int] | None:
        """The multibulk command at ``pos`` if it is complete and well formed in ``data``.

        The fast path for pipelined traffic; None sends the caller down the byte-by-byte
        state machine, which also produces the errors for malformed input. Like Redis, it
        skips the two bytes after a bulk argument without looking at them.
        """
        find = data.find
        nl = find(b"\r\n", pos)
        if nl < 0:
            return None
        try:
            count = int(data[pos + 1 : nl])
        except ValueError:
            return None
        if count <= 0 or count > 1048576:
            return None
        p = nl + 2
        keep = self.capture + 1
        max_capture = self.max_capture
        args: list[bytes] = []
        dollar = BULK
        for _ in range(count):
            if p >= n or data[p] != dollar:
                return None
            nl = find(b"\r\n", p)
            if nl < 0:
                return None
            try:
                size = int(data[p + 1 : nl])
            except ValueError:
                return None
            p = nl + 4 + size
            if size < 0 or p > n:
                return None
            if keep:
                if size <= max_capture and len(args) < keep:
                    args.append(bytes(data[nl + 2 : p - 2]))
                    if len(args) == 1 and self.capture_for is not None \
                            and args[0].lower() not in self.capture_for:
                        keep = 0
                else:
                    keep = 0
        return Command(args[0].lower() if args else b"", tuple(args[1:]), count - 1), p

    def _feed(self, data: Bytes, out: list[Command]) -> None:
        n = len(data)
        pos = 0
        while True:
            if not self._left and not self._skip and not self._line and pos < n \
                    and data[pos] == ARRAY:
                whole = self._whole(data, pos, n)
                if whole is not None:
                    out.append(whole[0])
                    pos = whole[1]
                    continue
            if self._skip:
                skip = self._skip
                take = min(skip, n - pos)
                if self._cap is not None:
                    self._cap += data[pos : pos + take]
                pos += take
                self._skip = skip - take
                if self._skip:
                    return
                value: bytes | None = None
                if self._cap is not None:
                    value = bytes(self._cap[:-2])
                    self._cap = None
                cmd = self._done_arg(value)
                if cmd is not None:
                    out.append(cmd)
                continue
            if pos >= n:
                return
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line += data[pos:]
                if len(self._line) > MAX_INLINE:
                    raise ProtocolError(
                        "too big inline request" if not self._left else "too big bulk header"
                    )
                return
            if self._line:
                self._line += data[pos : nl + 1]
                line: Bytes = bytes(self._line)
                self._line.clear()
            else:
                line = data[pos : nl + 1]
            pos = nl + 1
            if self._left:
                # A bulk argument header: $<len>\r\n
                if line[0] != BULK:
                    raise ProtocolError(f"expected '$', got {bytes(line[:1])!r}")
                if len(line) < 4 or line[-2] != _CR:
                    raise ProtocolError("bulk header not ended by CRLF")
                size = _length(line[:-2])
                if size < 0 or size > MAX_BULK:
                    raise ProtocolError("invalid bulk length")
                end = pos + size + 2  # Redis skips the CRLF after it unchecked
                if end <= n:
                    keep = (self._capturing and size <= self.max_capture
                            and len(self._args) <= self.capture)
                    cmd = self._done_arg(bytes(data[pos : end - 2]) if keep else None)
                    pos = end
                    if cmd is not None:
                        out.append(cmd)
                else:
                    self._skip = size + 2
                    if (self._capturing and size <= self.max_capture
                            and len(self._args) <= self.capture):
                        self._cap = bytearray()
                continue
            if line[0] == ARRAY:
                if len(line) < 4 or line[-2] != _CR:
                    raise ProtocolError("multibulk header not ended by CRLF")
                count = _length(line[:-2])
                if count > 1024 * 1024:
                    raise ProtocolError("invalid multibulk length")
                if count <= 0:
                    continue  # no command, no reply
                self._left = self._total = count
                self._args = []
                self._capturing = True
                continue
            # Inline command: the line up to LF, a CR before it dropped.
            argv = split_inline(line[:-2] if line[-2:] == b"\r\n" else line[:-1])
            if argv:
                out.append(Command(argv[0].lower(), tuple(argv[1 : 1 + self.capture]),
                                   len(argv) - 1, inline=True))


# --------------------------------------------------------------------------- matching

# What a command does to the conversation, decided once when it is sent.
PLAIN: Final = 0
WATCHED: Final = 1  # plain, but its reply must be shown whole to the caller
_MULTI: Final = 2
_EXEC: Final = 3
_DISCARD: Final = 4
_HELLO: Final = 5
_RESET: Final = 6
_SUB: Final = 7
_OPAQUE: Final = 8

_KINDS: Final[dict[bytes, int]] = {
    b"multi": _MULTI, b"exec": _EXEC, b"discard": _DISCARD, b"hello": _HELLO,
    b"reset": _RESET, b"subscribe": _SUB, b"psubscribe": _SUB, b"ssubscribe": _SUB,
    b"unsubscribe": _SUB, b"punsubscribe": _SUB, b"sunsubscribe": _SUB,
    b"monitor": _OPAQUE, b"sync": _OPAQUE, b"psync": _OPAQUE,
}
# Subscription confirmations: (which set: channels, patterns, shard channels; adds?)
CAPTURE_FOR: Final = frozenset((*_KINDS, b"client", b"cluster"))
"""Commands whose arguments reply matching looks at (the rest only need their name)."""
_CONFIRMS: Final[dict[bytes, tuple[int, bool]]] = {
    b"subscribe": (0, True), b"unsubscribe": (0, False),
    b"psubscribe": (1, True), b"punsubscribe": (1, False),
    b"ssubscribe": (2, True), b"sunsubscribe": (2, False),
}
_MESSAGES: Final = frozenset((b"message", b"pmessage", b"smessage"))
_QUEUED: Final = b"+QUEUED\r\n"


@dataclass(slots=True)
class Reply:
    """What one reply frame answers.

    ``command`` is None for an unsolicited frame (a pub/sub message, a RESP3 push such as a
    client-tracking invalidation, a server-initiated ``sunsubscribe``, or a reply with no
    command outstanding). ``queued`` is true for ``+QUEUED`` inside MULTI: the command's real
    reply is an element of EXEC's array, and then ``exec_commands`` lists, in order, the
    commands whose replies are that array's elements. ``frame`` is the parsed frame when
    matching had to parse it (saves the caller a second parse).
    """

    command: Command | None
    frame: Frame | None = None
    queued: bool = False
    exec_commands: list[Command] | None = None


class Conversation:
    """Matches the replies on one connection to the commands that caused them.

    ::

        client --request(cmd)--> [pending commands] --reply(raw)/consume(t)--> Reply

    Redis answers commands in order, one reply each, except that: a RESP2 client in
    subscribe mode also receives unsolicited ``message``/``pmessage``/``smessage`` arrays;
    (P|S)SUBSCRIBE/(P|S)UNSUBSCRIBE get one confirmation per channel (UNSUBSCRIBE with no
    argument: one per current subscription, or one if none); RESP3 delivers confirmations and
    messages as push frames, interleaved with ordinary replies; inside MULTI every command
    gets ``+QUEUED`` and EXEC returns their replies as one array; CLIENT REPLY OFF/SKIP
    suppress replies; HELLO switches the protocol and RESET resets it all. MONITOR, SYNC and
    PSYNC turn the rest of the stream into something that is not request/reply any more:
    the caller should stop framing (``next_is_opaque``).

    Known limits: a CLIENT REPLY OFF/SKIP that the server rejects (e.g. NOAUTH) is still
    taken as accepted; state changes made by commands run inside EXEC are applied only for
    HELLO.
    """

    __slots__ = (
        "_queued", "_reply_off", "_req_multi", "_skip_next", "_sub_left", "_watched",
        "in_multi", "pending", "protocol", "special", "subscriptions",
    )

    def __init__(self, watched: Iterable[bytes] = ()) -> None:
        self._watched = frozenset(w.lower() for w in watched)
        self.pending: deque[tuple[int, Command]] = deque()
        self.protocol = 2
        self.in_multi = False
        # channels, patterns, shard channels this client is subscribed to
        self.subscriptions: tuple[set[bytes], set[bytes], set[bytes]] = (set(), set(), set())
        self.special = False  # in MULTI or in RESP2 subscribe mode: replies need a closer look
        self._queued: list[Command] = []
        self._sub_left: int | None = None
        self._req_multi = False
        self._reply_off = False
        self._skip_next = False

    # -- requests

    def request(self, cmd: Command) -> None:
        """Record a command the client sent (call before its reply can arrive)."""
        name = cmd.name
        kind = WATCHED if name in self._watched else _KINDS.get(name, PLAIN)
        if kind == PLAIN and not (self._reply_off or self._skip_next) and name != b"client":
            self.pending.append((PLAIN, cmd))  # the common case
            return
        if name == b"client" and cmd.arg(0) == b"reply" and not self._req_multi:
            mode = cmd.arg(1)
            if mode == b"off":
                self._reply_off = True
                return
            if mode == b"skip":
                if not self._reply_off:
                    self._skip_next = True
                return
            if mode == b"on":
                self._reply_off = self._skip_next = False
        elif kind == _RESET:
            self._reply_off = self._skip_next = False
        if kind == _MULTI:
            self._req_multi = True
        elif kind in (_EXEC, _DISCARD, _RESET):
            self._req_multi = False
        if self._reply_off:
            return
        if self._skip_next:
            self._skip_next = False
            return
        self.pending.append((kind, cmd))

    # -- replies

    @property
    def subscribed(self) -> bool:
        s = self.subscriptions
        return bool(s[0] or s[1] or s[2])

    def _update_special(self) -> None:
        self.special = self.in_multi or (self.protocol == 2 and self.subscribed)

    def next_is_opaque(self) -> bool:
        """The next reply answers MONITOR/SYNC/PSYNC: stop framing from here on."""
        return bool(self.pending) and self.pending[0][0] == _OPAQUE

    def needs_whole(self, t: int) -> bool:
        """Must the reply that starts with type byte ``t`` be passed whole to ``reply``?

        False means ``consume(t)`` can account for it from its first byte alone, so the
        caller may forward its bytes as they come.
        """
        if t == ERROR or t == PUSH or t == ATTRIBUTE or t == BULK_ERROR or not self.pending:
            return True
        kind = self.pending[0][0]
        if kind == PLAIN:
            return self.special
        if kind == _EXEC:
            return any(self._kind_of(c) in (WATCHED, _HELLO) for c in self._queued)
        return True

    def _kind_of(self, cmd: Command) -> int:
        return WATCHED if cmd.name in self._watched else _KINDS.get(cmd.name, PLAIN)

    def consume(self, t: int) -> Command | None:
        """Account for a reply that ``needs_whole(t)`` said can be taken from its first byte."""
        kind, cmd = self.pending.popleft()
        if kind == _EXEC:
            self._end_multi()
        return cmd

    def _end_multi(self) -> None:
        self.in_multi = False
        self._queued = []
        self._update_special()

    def reply(self, raw: Bytes) -> Reply:
        """Match one complete reply frame (its raw bytes) to what it answers."""
        t = raw[0]
        frame: Frame | None = None
        if t == ATTRIBUTE:
            frame = parse_one(raw)
            t = ord(frame.kind)
        pending = self.pending
        head = pending[0] if pending else None
        if t == PUSH:
            frame = frame or parse_one(raw)
            return self._pubsub(frame, head) or Reply(None, frame)
        if t == ARRAY and self.protocol == 2 and (
            self.subscribed or (head is not None and head[0] == _SUB)
        ):
            frame = frame or parse_one(raw)
            if _first_string(frame) in _MESSAGES:
                return Reply(None, frame)
            matched = self._pubsub(frame, head)
            if matched is not None:
                return matched
        if head is None:
            return Reply(None, frame)
        kind, cmd = head
        is_error = t == ERROR or t == BULK_ERROR
        if self.in_multi and kind not in (_EXEC, _DISCARD, _RESET):
            pending.popleft()
            was_queued = raw == _QUEUED
            if was_queued:
                self._queued.append(cmd)
            return Reply(cmd, frame, queued=was_queued)
        pending.popleft()
        if kind == _SUB:
            self._sub_left = None
        elif kind == _MULTI:
            if raw == b"+OK\r\n":
                self.in_multi = True
                self._queued = []
                self._update_special()
        elif kind == _EXEC:
            queued = self._queued
            was_multi = self.in_multi
            self._end_multi()
            if was_multi and t == ARRAY:
                frame = frame or parse_one(raw)
                results = frame.items
                if len(results) == len(queued):
                    for c, r in zip(queued, results, strict=True):
                        if self._kind_of(c) == _HELLO and not r.is_error:
                            self._hello(c)
                    return Reply(cmd, frame, exec_commands=queued)
        elif kind == _DISCARD:
            self._end_multi()
        elif kind == _HELLO:
            if not is_error:
                self._hello(cmd)
        elif kind == _RESET:
            if raw == b"+RESET\r\n":
                self.protocol = 2
                self.in_multi = False
                self._queued = []
                for s in self.subscriptions:
                    s.clear()
                self._update_special()
        return Reply(cmd, frame)

    def _hello(self, cmd: Command) -> None:
        version = cmd.arg(0)
        if version in (b"2", b"3"):
            self.protocol = int(version)
            self._update_special()

    def _pubsub(self, frame: Frame, head: tuple[int, Command] | None) -> Reply | None:
        """A subscription confirmation (RESP2 array or RESP3 push); None if it is not one."""
        kind = _first_string(frame)
        if kind is None or kind not in _CONFIRMS:
            return None
        which, adds = _CONFIRMS[kind]
        items = frame.items
        channel = items[1].value if len(items) > 1 and isinstance(items[1].value, bytes) else None
        subs = self.subscriptions[which]
        matched = head is not None and head[0] == _SUB and head[1].name == kind
        if matched and self._sub_left is None:
            assert head is not None
            argc = head[1].argc
            self._sub_left = argc if argc > 0 else max(1, len(subs))
        if channel is not None:
            if adds:
                subs.add(channel)
            else:
                subs.discard(channel)
        if not matched:
            self._update_special()
            return Reply(None, frame)
        assert head is not None and self._sub_left is not None
        self._sub_left -= 1
        if self._sub_left <= 0:
            self.pending.popleft()
            self._sub_left = None
        self._update_special()
        return Reply(head[1], frame)


def _first_string(frame: Frame) -> bytes | None:
    items = frame.items
    if not items:
        return None
    v = items[0].value
    return v.lower() if isinstance(v, bytes) else None
