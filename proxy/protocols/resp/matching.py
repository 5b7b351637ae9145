"""Reply matching: which command each reply frame on a connection answers.

::

    Commands + reply frames --Conversation--> Reply(command, frame, queued, exec_commands)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from .frames import Frame, parse_one
from .framing import ARRAY, ATTRIBUTE, BULK_ERROR, ERROR, PUSH, Bytes
from .requests import Command

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
