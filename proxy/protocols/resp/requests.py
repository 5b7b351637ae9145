"""Client requests: the byte stream a client sends, split into commands as Redis reads it.

::

    client bytes --RequestParser--> Command(name, args, argc) for each command
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, NamedTuple

from .framing import _CR, ARRAY, BULK, MAX_BULK, MAX_INLINE, Bytes, ProtocolError, _length


class RequestError(ProtocolError):
    """A client sent something Redis would reject and close the connection for.

    ``commands`` holds the commands parsed from the same chunk before the bad bytes.
    """

    def __init__(self, message: str, commands: list[Command]) -> None:
        super().__init__(message)
        self.commands = commands



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
            count = _length(data[pos:nl])
        except ProtocolError:
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
                size = _length(data[p:nl])
            except ProtocolError:
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
