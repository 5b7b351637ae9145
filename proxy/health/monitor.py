"""Schedules the checks of every (listener, upstream) pair and reports state changes.

::

    HealthMonitor --one task per Target--> checker.check() (cut at timeout)
         |                                       |
         |<------------ CheckResult -------------+
         +--> HealthState.record() --Transition--> log line, on_change(target, transition)

Each target runs on its own timer, ``interval`` apart from one check's start to
the next, stretched or shrunk by a random ``JITTER`` so checks of many nodes do
not fire together. The first check comes within the first ``JITTER`` of an
interval, so a dead node is known soon after start. Nothing here blocks the
event loop: TCP and redis checks are asyncio, memcached checks run in a bounded
thread pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator

from ..config import Address, HealthConfig, ListenerConfig, UpstreamTlsConfig
from ..metrics import CHECK_DURATION_BUCKETS, Buckets
from ..tls import client_context
from .checks import Checker, CheckResult, CheckTls, make_checker, run_check
from .state import HealthState, State, Transition

log = logging.getLogger("cacheport.health")

JITTER = 0.1  # each interval is drawn from [0.9, 1.1] x interval
MAX_CHECK_THREADS = 32  # memcached checks in flight at once (one per node at most)

OnChange = Callable[["Target", Transition], None]


class Target:
    """One upstream of one listener under check, with what its checks have seen."""

    def __init__(self, listener: str, upstream: Address, config: HealthConfig,
                 backup: bool, checker: Checker, tls: UpstreamTlsConfig | None = None) -> None:
        self.listener = listener
        self.upstream = upstream
        self.config = config
        self.tls = tls
        self.backup = backup
        self.checker = checker
        self.health = HealthState(config.rise, config.fall)
        self.last: CheckResult | None = None
        self.last_at: float | None = None  # wall clock, for /status
        self.last_duration: float | None = None
        self.since = time.time()  # when the state last changed
        self.changes = 0  # UP <-> DOWN flips
        self.checks_ok = 0
        self.checks_failed = 0
        self.durations = Buckets(CHECK_DURATION_BUCKETS)
        self.task: asyncio.Task[None] | None = None

    @property
    def state(self) -> State:
        return self.health.state

    @property
    def key(self) -> tuple[str, Address]:
        return (self.listener, self.upstream)


class HealthMonitor:
    """Owns the check tasks and the thread pool; answers "what state is this upstream in"."""

    def __init__(self, on_change: OnChange | None = None, *,
                 rng: random.Random | None = None) -> None:
        self.on_change = on_change
        self.targets: dict[tuple[str, Address], Target] = {}
        self.rng = rng or random.Random()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._leftovers: set[asyncio.Task[CheckResult]] = set()  # checks cut at their timeout
        self._started = False
        self._stopped = False

    # -- what the listeners and the admin endpoint ask --------------------------

    def state(self, listener: str, upstream: Address) -> State | None:
        """The upstream's state, or ``None`` when it is not checked (always usable)."""
        target = self.targets.get((listener, upstream))
        return target.health.state if target is not None else None

    def targets_of(self, listener: str) -> list[Target]:
        return [t for t in self.targets.values() if t.listener == listener]

    def __iter__(self) -> Iterator[Target]:
        return iter(list(self.targets.values()))

    # -- life cycle ----------------------------------------------------------------

    def sync(self, listeners: Iterable[ListenerConfig]) -> None:
        """Check exactly these listeners' upstreams; unchanged targets keep their state.

        Called at start and, later, by a reload: a target whose listener, address
        and health settings are unchanged keeps its counts, so a reload does not
        forget that a node is DOWN.
        """
        Wanted = tuple[HealthConfig, bool, UpstreamTlsConfig | None]
        wanted: dict[tuple[str, Address], Wanted] = {}
        for lc in listeners:
            if lc.health is None:
                continue
            for index, address in enumerate(lc.upstreams):
                wanted[(lc.name, address)] = (lc.health, index > 0, lc.upstream_tls)
        for key, target in list(self.targets.items()):
            spec = wanted.get(key)
            if spec is None or spec[0] != target.config or spec[2] != target.tls:
                self._drop(target)
            else:
                target.backup = spec[1]
        for key, (config, backup, tls) in wanted.items():
            if key not in self.targets:
                checker = make_checker(key[1], config, self._thread_pool(),
                                       _check_tls(tls, key[1]))
                target = Target(key[0], key[1], config, backup, checker, tls)
                self.targets[key] = target
                if self._started:
                    self._launch(target)

    def start(self) -> None:
        """Start checking (inside the running loop)."""
        if self._started or self._stopped:
            return
        self._started = True
        for target in self.targets.values():
            self._launch(target)

    async def stop(self) -> None:
        """Cancel every check; threads still blocked in a memcached check end by timeout."""
        if self._stopped:
            return
        self._stopped = True
        targets = list(self.targets.values())
        for target in targets:
            self._drop(target)
        tasks = [t.task for t in targets if t.task is not None]
        grace = max((t.config.timeout for t in targets), default=1.0) + 0.5
        if tasks:
            # Bounded: a client library that swallows a cancellation must not hang a stop.
            await asyncio.wait(tasks, timeout=grace)
        # Checks cut short still close their connections; their own socket timeouts
        # bound how long that can take.
        leftovers = list(self._leftovers)
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.wait(leftovers, timeout=grace)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _thread_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        # Threads are made only as needed, so the bound costs nothing when idle.
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=MAX_CHECK_THREADS, thread_name_prefix="cacheport-check")
        return self._pool

    def _launch(self, target: Target) -> None:
        target.task = asyncio.get_running_loop().create_task(
            self._run(target), name=f"health {target.listener} {target.upstream}")

    def _drop(self, target: Target) -> None:
        self.targets.pop(target.key, None)
        if target.task is not None:
            target.task.cancel()

    # -- checking ------------------------------------------------------------------

    async def _run(self, target: Target) -> None:
        loop = asyncio.get_running_loop()
        interval = target.config.interval
        await asyncio.sleep(self.rng.uniform(0, JITTER * interval))
        while True:
            started = loop.time()
            await self.check_now(target)
            pause = interval * self.rng.uniform(1 - JITTER, 1 + JITTER)
            await asyncio.sleep(max(0.0, started + pause - loop.time()))

    async def check_now(self, target: Target) -> Transition | None:
        """Run one check of ``target``, cut at its timeout, and record the result."""
        timeout = target.config.timeout
        began = time.perf_counter()
        result = await run_check(target.checker, timeout, self._leftovers)
        duration = time.perf_counter() - began
        target.durations.observe(duration)
        target.last = result
        target.last_at = time.time()
        target.last_duration = duration
        if result.ok:
            target.checks_ok += 1
        else:
            target.checks_failed += 1
            log.debug("listener %s upstream %s check failed: %s",
                      target.listener, target.upstream, result.reason)
        transition = target.health.record(result.ok, result.reason)
        if transition is not None:
            self._changed(target, transition)
        return transition

    def _changed(self, target: Target, transition: Transition) -> None:
        target.since = time.time()
        if transition.is_flip:
            target.changes += 1
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


def _check_tls(tls: UpstreamTlsConfig | None, upstream: Address) -> CheckTls | None:
    """The same client context the listener builds, with this upstream's SNI name."""
    if tls is None:
        return None
    return CheckTls(client_context(tls), tls.server_name or upstream.host)
