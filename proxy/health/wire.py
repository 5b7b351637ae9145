"""What a check sends and how it judges the reply: bytes in, a verdict out, no sockets.

::

    request(config) --bytes--> node --reply bytes--> Judge.feed() --> None (need more)
                                                                  '-> Verdict (ok, reason, detail)

One request, written at once (redis: ``AUTH`` and ``ROLE`` pipelined around ``PING``),
and a reply read only as far as the verdict needs: a prefix (``+PONG``,
``VERSION ``), the first element of ``ROLE``, the ``STAT curr_connections`` line.
No client library per check: HAProxy's ``option redis-check`` does the same
(``PING``, expect ``+PONG``), which is what makes thousands of checked nodes cheap.

The reasons are the ones the library checkers in ``checks`` give, so a log, a
``/status`` or an alert keyed on them reads the same. A reason never carries
the password: it is only ever in ``request()``'s bytes, and ``Judge`` scrubs any
text a node echoes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import HealthConfig

MAX_REPLY = 64 * 1024  # a check reply is a few bytes (``stats`` about 1.5 KB); more is a wrong node


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one check concluded; ``checks.CheckResult`` is built from it."""

    ok: bool
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict)


def _bulk(arg: str | bytes) -> bytes:
    raw = arg.encode() if isinstance(arg, str) else arg
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


def _command(*args: str | bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


def request(config: HealthConfig) -> bytes:
    """The bytes one check writes; empty for ``tcp`` (the connect is the check)."""
    if config.kind == "memcached":
        return b"version\r\nstats\r\n" if config.stats else b"version\r\n"
    if config.kind != "redis":
        return b""
    out = b""
    if config.password is not None:
        secret = config.password.reveal()
        out += (_command("AUTH", config.username, secret) if config.username
                else _command("AUTH", secret))
    out += b"*1\r\n$4\r\nPING\r\n"
    if config.role == "primary":
        out += b"*1\r\n$4\r\nROLE\r\n"
    return out


class Judge:
    """Reads one check's reply as it arrives; ``feed`` returns the verdict once it is known."""

    __slots__ = ("_buf", "_config", "_secret")

    def __init__(self, config: HealthConfig) -> None:
        self._config = config
        self._secret = config.password.reveal() if config.password is not None else None
        self._buf = b""

    def feed(self, data: bytes) -> Verdict | None:
        self._buf += data
        if len(self._buf) > MAX_REPLY:
            return Verdict(False, "reply too long (is this the right kind of node?)")
        if self._config.kind == "memcached":
            return self._memcached()
        if self._config.kind == "redis":
            verdict = self._redis()
            if verdict is not None and self._secret and self._secret in verdict.reason:
                return Verdict(verdict.ok, verdict.reason.replace(self._secret, "***"),
                               verdict.detail)
            return verdict
        return Verdict(True, "connected")

    def closed(self) -> Verdict:
        """The node closed before the verdict was known."""
        return Verdict(False, "connection closed by the node")

    # -- memcached: VERSION x [STAT ... END] -------------------------------------------

    def _memcached(self) -> Verdict | None:
        buf = self._buf
        end = buf.find(b"\r\n")
        if end < 0:
            return None
        line = buf[:end].decode("ascii", "replace")
        if not line.startswith("VERSION "):
            return Verdict(False, f"unexpected reply: {line[:120]}")
        version = line.removeprefix("VERSION ")
        detail: dict[str, Any] = {"version": version}
        if self._config.stats:
            stop = buf.find(b"\r\nEND\r\n", end)
            if stop < 0:
                return None
            for stat in buf[end + 2:stop].split(b"\r\n"):
                parts = stat.split(b" ")
                if len(parts) == 3 and parts[1] == b"curr_connections" and parts[2].isdigit():
                    detail["curr_connections"] = int(parts[2])
        return Verdict(True, f"VERSION {version}", detail)

    # -- redis: [AUTH] PING [ROLE] --------------------------------------------------------

    def _redis(self) -> Verdict | None:
        cfg = self._config
        replies: list[bytes] = []
        pos = 0
        wanted = (cfg.password is not None) + 1 + (cfg.role == "primary")
        while len(replies) < wanted:
            if replies and replies[-1][:1] == b"-":
                break  # an error decides; what follows it does not matter
            reply, pos = _next_reply(self._buf, pos)
            if reply is None:
                return None
            if reply[:1] not in (b"+", b"-", b"*", b"$", b":"):
                return Verdict(False, "not a redis reply (is this a redis node?)")
            replies.append(reply)
        if cfg.password is not None:
            auth = replies.pop(0)
            if auth[:1] == b"-":
                return Verdict(False, "auth failed")
        pong = replies[0]
        if pong[:1] == b"-":
            return _redis_error(pong)
        if pong != b"+PONG":
            return Verdict(False, f"unexpected PING reply: {pong!r}"[:120])
        if cfg.role != "primary":
            return Verdict(True, "PONG")
        role_reply = replies[1]
        if role_reply[:1] == b"-":
            return _redis_error(role_reply)
        role = _first_role(role_reply)
        if role != "master":
            return Verdict(False, f"role is {role}, not primary", {"role": role})
        return Verdict(True, "PONG, role master", {"role": role})


def _next_reply(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    """One whole reply from ``pos``: a line, or for ``*`` (ROLE) the header and every line of
    it that ``_first_role`` needs; returns the reply without its last CRLF."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None, pos
    head = buf[pos:end]
    if head[:1] != b"*":
        return head, end + 2
    # ROLE: *3 / $6 / master / ... : the first element is enough, and whatever follows
    # (offsets, replicas) is never read.
    second = buf.find(b"\r\n", end + 2)
    if second < 0:
        return None, pos
    third = buf.find(b"\r\n", second + 2)
    if third < 0:
        return None, pos
    return buf[pos:third], third + 2


def _first_role(reply: bytes) -> str:
    lines = reply.split(b"\r\n")
    role = lines[2].decode("ascii", "replace") if len(lines) >= 3 else "unknown"
    return "replica" if role == "slave" else role


def _redis_error(reply: bytes) -> Verdict:
    text = reply[1:].decode("utf-8", "replace")
    code = text.split(" ", 1)[0]
    if code in ("NOAUTH", "WRONGPASS") or text.startswith("ERR invalid password"):
        return Verdict(False, "auth failed")
    if code == "NOPERM":
        return Verdict(False, "no permission (the ACL user may not run PING/ROLE)")
    if code == "LOADING":
        return Verdict(False, "loading its dataset")
    return Verdict(False, f"error reply: {text[:120]}")
