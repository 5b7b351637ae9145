"""Stable port assignment for cluster nodes, and the small JSON file that keeps it.

A node is known by its identity (the Redis node id, the Memcached hostname), never by
its IP, so a node replaced behind the same name keeps its port and clients that cached
``announce:port`` keep working. A node that leaves gives its port back only after
``retire_grace``: a client still holding the old address must not land on a different
node (the failure redis/RedisDesktopManager#4487 describes for plain NAT rules). A node
that comes back within the grace period gets its own port again.

``PortBook`` decides (no I/O); ``StateFile`` reads and writes the file under a lock, so
SO_REUSEPORT workers that refresh at the same time agree on every port.

Several hosts behind one load balancer share no file, so a new node's port must not
depend on a host's history: it goes to its *preferred* port, a hash of its identity
into the range, or the next free one after it (wrapping), new nodes taken in order of
(preferred port, identity). Two hosts with no state give every node the same port; two
that saw the same joins and leaves do too. They can differ only where history matters:
a collision settled before the other node existed, or a preferred port resting after
its node left. ``off_canonical`` names every node whose port is not the one a fresh
host would give it (docs/clusters.md, "Several hosts"), and the manager reports them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("cacheport.cluster")

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Retired:
    """A port held back for ``identity`` until the wall-clock time ``until``."""

    identity: str
    until: float


@dataclass(frozen=True, slots=True)
class PortChanges:
    """What one ``PortBook.assign`` changed."""

    added: dict[str, int] = field(default_factory=dict)  # identity -> its (new) port
    retired: dict[str, int] = field(default_factory=dict)  # departed identity -> its old port
    unassigned: tuple[str, ...] = ()  # present but no free port (the range is full)

    @property
    def empty(self) -> bool:
        return not (self.added or self.retired or self.unassigned)


def preferred_port(identity: str, low: int, high: int) -> int:
    """Where ``identity`` goes when its port is free: the same answer on every host."""
    digest = hashlib.sha256(identity.encode("utf-8")).digest()
    return low + int.from_bytes(digest[:8], "big") % (high - low + 1)


def _probe(identity: str, low: int, high: int, taken: set[int]) -> int | None:
    """The preferred port, else the next free one after it (wrapping); None: full."""
    size = high - low + 1
    start = preferred_port(identity, low, high) - low
    for step in range(size):
        port = low + (start + step) % size
        if port not in taken:
            return port
    return None


def canonical(present: Iterable[str], low: int, high: int) -> dict[str, int]:
    """The ports a host with no history gives ``present``: what every host converges on."""
    book = PortBook(low, high, 0)
    book.assign(present, 0)
    return book.assigned


class PortBook:
    """Identity -> port within ``[low, high]``; departed identities' ports rest for ``grace``."""

    __slots__ = ("assigned", "grace", "high", "low", "retired")

    def __init__(self, low: int, high: int, grace: float) -> None:
        self.low = low
        self.high = high
        self.grace = grace
        self.assigned: dict[str, int] = {}
        self.retired: dict[int, Retired] = {}

    def port_of(self, identity: str) -> int | None:
        return self.assigned.get(identity)

    def assign(self, present: Iterable[str], now: float) -> PortChanges:
        """Give every present identity a port; retire the ports of the ones not present.

        Deterministic (new identities in order of (preferred port, identity), each at
        its preferred port or the next free one), so two processes starting from the
        same book reach the same answer, and two empty books the canonical one.
        """
        present_set = set(present)
        for port, r in list(self.retired.items()):
            if r.until <= now or not self.low <= port <= self.high:
                del self.retired[port]
        added: dict[str, int] = {}
        retired: dict[str, int] = {}
        for identity, port in sorted(self.assigned.items()):
            if identity not in present_set:
                del self.assigned[identity]
                retired[identity] = port
                if self.grace > 0 and self.low <= port <= self.high:
                    self.retired[port] = Retired(identity, now + self.grace)
            elif not self.low <= port <= self.high:
                del self.assigned[identity]  # the range changed: this one moves
        taken = set(self.assigned.values()) | set(self.retired)
        unassigned: list[str] = []
        new = sorted(present_set - set(self.assigned),
                     key=lambda i: (preferred_port(i, self.low, self.high), i))
        # Returning nodes first: their own ports are not anyone else's to probe into.
        for identity in new:
            own = next((p for p, r in self.retired.items() if r.identity == identity), None)
            if own is not None:
                del self.retired[own]  # back within the grace period: same port
                self.assigned[identity] = own
                added[identity] = own
        for identity in new:
            if identity in added:
                continue
            probed = _probe(identity, self.low, self.high, taken)
            if probed is None:
                unassigned.append(identity)
                continue
            taken.add(probed)
            self.assigned[identity] = probed
            added[identity] = probed
        return PortChanges(added, retired, tuple(sorted(unassigned)))

    def off_canonical(self) -> dict[str, tuple[int, int | None]]:
        """Nodes whose port differs from what a fresh host gives them: ``id -> (port,
        canonical port)``. Empty means any other host, however started, agrees."""
        fresh = canonical(self.assigned, self.low, self.high)
        return {i: (p, fresh.get(i)) for i, p in sorted(self.assigned.items())
                if fresh.get(i) != p}

    def reserve(self, identity: str) -> int | None:
        """Give ``identity`` a port now without retiring anyone (None: the range is full)."""
        port = self.assigned.get(identity)
        if port is not None:
            return port
        own = next((p for p, r in self.retired.items() if r.identity == identity), None)
        if own is not None:
            del self.retired[own]
            self.assigned[identity] = own
            return own
        taken = set(self.assigned.values()) | set(self.retired)
        port = _probe(identity, self.low, self.high, taken)
        if port is not None:
            self.assigned[identity] = port
        return port

    def keep_reserved(self, reserved: dict[str, int]) -> None:
        """After ``load_json``: put back this host's reservations whose port is still free
        (the file may have been written since they were made)."""
        taken = set(self.assigned.values()) | set(self.retired)
        for identity, port in reserved.items():
            if identity not in self.assigned and port not in taken:
                self.assigned[identity] = port

    def release(self, identities: set[str]) -> None:
        """Forget identities' ports without a grace period (reservations never confirmed)."""
        for identity in identities:
            self.assigned.pop(identity, None)
            for port, r in list(self.retired.items()):
                if r.identity == identity:
                    del self.retired[port]

    # -- persistence -----------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "assigned": dict(sorted(self.assigned.items())),
            "retired": {str(p): {"id": r.identity, "until": round(r.until, 3)}
                        for p, r in sorted(self.retired.items())},
        }

    def load_json(self, data: Any) -> None:
        """Take assignments from a stored book; entries that do not parse are dropped."""
        self.assigned = {}
        self.retired = {}
        if not isinstance(data, dict):
            return
        assigned = data.get("assigned")
        if isinstance(assigned, dict):
            used: set[int] = set()
            for identity, port in assigned.items():
                if (isinstance(identity, str) and isinstance(port, int)
                        and not isinstance(port, bool) and port not in used):
                    self.assigned[identity] = port
                    used.add(port)
        retired = data.get("retired")
        if isinstance(retired, dict):
            for port_s, entry in retired.items():
                if (isinstance(port_s, str) and port_s.isdigit() and isinstance(entry, dict)
                        and isinstance(entry.get("id"), str)
                        and isinstance(entry.get("until"), int | float)):
                    self.retired[int(port_s)] = Retired(entry["id"], float(entry["until"]))


