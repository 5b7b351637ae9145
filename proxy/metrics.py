"""Every metric cacheport exports, defined once, read from plain counters at scrape time.

::

    relay Side.nbytes, ListenerStats, UpstreamBook, health Targets   (plain ints)
                  |  read only when Prometheus scrapes
                  v
    CacheportMetrics.render(Selection) --> text exposition format (/metrics)
    make_registry(): process, platform, GC (prometheus-client) --> appended

Nothing on the forwarding path calls into prometheus-client: a relay only adds
to its own integers, a listener updates ``UpstreamBook`` once when a connection
opens and once when it closes, and the renderer folds it all together when
asked. The byte counters include connections that are still open (their live
``Side.nbytes``), so each listener's series are exact at the moment it is read.
``render()`` runs on the event loop's thread, which is where the admin endpoint
calls it, a chunk of listeners at a time.
"""

from __future__ import annotations

import asyncio
import bisect
import urllib.parse
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    generate_latest,
)
from prometheus_client.registry import CollectorRegistry

from . import __version__, closes
from .config import Address
from .health.state import State

__all__ = ["CONTENT_TYPE_LATEST", "Buckets", "CacheportMetrics", "Selection", "UpstreamBook",
           "make_registry"]

# Loopback connects take ~50us, a connect across AZs ~1ms, a SYN lost to a dead node seconds.
CONNECT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0)
CHECK_DURATION_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                          0.5, 1.0, 2.5, 5.0)


class Counted(Hashable, Protocol):
    """A live relay as the books see it: its byte counters, read at close and scrape."""

    @property
    def bytes_upstream(self) -> int: ...
    @property
    def bytes_downstream(self) -> int: ...


R = TypeVar("R", bound=Counted)


class Buckets:
    """A histogram as plain numbers: ``observe()`` is one bisect and three adds."""

    __slots__ = ("bounds", "count", "counts", "sum", "text")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0
        # Its exposition text at the last scrape, with the count and labels it was for.
        self.text: tuple[int, str, str] | None = None

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus ``le`` buckets: cumulative counts, ending with ``+Inf``."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(slots=True)
class UpstreamCounters:
    """Per (listener, upstream) totals, updated once per connection."""

    connections: int = 0  # relays started to this upstream
    closed_bytes_upstream: int = 0  # client -> upstream, from relays that have closed
    closed_bytes_downstream: int = 0  # upstream -> client
    closed_on_down: int = 0  # cut by ``on_down: close``
    connect_seconds: Buckets = field(default_factory=lambda: Buckets(CONNECT_BUCKETS))


class UpstreamBook(Generic[R]):
    """Which upstream each live relay of one listener talks to, and per-upstream totals.

    The listener needs it to cut one upstream's connections (``on_down: close``);
    the metrics and ``/status`` need it to split bytes and connections by upstream.
    """

    __slots__ = ("counters", "relays")

    def __init__(self) -> None:
        self.relays: dict[R, Address] = {}
        self.counters: dict[Address, UpstreamCounters] = {}

    def of(self, upstream: Address) -> UpstreamCounters:
        counters = self.counters.get(upstream)
        if counters is None:
            counters = self.counters[upstream] = UpstreamCounters()
        return counters

    def opened(self, relay: R, upstream: Address, connect_seconds: float) -> None:
        counters = self.of(upstream)
        counters.connections += 1
        counters.connect_seconds.observe(connect_seconds)
        self.relays[relay] = upstream

    def closed(self, relay: R) -> None:
        upstream = self.relays.pop(relay, None)
        if upstream is None:
            return
        counters = self.of(upstream)
        counters.closed_bytes_upstream += relay.bytes_upstream
        counters.closed_bytes_downstream += relay.bytes_downstream

    def live(self, upstream: Address) -> list[R]:
        return [relay for relay, addr in self.relays.items() if addr == upstream]

    def totals(self) -> dict[Address, tuple[int, int, int]]:
        """Per upstream: (open connections, bytes to upstream, bytes to clients), live ones in."""
        out = {addr: (0, c.closed_bytes_upstream, c.closed_bytes_downstream)
               for addr, c in self.counters.items()}
        for relay, addr in self.relays.items():
            active, up, down = out[addr]
            out[addr] = (active + 1, up + relay.bytes_upstream, down + relay.bytes_downstream)
        return out


