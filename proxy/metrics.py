"""Every metric cacheport exports, defined once, read from plain counters at scrape time.

::

    relay Side.nbytes, ListenerStats, UpstreamBook, health Targets   (plain ints)
                  |  read only when Prometheus scrapes
                  v
    CacheportCollector.collect() --> prometheus-client text format (/metrics)

Nothing on the forwarding path calls into prometheus-client: a relay only adds
to its own integers, a listener updates ``UpstreamBook`` once when a connection
opens and once when it closes, and this collector folds it all together when
asked. The byte counters include connections that are still open (their live
``Side.nbytes``), so a scrape is exact at the moment it is taken. ``collect()``
must run on the event loop's thread, which is where the admin endpoint calls it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__
from .config import Address
from .health.state import State

__all__ = ["CONTENT_TYPE_LATEST", "Buckets", "CacheportCollector", "UpstreamBook", "make_registry"]

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

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

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
    def idle_closed(self) -> int: ...


class HasUpstreams(Protocol):
    @property
    def upstreams(self) -> Sequence[Address]: ...


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


class CacheportCollector(Collector):
    """Reads the listeners and the health monitor when scraped; keeps no state of its own."""

    def __init__(self, listeners: Callable[[], Iterable[ListenerView]],
                 monitor: Callable[[], Iterable[TargetView] | None]) -> None:
        self.listeners = listeners
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("cacheport_build_info", "cacheport version, always 1",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from self._listener_metrics(list(self.listeners()))
        monitor = self.monitor()
        if monitor is not None:
            yield from self._health_metrics(monitor)

    def _listener_metrics(self, listeners: list[ListenerView]) -> Iterator[Metric]:
        lu = ["listener", "upstream"]
        accepting = GaugeMetricFamily(
            "cacheport_listener_accepting", "1 while the listener is bound and accepting",
            labels=["listener"])
        accepted = CounterMetricFamily(
            "cacheport_connections_accepted", "Client connections accepted",
            labels=["listener"])
        refused = CounterMetricFamily(
            "cacheport_connections_refused",
            "Client connections closed before reaching an upstream, by reason",
            labels=["listener", "reason"])
        cut = CounterMetricFamily(
            "cacheport_connections_closed",
            "Connections cacheport closed itself (idle timeout, upstream down), by reason",
            labels=["listener", "reason"])
        active = GaugeMetricFamily(
            "cacheport_connections_active", "Open client connections relayed to the upstream",
            labels=lu)
        connections = CounterMetricFamily(
            "cacheport_upstream_connections", "Connections relayed to the upstream", labels=lu)
        nbytes = CounterMetricFamily(
            "cacheport_bytes",
            "Bytes relayed; direction upstream is client -> node, downstream node -> client",
            labels=[*lu, "direction"])
        connect = HistogramMetricFamily(
            "cacheport_upstream_connect_duration_seconds",
            "Time to connect to the upstream for a new client connection", labels=lu)
        for listener in listeners:
            name = listener.name
            stats = listener.stats
            accepting.add_metric([name], 1 if listener.accepting else 0)
            accepted.add_metric([name], stats.accepted)
            for reason, count in sorted(stats.refused.items()):
                refused.add_metric([name, reason], count)
            book = listener.book
            cut.add_metric([name, "idle timeout"], stats.idle_closed)
            cut.add_metric([name, "upstream down"],
                           sum(c.closed_on_down for c in book.counters.values()))
            totals = book.totals()
            # Configured upstreams show from the start (at zero), former ones while counted.
            shown = dict.fromkeys((*listener.config.upstreams, *book.counters))
            for addr in shown:
                labels = [name, str(addr)]
                counters = book.counters.get(addr) or _ZERO
                n_active, up, down = totals.get(addr, (0, 0, 0))
                active.add_metric(labels, n_active)
                connections.add_metric(labels, counters.connections)
                nbytes.add_metric([*labels, "upstream"], up)
                nbytes.add_metric([*labels, "downstream"], down)
                b = counters.connect_seconds
                connect.add_metric(labels, b.cumulative(), b.sum)
        yield from (accepting, accepted, refused, cut, active, connections, nbytes, connect)

    def _health_metrics(self, monitor: Iterable[TargetView]) -> Iterator[Metric]:
        lu = ["listener", "upstream"]
        up = GaugeMetricFamily(
            "cacheport_upstream_up",
            "Health check verdict: 1 UP, 0 DOWN (or not yet checked)", labels=lu)
        changes = CounterMetricFamily(
            "cacheport_upstream_state_changes", "UP <-> DOWN changes", labels=lu)
        checks = CounterMetricFamily(
            "cacheport_upstream_checks", "Health checks run, by result",
            labels=[*lu, "result"])
        duration = HistogramMetricFamily(
            "cacheport_upstream_check_duration_seconds", "Time one health check took",
            labels=lu)
        for target in monitor:
            labels = [target.listener, str(target.upstream)]
            up.add_metric(labels, 1 if target.state is State.UP else 0)
            changes.add_metric(labels, target.changes)
            checks.add_metric([*labels, "ok"], target.checks_ok)
            checks.add_metric([*labels, "failed"], target.checks_failed)
            duration.add_metric(labels, target.durations.cumulative(), target.durations.sum)
        yield from (up, changes, checks, duration)


def make_registry(collector: CacheportCollector) -> CollectorRegistry:
    """A registry of our own (not the global one) plus the process, platform and GC metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(standard)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format; call on the event loop's thread."""
    return generate_latest(registry)
