"""Schedules one check per distinct node and reports state changes to every listener of it.

::

    (listener, upstream) Targets --share--> Probe (node, check settings, TLS)
                                              |  the wheel: checker.start() every interval
                                              v
    HealthState.record() --Transition--> log line + on_change(target, ...) per Target

Listeners that send to the same node with the same check settings share a
probe, so the node is checked once per interval, not once per listener. Each
probe's checks start ``interval`` apart, from one check's start to the next,
stretched or shrunk by a random ``JITTER`` so checks of many nodes spread out,
then rounded up to the wheel's ``TICK`` so those due together share a wake-up.
The first check comes within the first ``JITTER`` of an interval, so a dead node
is known soon after start. Nothing here blocks the event loop: a wire check is
a few callbacks on it (``checks.WireChecker``).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import random
import ssl
import time
from collections.abc import Callable, Iterable, Iterator

from ..config import Address, HealthConfig, ListenerConfig, UpstreamTlsConfig
from ..metrics import CHECK_DURATION_BUCKETS, Buckets
from ..tls import client_context
from .checks import LOCAL_FAILURE, Checker, CheckResult, CheckTls, make_checker
from .prober import Prober
from .state import HealthState, State, Transition

log = logging.getLogger("cacheport.health")

JITTER = 0.1  # each interval is drawn from [0.9, 1.1] x interval
# Checks start on a grid of TICK seconds, so the checks due within one tick start
# together and their results are collected together: one wake-up of the loop
# serves many. On a virtual CPU a wake-up costs more than a check's own Python
# work (200 nodes every 400 ms: 2.0 % of a core on the loop at 10 ms, 1.6 % at
# 25 ms, 1.1 % at 50 ms); 25 ms keeps a tick's batch under 1 ms of loop work at
# 3,000 nodes every 2 s (about 40 checks a tick).
TICK = 0.025

OnChange = Callable[["Target", Transition], None]
ProbeKey = tuple[Address, HealthConfig, UpstreamTlsConfig | None]  # one node, one way to check it


class Probe:
    """The checks of one node with one set of check settings, and what they have seen.

    Listeners (or a replication group's role ports) that send to the same node with
    the same settings share one probe: the node is checked once per interval however
    many listeners point at it, and they all see the same verdict.
    """

    def __init__(self, key: ProbeKey, checker: Checker) -> None:
        self.key = key
        self.upstream, self.config, self.tls = key
        self.checker = checker
        self.health = HealthState(self.config.rise, self.config.fall)
        self.last: CheckResult | None = None
        self.last_at: float | None = None  # wall clock, for /status
        self.last_duration: float | None = None
        self.since = time.time()  # when the state last changed
        self.changes = 0  # UP <-> DOWN flips
        self.checks_ok = 0
        self.checks_failed = 0
        self.durations = Buckets(CHECK_DURATION_BUCKETS)
        self.generation = 0  # bumped at each start and end of a check: stale wheel entries
        self.abandon: Callable[[], None] | None = None  # the check in flight, if any
        self.started = 0.0  # loop time the check in flight began
        self.began = 0.0  # perf_counter at the same moment, for its duration
        self.active = True  # False once no target uses it: no further check
        self.targets: list[Target] = []  # the listeners' views of it, in order of arrival


class Target:
    """One upstream of one listener under check: a view of the node's shared ``Probe``."""

    def __init__(self, listener: str, probe: Probe, backup: bool) -> None:
        self.listener = listener
        self.probe = probe
        self.backup = backup

    # What the metrics, /status and the listeners read: the shared probe's.
    @property
    def upstream(self) -> Address:
        return self.probe.upstream

    @property
    def config(self) -> HealthConfig:
        return self.probe.config

    @property
    def tls(self) -> UpstreamTlsConfig | None:
        return self.probe.tls

    @property
    def checker(self) -> Checker:
        return self.probe.checker

    @property
    def health(self) -> HealthState:
        return self.probe.health

    @property
    def last(self) -> CheckResult | None:
        return self.probe.last

    @property
    def last_at(self) -> float | None:
        return self.probe.last_at

    @property
    def last_duration(self) -> float | None:
        return self.probe.last_duration

    @property
    def since(self) -> float:
        return self.probe.since

    @property
    def changes(self) -> int:
        return self.probe.changes

    @property
    def checks_ok(self) -> int:
        return self.probe.checks_ok

    @property
    def checks_failed(self) -> int:
        return self.probe.checks_failed

    @property
    def durations(self) -> Buckets:
        return self.probe.durations

    @property
    def state(self) -> State:
        return self.probe.health.state

    @property
    def key(self) -> tuple[str, Address]:
        return (self.listener, self.probe.upstream)


class HealthMonitor:
    """Owns the probes and their wheel; answers "what state is this upstream in"."""

    def __init__(self, on_change: OnChange | None = None, *,
                 rng: random.Random | None = None) -> None:
        self.on_change = on_change
        self.targets: dict[tuple[str, Address], Target] = {}
        self.probes: dict[ProbeKey, Probe] = {}
        self._by_listener: dict[str, list[Target]] = {}
        self.rng = rng or random.Random()
        self._leftovers: set[asyncio.Task[CheckResult]] = set()  # checks cut at their timeout
        # One client context per upstream_tls setting: loading a CA file takes milliseconds,
        # and hundreds of nodes of one cluster share the setting.
        self._contexts: dict[UpstreamTlsConfig, ssl.SSLContext] = {}
        self._prober = Prober()  # its thread starts with the first plain check
        self._wheel = _Wheel(self._due, self._prober)
        self._started = False
        self._stopped = False

    # -- what the listeners and the admin endpoint ask --------------------------

    def state(self, listener: str, upstream: Address) -> State | None:
        """The upstream's state, or ``None`` when it is not checked (always usable)."""
        target = self.targets.get((listener, upstream))
        return target.probe.health.state if target is not None else None

    def targets_of(self, listener: str) -> list[Target]:
        return list(self._by_listener.get(listener, ()))

    def __iter__(self) -> Iterator[Target]:
        return iter(list(self.targets.values()))

    # -- life cycle ----------------------------------------------------------------

    def sync(self, listeners: Iterable[ListenerConfig]) -> None:
        """Check exactly these listeners' upstreams; unchanged targets keep their state.

        Called at start and, later, by a reload: a target whose listener, address
        and health settings are unchanged keeps its probe and its counts, so a
        reload does not forget that a node is DOWN. A probe lives while at least one
        target uses it.
        """
        wanted: dict[tuple[str, Address], tuple[ProbeKey, bool]] = {}
        for lc in listeners:
            if lc.health is None:
                continue
            for index, address in enumerate(lc.upstreams):
                wanted[(lc.name, address)] = ((address, lc.health, lc.upstream_tls), index > 0)
        for key, target in list(self.targets.items()):
            spec = wanted.get(key)
            if spec is None or spec[0] != target.probe.key:
                self._drop(target)
            else:
                target.backup = spec[1]
        for key, (probe_key, backup) in wanted.items():
            if key in self.targets:
                continue
            probe = self.probes.get(probe_key)
            if probe is None:
                address, config, tls = probe_key
                probe = self.probes[probe_key] = Probe(probe_key, make_checker(
                    address, config, self._check_tls(tls, address), self._prober))
                if self._started:
                    self._launch(probe)
            target = Target(key[0], probe, backup)
            probe.targets.append(target)
            self.targets[key] = target
            self._by_listener.setdefault(key[0], []).append(target)

    def start(self) -> None:
        """Start checking (inside the running loop)."""
        if self._started or self._stopped:
            return
        self._started = True
        for probe in self.probes.values():
            self._launch(probe)


    async def stop(self) -> None:
        """Cancel every check and wait (bounded) for any task-run check to wind down."""
        if self._stopped:
            return
        self._stopped = True
        probes = list(self.probes.values())
        for target in list(self.targets.values()):
            self._drop(target)
        grace = max((p.config.timeout for p in probes), default=1.0) + 0.5
        # Checks cut short still close their connections; their own socket timeouts
        # bound how long that can take.
        leftovers = list(self._leftovers)
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.wait(leftovers, timeout=grace)
        self._wheel.close()
        self._prober.close()

    def _launch(self, probe: Probe) -> None:
        delay = self.rng.uniform(0, JITTER * probe.config.interval)
        self._wheel.add(self._wheel.now() + delay, probe, probe.generation)

    def _drop(self, target: Target) -> None:
        self.targets.pop(target.key, None)
        siblings = self._by_listener.get(target.listener)
        if siblings is not None:
            siblings.remove(target)
            if not siblings:
                del self._by_listener[target.listener]
        probe = target.probe
        probe.targets.remove(target)
        if not probe.targets:
            self.probes.pop(probe.key, None)
            probe.active = False  # its entries in the wheel are skipped from now on
            if probe.abandon is not None:
                probe.abandon()
                probe.abandon = None

    # -- checking ------------------------------------------------------------------
    #
    # No task and no timer per probe: the wheel calls ``_due`` with a probe whose next
    # check or whose deadline has come; the check's last callback records the result
    # and puts the probe back on the wheel. With thousands of nodes this keeps the
    # Python side of a check to a few callbacks, and the loop's wake-ups few.

    def _due(self, probe: Probe, generation: int) -> None:
        if not probe.active or generation != probe.generation:
            return  # dropped, or the check this deadline was for has ended
        if probe.abandon is not None:  # the deadline of the check in flight
            abandon, probe.abandon = probe.abandon, None
            abandon()
            self._finished(probe, generation,
                           CheckResult(False, f"timed out after {probe.config.timeout:g}s"))
            return
        probe.generation += 1
        generation = probe.generation
        probe.started = self._wheel.now()
        probe.began = time.perf_counter()
        self._wheel.add(probe.started + probe.config.timeout, probe, generation, late=True)
        try:
            abandon = probe.checker.start(
                probe.config.timeout,
                lambda result: self._finished(probe, generation, result), self._leftovers)
            if probe.generation == generation:  # not already finished inside start()
                probe.abandon = abandon
            if self._prober.outstanding:
                self._wheel.poll_soon()
        except Exception as exc:  # a checker that cannot even start: counted as a failure
            log.exception("upstream %s: check could not start", probe.upstream)
            self._finished(probe, generation,
                           CheckResult(False, f"check failed: {type(exc).__name__}"))

    def _finished(self, probe: Probe, generation: int, result: CheckResult) -> None:
        if not probe.active or generation != probe.generation:
            return  # abandoned at its deadline, or dropped: its result is not wanted
        probe.abandon = None
        probe.generation += 1  # the deadline entry is now stale
        self._record(probe, result, time.perf_counter() - probe.began)
        if probe.active:
            pause = probe.config.interval * self.rng.uniform(1 - JITTER, 1 + JITTER)
            self._wheel.add(max(self._wheel.now(), probe.started + pause), probe,
                            probe.generation)

    async def check_now(self, target: Target) -> Transition | None:
        """Run one check of ``target``'s node, cut at its timeout, and record the result."""
        probe = target.probe
        began = time.perf_counter()
        result = await probe.checker.run(probe.config.timeout, self._leftovers)
        return self._record(probe, result, time.perf_counter() - began)

    def _record(self, probe: Probe, result: CheckResult, duration: float) -> Transition | None:
        probe.durations.observe(duration)
        probe.last = result
        probe.last_at = time.time()
        probe.last_duration = duration
        if result.ok:
            probe.checks_ok += 1
        else:
            probe.checks_failed += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("listener %s upstream %s check failed: %s",
                          _names(probe.targets), probe.upstream, result.reason)
        if not result.ok and result.reason == LOCAL_FAILURE:
            return None  # our own shortage, not the node's: the state stands
        transition = probe.health.record(result.ok, result.reason)
        if transition is not None:
            probe.since = time.time()
            if transition.is_flip:
                probe.changes += 1
            for target in list(probe.targets):
                self._changed(target, transition)
        return transition

    def _check_tls(self, tls: UpstreamTlsConfig | None, upstream: Address) -> CheckTls | None:
        """The same client context the listener builds, with this upstream's SNI name."""
        if tls is None:
            return None
        context = self._contexts.get(tls)
        if context is None:
            context = self._contexts[tls] = client_context(tls)
        return CheckTls(context, tls.server_name or upstream.host)

    def _changed(self, target: Target, transition: Transition) -> None:
        level = logging.WARNING if transition.new is State.DOWN else logging.INFO
        plural = "" if transition.checks == 1 else "s"
        log.log(level, "listener %s upstream %s %s -> %s (reason: %s, %d check%s)",
                target.listener, target.upstream, transition.old, transition.new,
                transition.reason, transition.checks, plural)
        if self.on_change is not None:
            try:
                self.on_change(target, transition)
            except Exception:
                log.exception("listener %s: acting on upstream %s going %s failed",
                              target.listener, target.upstream, transition.new)


def _names(targets: list[Target], shown: int = 3) -> str:
    """``a, b, c and 5 more``: the listeners of a shared probe, for a log line."""
    names = [t.listener for t in targets[:shown]]
    more = len(targets) - shown
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


class _Wheel:
    """Due times on a grid of ``TICK``: one loop timer for the earliest tick, not one per probe.

    ``add(when, probe, generation)`` files the probe under the first tick at or after
    ``when``; when a tick comes, ``due(probe, generation)`` is called for each entry,
    and the timer is set for the next tick that has any. uvloop makes a libuv timer
    per ``call_at``; thousands of probes each with a next check and a deadline made
    thousands of them a second. While the prober has checks out, the wheel also
    ticks to collect their results.
    """

    def __init__(self, due: Callable[[Probe, int], None], prober: Prober) -> None:
        self.due = due
        self.prober = prober
        self.slots: dict[int, list[tuple[Probe, int]]] = {}
        self.ticks: list[int] = []  # heap of the slots' keys
        self.timer: asyncio.TimerHandle | None = None
        self.armed: int | None = None  # the tick the timer is set for
        self.closed = False

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def _now_tick(self) -> int:
        return math.floor(self.now() / TICK + 1e-6)

    def add(self, when: float, probe: Probe, generation: int, late: bool = False) -> None:
        """File ``probe`` at the tick nearest ``when`` (so intervals keep their mean),
        or with ``late`` the first at or after it (a deadline is never early)."""
        if self.closed:
            return
        tick = math.ceil(when / TICK) if late else max(round(when / TICK), self._now_tick())
        slot = self.slots.get(tick)
        if slot is None:
            slot = self.slots[tick] = []
            heapq.heappush(self.ticks, tick)
        slot.append((probe, generation))
        if self.armed is None or tick < self.armed:
            self._arm(tick)

    def poll_soon(self) -> None:
        """A check went to the prober: tick next time round to collect its result."""
        if self.closed:
            return
        tick = self._now_tick() + 1
        if self.armed is None or tick < self.armed:
            self._arm(tick)

    def _arm(self, tick: int) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.armed = tick
        self.timer = asyncio.get_running_loop().call_at(tick * TICK, self._run)

    def _run(self) -> None:
        self.timer = self.armed = None
        self.prober.collect()
        now = self._now_tick()
        while self.ticks and self.ticks[0] <= now and not self.closed:
            for probe, generation in self.slots.pop(heapq.heappop(self.ticks)):
                try:
                    self.due(probe, generation)
                except Exception:  # one probe's failure must not stop the others' checks
                    log.exception("upstream %s: scheduling its check failed", probe.upstream)
        if self.closed:
            return
        if self.prober.outstanding:
            self._arm(min(now + 1, self.ticks[0]) if self.ticks else now + 1)
        elif self.ticks:
            self._arm(self.ticks[0])

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.armed = None
        self.slots.clear()
        self.ticks.clear()