_ZERO = UpstreamCounters()  # read-only stand-in for an upstream with no connections yet


# What the collector reads, and nothing more: listeners and health targets satisfy these
# structurally, so this module depends on neither.
class ListenerCounts(Protocol):
    @property
    def accepted(self) -> int: ...
    @property
    def refused(self) -> Mapping[str, int]: ...
    @property
    def closed(self) -> Mapping[str, int]: ...


class HasUpstreams(Protocol):
    @property
    def upstreams(self) -> Sequence[Address]: ...


class HoldsCertificates(Protocol):
    def expiry(self) -> Mapping[str, float]: ...


class ListenerView(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def accepting(self) -> bool: ...
    @property
    def stats(self) -> ListenerCounts: ...
    @property
    def book(self) -> UpstreamBook[Any]: ...
    @property
    def config(self) -> HasUpstreams: ...
    @property
    def tls(self) -> HoldsCertificates: ...


class TargetView(Protocol):
    @property
    def listener(self) -> str: ...
    @property
    def upstream(self) -> Address: ...
    @property
    def state(self) -> State: ...
    @property
    def changes(self) -> int: ...
    @property
    def checks_ok(self) -> int: ...
    @property
    def checks_failed(self) -> int: ...
    @property
    def durations(self) -> Buckets: ...


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family as exposed: its full name (counters end in ``_total``), type, help."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    per_listener: bool = True

    def head(self) -> str:
        text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return f"# HELP {self.name} {text}\n# TYPE {self.name} {self.kind}\n"

    def sample_names(self) -> tuple[str, ...]:
        if self.kind == "histogram":
            return (self.name, *(self.name + s for s in ("_bucket", "_count", "_sum")))
        if self.kind == "counter":
            return (self.name, self.name.removesuffix("_total"))
        return (self.name,)


BUILD_INFO = Family("cacheport_build_info", "gauge", "cacheport version, always 1", False)
ACCEPTING = Family("cacheport_listener_accepting", "gauge",
                   "1 while the listener is bound and accepting")
ACCEPTED = Family("cacheport_connections_accepted_total", "counter",
                  "Client connections accepted")
REFUSED = Family("cacheport_connections_refused_total", "counter",
                 "Client connections closed before reaching an upstream, by reason")
CUT = Family("cacheport_connections_closed_total", "counter",
             "Relayed connections that ended, by reason: who closed first, or why cacheport "
             "closed it (proxy/closes.py)")
# Shown at 0 from the start, so alerts on them have a series to rate().
_CLOSED_ALWAYS = (closes.IDLE_TIMEOUT, closes.UPSTREAM_DOWN)
ACTIVE = Family("cacheport_connections_active", "gauge",
                "Open client connections relayed to the upstream")
CONNECTIONS = Family("cacheport_upstream_connections_total", "counter",
                     "Connections relayed to the upstream")
BYTES = Family("cacheport_bytes_total", "counter",
               "Bytes relayed; direction upstream is client -> node, downstream node -> client")
CONNECT = Family("cacheport_upstream_connect_duration_seconds", "histogram",
                 "Time to connect to the upstream for a new client connection")
UP = Family("cacheport_upstream_up", "gauge",
            "Health check verdict: 1 UP, 0 DOWN (or not yet checked)")
CHANGES = Family("cacheport_upstream_state_changes_total", "counter", "UP <-> DOWN changes")
CHECKS = Family("cacheport_upstream_checks_total", "counter", "Health checks run, by result")
CHECK_DURATION = Family("cacheport_upstream_check_duration_seconds", "histogram",
                        "Time one health check took")
CERT_EXPIRY = Family(
    "cacheport_tls_certificate_expiry_timestamp_seconds", "gauge",
    "notAfter of a certificate as Unix time, by leg: termination (presented to clients), "
    "client (a client's, at the last mutual-TLS handshake), client_ca (verifies client "
    "certificates), upstream (the node's, at the last handshake), upstream_ca (verifies the "
    "node's); a bundle's earliest")
LISTENER_FAMILIES = (ACCEPTING, ACCEPTED, REFUSED, CUT, ACTIVE, CONNECTIONS, BYTES, CONNECT,
                     CERT_EXPIRY)
HEALTH_FAMILIES = (UP, CHANGES, CHECKS, CHECK_DURATION)
FAMILIES = (BUILD_INFO, *LISTENER_FAMILIES, *HEALTH_FAMILIES)

HISTOGRAMS = ("listener", "sum", "none")
"""``?histograms=``: one histogram per (listener, upstream), the default and what
dashboards built on it expect; ``sum``: one over every listener and upstream (16
series in all instead of 17 per upstream of each listener); ``none``: left out."""

CHUNK = 50  # listeners rendered between two yields to the loop: about 1 ms of work
JOIN_SLICE = 10_000  # lines joined and encoded between two yields: about 1 ms


@dataclass(frozen=True, slots=True)
class Selection:
    """Which series one scrape wants: the cardinality controls of ``/metrics``.

    ``?name[]=FAMILY`` (repeatable; prometheus-client's own filter, a family or a
    sample name), ``?listener=NAME`` (repeatable; HAProxy's exporter ``scope=``),
    ``?histograms=listener|sum|none``.
    """

    names: frozenset[str] | None = None
    listeners: frozenset[str] | None = None
    histograms: str = "listener"

    @classmethod
    def from_query(cls, query: str) -> Selection:
        """The selection a query string asks for; ``ValueError`` says what is wrong."""
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        unknown = sorted(set(params) - {"name[]", "name", "listener", "histograms"})
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r}; "
                             "known: name[], listener, histograms")
        names = params.get("name[]", []) + params.get("name", [])
        listeners = params.get("listener", [])
        histograms = params.get("histograms", ["listener"])[-1]
        if histograms not in HISTOGRAMS:
            raise ValueError(f"histograms={histograms!r}: expected one of "
                             f"{', '.join(HISTOGRAMS)}")
        return cls(frozenset(names) if names else None,
                   frozenset(listeners) if listeners else None, histograms)

    def wants(self, family: Family) -> bool:
        if family.kind == "histogram" and self.histograms == "none":
            return False
        return self.names is None or not self.names.isdisjoint(family.sample_names())

    def wants_listener(self, name: str) -> bool:
        return self.listeners is None or name in self.listeners


