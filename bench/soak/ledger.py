"""What the clients saw: acknowledged writes (with their value's hash) and errors.

A write acknowledged by the server and not overwritten later by an acknowledged write
must read back with its hash. A write that failed client-side may or may not have
landed, and may land late: a request that timed out in a connection still waiting in
a worker's accept queue (at the descriptor limit) is delivered when the worker accepts
it, after the client's next write was acknowledged. So the value read may also be one
of the key's failed writes, counted apart when it failed before the acknowledged one
(never anything else). Errors carry their time, so they can be
matched to the fault windows they fell in.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field


def digest(value: bytes) -> str:
    return hashlib.blake2b(value, digest_size=12).hexdigest()


@dataclass
class KeyState:
    acked: str | None = None  # hash of the last acknowledged write
    acked_at: float = 0.0
    maybe: list[str] = field(default_factory=list)  # failed writes after it
    earlier: list[str] = field(default_factory=list)  # failed writes before it


class Ledger:
    """Thread-safe record of writes per store ("redis", "cluster", "memcached")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.keys: dict[tuple[str, str], KeyState] = {}
        self.acked = Counter[str]()
        self.forgotten = Counter[str]()

    def acked_write(self, store: str, key: str, value: bytes) -> None:
        with self._lock:
            state = self.keys.setdefault((store, key), KeyState())
            state.earlier += state.maybe
            state.acked, state.acked_at, state.maybe = digest(value), time.monotonic(), []
            self.acked[store] += 1

    def failed_write(self, store: str, key: str, value: bytes) -> None:
        with self._lock:
            self.keys.setdefault((store, key), KeyState()).maybe.append(digest(value))

    def forget(self, store: str, before: float) -> int:
        """Drop ``store``'s writes acknowledged before ``before`` (a node that was killed
        lost them by design: memcached keeps nothing across a restart)."""
        with self._lock:
            gone = [k for k, s in self.keys.items() if k[0] == store and s.acked_at < before]
            for k in gone:
                del self.keys[k]
            self.forgotten[store] += len(gone)
            return len(gone)

    def to_verify(self, store: str) -> list[tuple[str, KeyState]]:
        with self._lock:
            return [(k[1], s) for k, s in self.keys.items() if k[0] == store and s.acked]


@dataclass
class Verdict:
    checked: int = 0
    ok: int = 0
    landed_unacked: int = 0  # read back a failed write's value: allowed
    landed_late: int = 0  # ... of one that failed before the acknowledged write
    bad: list[str] = field(default_factory=list)


def verify(pairs: Sequence[tuple[str, KeyState]],
           read_many: Callable[[list[str]], list[bytes | None]], batch: int = 200) -> Verdict:
    """Read every key back (through ``read_many``, straight from the nodes) and judge it."""
    out = Verdict()
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        values = read_many([k for k, _ in chunk])
        for (key, state), value in zip(chunk, values, strict=True):
            out.checked += 1
            got = digest(value) if value is not None else None
            if got == state.acked:
                out.ok += 1
            elif got is not None and got in state.maybe:
                out.landed_unacked += 1
            elif got is not None and got in state.earlier:
                out.landed_late += 1
            else:
                out.bad.append(f"{key}: read {got or 'nothing'}, acknowledged {state.acked}")
    return out


@dataclass(frozen=True)
class ClientError:
    at: float
    client: str
    what: str


class Errors:
    """Client-visible errors with their monotonic time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: list[ClientError] = []
        self.requests = Counter[str]()

    def add(self, client: str, exc: BaseException | str) -> None:
        what = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"[:160]
        with self._lock:
            self.items.append(ClientError(time.monotonic(), client, what))

    def count(self, client: str, n: int = 1) -> None:
        with self._lock:
            self.requests[client] += n


@dataclass(frozen=True)
class Window:
    kind: str
    start: float
    end: float  # when the fault's action finished; errors count up to end + grace


def attribute(errors: Iterable[ClientError], windows: Sequence[Window],
              grace: float) -> tuple[Counter[str], list[ClientError]]:
    """Each error to the latest-started window it falls in (start .. end + grace);
    errors in no window come back as the second value: those fail the soak."""
    per = Counter[str]()
    stray: list[ClientError] = []
    for err in errors:
        hits = [w for w in windows if w.start <= err.at <= w.end + grace]
        if hits:
            per[max(hits, key=lambda w: w.start).kind] += 1
        else:
            stray.append(err)
    return per, stray


STAMP = re.compile(r"(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)")


def judge_log(lines: Iterable[str], windows: Sequence[Window], wall_offset: float,
              grace: float, allowed: re.Pattern[str]) -> tuple[Counter[str], list[str]]:
    """Log lines at WARNING and above (already picked) to the fault windows their time
    falls in (the log has whole seconds: one second either side). A traceback, or a
    line outside every window that ``allowed`` does not explain, comes back unexplained."""
    per = Counter[str]()
    unexplained: list[str] = []
    for line in lines:
        if "Traceback" in line:
            unexplained.append(line)
            continue
        stamp = STAMP.search(line)
        hits: list[Window] = []
        if stamp:
            wall = time.mktime(time.strptime(f"{stamp[1]} {stamp[2]}", "%Y-%m-%d %H:%M:%S"))
            at = wall - wall_offset
            hits = [w for w in windows if w.start - 1 <= at <= w.end + grace + 1]
        if hits:
            per[max(hits, key=lambda w: w.start).kind] += 1
        elif allowed.search(line):
            per["explained"] += 1
        else:
            unexplained.append(line)
    return per, unexplained
