"""RESP frame boundaries: where each reply ends, found without copying a payload.

::

    upstream bytes --Scanner.scan--> end offset of each complete frame (no copy)
                   --Framer-------> (start, end) stream offsets of each frame

The scanner's state between chunks is tiny (the open aggregate counts, how much of a bulk
payload is left, a header line cut in two), so it can be fed any split of the stream and
never has to hold a bulk payload: a caller that passes bytes through forwards them as they
arrive. The type bytes and limits here are shared by the rest of the package.
"""

from __future__ import annotations

from typing import Final

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



def _length(header: Bytes) -> int:
    """The length after the type byte: ASCII digits with an optional minus, as Redis's
    string2ll reads it (int() would also take " 1", "+1" and "1_0")."""
    digits = header[1:]
    body = digits[1:] if digits[:1] == b"-" else digits
    if not body.isdigit() or len(body) > 19:
        raise ProtocolError(f"bad length in header {bytes(header[:40])!r}")
    return int(digits)


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