class StateError(Exception):
    """The state file cannot be read or written (logged; assignments stay in memory)."""


class StateFile:
    """``{"version": 1, "clusters": {name: {...}}}`` in one JSON file, updated under a lock.

    Writes go to a temporary file renamed over the old one, so a crash never leaves half
    a file; a separate ``.lock`` file serialises workers' read-modify-write cycles.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open {self.lock_path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"version": STATE_VERSION, "clusters": {}}
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"cannot read {self.path}: {exc}") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            log.error("state file %s is not JSON (%s); starting from empty assignments and "
                      "overwriting it", self.path, exc)
            return {"version": STATE_VERSION, "clusters": {}}
        if not isinstance(data, dict) or not isinstance(data.get("clusters"), dict):
            log.error("state file %s has an unknown layout; starting from empty assignments",
                      self.path)
            return {"version": STATE_VERSION, "clusters": {}}
        return data

    def _write(self, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
        try:
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def read_cluster(self, name: str) -> dict[str, Any]:
        with self._locked():
            entry = self._read()["clusters"].get(name)
        return entry if isinstance(entry, dict) else {}

    def update_cluster(self, name: str,
                       change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Read the cluster's entry, let ``change`` return the new one, write it back."""
        with self._locked():
            data = self._read()
            entry = data["clusters"].get(name)
            new = change(entry if isinstance(entry, dict) else {})
            data["version"] = STATE_VERSION
            data["clusters"][name] = new
            self._write(data)
            return new