def _label(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


_LE = (*(f'le="{b!r}"' for b in CONNECT_BUCKETS), 'le="+Inf"')
_CHECK_LE = (*(f'le="{b!r}"' for b in CHECK_DURATION_BUCKETS), 'le="+Inf"')


def _histogram(out: list[str], name: str, labels: str, b: Buckets, les: tuple[str, ...]) -> None:
    """``labels`` is ``listener="a",upstream="b",`` (with its trailing comma) or empty.

    A histogram that saw nothing since the last scrape (most of them, with thousands of
    mostly idle listeners) reuses its text: its 18 lines were most of a scrape's work."""
    cached = b.text
    if cached is not None and cached[0] == b.count and cached[1] == labels:
        out.append(cached[2])
        return
    lines = []
    running = 0
    for le, n in zip(les, b.counts, strict=True):
        running += n
        lines.append(f"{name}_bucket{{{labels}{le}}} {running}\n")
    bare = labels[:-1]
    lines.append(f"{name}_count{{{bare}}} {b.count}\n" if bare else f"{name}_count {b.count}\n")
    lines.append(f"{name}_sum{{{bare}}} {b.sum!r}\n" if bare else f"{name}_sum {b.sum!r}\n")
    text = "".join(lines)
    b.text = (b.count, labels, text)
    out.append(text)


def _add_into(total: Buckets, b: Buckets) -> None:
    for i, n in enumerate(b.counts):
        total.counts[i] += n
    total.sum += b.sum
    total.count += b.count


class CacheportMetrics:
    """Renders cacheport's own families as text, from plain counters, a chunk at a time.

    ::

        listeners, health targets --render(selection)--> one list of lines per family
                 (every CHUNK listeners: await, so relays and checks run in between)
                                                  --join--> text exposition format

    Formatting the text directly (not through prometheus-client's metric objects)
    and yielding to the loop every ``CHUNK`` listeners keeps a scrape of thousands
    of listeners from holding the loop: each step is about a millisecond. A
    listener's own series are read in one step, so they agree with each other;
    two listeners may be read a few milliseconds apart.
    """

    def __init__(self, listeners: Callable[[], Iterable[ListenerView]],
                 monitor: Callable[[], Iterable[TargetView] | None]) -> None:
        self.listeners = listeners
        self.monitor = monitor

    async def render(self, selection: Selection = Selection()) -> bytes:
        """The whole text at once (for callers that want bytes, not a stream)."""
        return b"".join(await self.render_parts(selection))

    async def render_parts(self, selection: Selection = Selection()) -> list[bytes]:
        """The text in pieces of at most ``JOIN_SLICE`` lines, to be written one by one."""
        lines: dict[Family, list[str]] = {f: [] for f in FAMILIES if selection.wants(f)}
        if BUILD_INFO in lines:
            lines[BUILD_INFO].append(f'cacheport_build_info{{version="{__version__}"}} 1\n')
        connect_total = Buckets(CONNECT_BUCKETS)
        listeners = [lst for lst in self.listeners() if selection.wants_listener(lst.name)]
        for start in range(0, len(listeners), CHUNK):
            for listener in listeners[start:start + CHUNK]:
                self._listener(listener, lines, selection, connect_total)
            await asyncio.sleep(0)
        check_total = Buckets(CHECK_DURATION_BUCKETS)
        monitor = self.monitor()
        if monitor is not None:
            targets = [t for t in monitor if selection.wants_listener(t.listener)]
            for start in range(0, len(targets), CHUNK * 2):
                for target in targets[start:start + CHUNK * 2]:
                    self._target(target, lines, selection, check_total)
                await asyncio.sleep(0)
        if selection.histograms == "sum":
            if CONNECT in lines:
                _histogram(lines[CONNECT], CONNECT.name, "", connect_total, _LE)
            if CHECK_DURATION in lines and monitor is not None:
                _histogram(lines[CHECK_DURATION], CHECK_DURATION.name, "", check_total,
                           _CHECK_LE)
        # Joined and encoded a slice at a time too, and never joined whole: one 4 MB join
        # held the loop ~10-20 ms; the admin endpoint writes the pieces one by one.
        out: list[bytes] = []
        for family, body in lines.items():
            if body or not family.per_listener or selection.names is not None:
                out.append(family.head().encode())
                for start in range(0, len(body), JOIN_SLICE):
                    out.append("".join(body[start:start + JOIN_SLICE]).encode())
                    await asyncio.sleep(0)
        return out

    @staticmethod
    def _listener(listener: ListenerView, lines: dict[Family, list[str]],
                  selection: Selection, connect_total: Buckets) -> None:
        name = _label(listener.name)
        stats = listener.stats
        book = listener.book
        ln = f'listener="{name}"'
        if (out := lines.get(ACCEPTING)) is not None:
            out.append(f"cacheport_listener_accepting{{{ln}}} {1 if listener.accepting else 0}\n")
        if (out := lines.get(ACCEPTED)) is not None:
            out.append(f"cacheport_connections_accepted_total{{{ln}}} {stats.accepted}\n")
        if (out := lines.get(REFUSED)) is not None:
            for reason, count in sorted(stats.refused.items()):
                out.append(f'cacheport_connections_refused_total{{{ln},'
                           f'reason="{_label(reason)}"}} {count}\n')
        if (out := lines.get(CUT)) is not None:
            closed = stats.closed
            for reason in sorted({*_CLOSED_ALWAYS, *closed}):
                out.append(f'cacheport_connections_closed_total{{{ln},'
                           f'reason="{_label(reason)}"}} {closed.get(reason, 0)}\n')
        if (out := lines.get(CERT_EXPIRY)) is not None:
            for leg, when in listener.tls.expiry().items():
                out.append(f'cacheport_tls_certificate_expiry_timestamp_seconds{{{ln},'
                           f'leg="{leg}"}} {when!r}\n')
        totals = book.totals()
        active, conns, nbytes = lines.get(ACTIVE), lines.get(CONNECTIONS), lines.get(BYTES)
        connect = lines.get(CONNECT)
        # Configured upstreams show from the start (at zero), former ones while counted.
        for addr in dict.fromkeys((*listener.config.upstreams, *book.counters)):
            lu = f'{ln},upstream="{_label(str(addr))}"'
            counters = book.counters.get(addr) or _ZERO
            n_active, up, down = totals.get(addr, (0, 0, 0))
            if active is not None:
                active.append(f"cacheport_connections_active{{{lu}}} {n_active}\n")
            if conns is not None:
                conns.append(f"cacheport_upstream_connections_total{{{lu}}} "
                             f"{counters.connections}\n")
            if nbytes is not None:
                nbytes.append(f'cacheport_bytes_total{{{lu},direction="upstream"}} {up}\n')
                nbytes.append(f'cacheport_bytes_total{{{lu},direction="downstream"}} {down}\n')
            if connect is not None:
                if selection.histograms == "sum":
                    _add_into(connect_total, counters.connect_seconds)
                else:
                    _histogram(connect, CONNECT.name, lu + ",", counters.connect_seconds, _LE)

    @staticmethod
    def _target(target: TargetView, lines: dict[Family, list[str]], selection: Selection,
                check_total: Buckets) -> None:
        lu = f'listener="{_label(target.listener)}",upstream="{_label(str(target.upstream))}"'
        if (out := lines.get(UP)) is not None:
            out.append(f"cacheport_upstream_up{{{lu}}} "
                       f"{1 if target.state is State.UP else 0}\n")
        if (out := lines.get(CHANGES)) is not None:
            out.append(f"cacheport_upstream_state_changes_total{{{lu}}} {target.changes}\n")
        if (out := lines.get(CHECKS)) is not None:
            out.append(f'cacheport_upstream_checks_total{{{lu},result="ok"}} '
                       f"{target.checks_ok}\n")
            out.append(f'cacheport_upstream_checks_total{{{lu},result="failed"}} '
                       f"{target.checks_failed}\n")
        if (out := lines.get(CHECK_DURATION)) is not None:
            if selection.histograms == "sum":
                _add_into(check_total, target.durations)
            else:
                _histogram(out, CHECK_DURATION.name, lu + ",", target.durations, _CHECK_LE)


def make_registry() -> CollectorRegistry:
    """A registry of our own (not the global one) with the process, platform and GC metrics;
    the owner adds its few process-wide families. The per-listener ones are
    ``CacheportMetrics``'s, rendered beside it."""
    registry = CollectorRegistry(auto_describe=False)
    for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(standard)
    return registry


def render(registry: CollectorRegistry, selection: Selection = Selection()) -> bytes:
    """The registry's families in the text format, filtered by ``selection``'s names."""
    if selection.names is not None:
        return generate_latest(registry.restricted_registry(sorted(selection.names)))
    return generate_latest(registry)
