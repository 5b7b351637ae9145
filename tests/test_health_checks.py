"""Each checker against real memcached and redis-server, and the monitor's timing."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from proxy.config import Address, HealthConfig, ListenerConfig, Secret
from proxy.health.checks import (
    Checker,
    CheckResult,
    MemcachedChecker,
    RedisChecker,
    TcpChecker,
    run_check,
)
from proxy.health.monitor import HealthMonitor, Target
from proxy.health.state import State
from tests.healthkit import DOWN_WITHIN, UP_WITHIN, closed_port, secured_redis_server, silent_server
from tests.support import ServerProcess, start_server

PASSWORD = "c0rrect-h0rse-battery"
WRONG = "wr0ng-passw0rd-staple"


def addr(server: ServerProcess | int) -> Address:
    port = server if isinstance(server, int) else server.port
    return Address("127.0.0.1", port)


def cfg(kind: str, **kw: object) -> HealthConfig:
    kw.setdefault("interval", 0.2)
    kw.setdefault("timeout", 0.2)
    return HealthConfig(kind=kind, **kw)  # type: ignore[arg-type]


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=4)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def secured_redis() -> Iterator[ServerProcess]:
    """redis-server with ``requirepass`` and an ACL user that may only PING and ROLE."""
    with secured_redis_server(PASSWORD) as server:
        yield server


async def run(checker: Checker, limit: float = 5.0) -> CheckResult:
    return await run_check(checker, limit)


async def test_tcp_check_passes_on_a_listening_port_and_fails_on_a_closed_one(
        redis_server: ServerProcess) -> None:
    assert (await run(TcpChecker(addr(redis_server), cfg("tcp")))).ok
    result = await run(TcpChecker(addr(closed_port()), cfg("tcp")))
    assert (result.ok, result.reason) == (False, "connection refused")


async def test_memcached_check_reads_version_and_stats(
        memcached: ServerProcess, pool: concurrent.futures.ThreadPoolExecutor) -> None:
    result = await run(MemcachedChecker(addr(memcached), cfg("memcached", stats=True), pool))
    assert result.ok
    assert result.reason.startswith("VERSION 1.")
    assert result.detail["version"] == result.reason.removeprefix("VERSION ")
    assert isinstance(result.detail["curr_connections"], int)
    memcached.kill()
    result = await run(MemcachedChecker(addr(memcached), cfg("memcached"), pool))
    assert (result.ok, result.reason) == (False, "connection refused")


async def test_redis_check_pings(redis_server: ServerProcess) -> None:
    result = await run(RedisChecker(addr(redis_server), cfg("redis")))
    assert (result.ok, result.reason) == (True, "PONG")
    redis_server.kill()
    result = await run(RedisChecker(addr(redis_server), cfg("redis")))
    assert (result.ok, result.reason) == (False, "connection refused")


async def test_redis_check_authenticates_with_requirepass_and_an_acl_user(
        secured_redis: ServerProcess) -> None:
    target = addr(secured_redis)
    cases = [
        (cfg("redis", password=Secret(PASSWORD)), True, "PONG"),
        (cfg("redis", username="checker", password=Secret(PASSWORD)), True, "PONG"),
        (cfg("redis", username="checker", password=Secret(PASSWORD), role="primary"),
         True, "PONG, role master"),
        (cfg("redis", password=Secret(WRONG)), False, "auth failed"),
        (cfg("redis", username="checker", password=Secret(WRONG)), False, "auth failed"),
        (cfg("redis", username="nobody", password=Secret(PASSWORD)), False, "auth failed"),
        (cfg("redis"), False, "auth failed"),  # NOAUTH
    ]
    for config, ok, reason in cases:
        result = await run(RedisChecker(target, config))
        assert (result.ok, result.reason) == (ok, reason), config
        assert PASSWORD not in repr(result) and WRONG not in repr(result)


async def test_redis_role_primary_fails_on_a_replica(redis_server: ServerProcess,
                                                     tmp_path: Path) -> None:
    replica = start_server("redis", ["--replicaof", "127.0.0.1", str(redis_server.port),
                                     "--dir", str(tmp_path)])  # its sync writes dump.rdb
    try:
        result = await run(RedisChecker(addr(replica), cfg("redis", role="primary")))
        assert (result.ok, result.reason) == (False, "role is replica, not primary")
        assert result.detail == {"role": "replica"}
        assert (await run(RedisChecker(addr(replica), cfg("redis")))).ok  # role: any
        assert (await run(RedisChecker(addr(redis_server), cfg("redis", role="primary")))).ok
    finally:
        replica.stop()


async def test_protocol_checks_notice_the_wrong_kind_of_node(
        memcached: ServerProcess, redis_server: ServerProcess,
        pool: concurrent.futures.ThreadPoolExecutor) -> None:
    as_redis = await run(RedisChecker(addr(memcached), cfg("redis", timeout=0.5)))
    assert not as_redis.ok
    as_memcached = await run(MemcachedChecker(addr(redis_server), cfg("memcached",
                                                                      timeout=0.5), pool))
    assert not as_memcached.ok


# -- the monitor -----------------------------------------------------------------------


@pytest.fixture
async def monitor() -> AsyncIterator[HealthMonitor]:
    mon = HealthMonitor()
    try:
        yield mon
    finally:
        await mon.stop()


def listener(name: str, upstream: Address, health: HealthConfig | None,
             backup: tuple[Address, ...] = ()) -> ListenerConfig:
    return ListenerConfig(name=name, listen=Address("127.0.0.1", 0), upstream=upstream,
                          protocol=health.kind if health else "tcp", health=health,
                          backup=backup)


async def wait_state(mon: HealthMonitor, name: str, upstream: Address, state: State,
                     within: float) -> float:
    began = time.monotonic()
    async with asyncio.timeout(within):
        while True:
            if mon.state(name, upstream) is state:
                return time.monotonic() - began
            await asyncio.sleep(0.01)


async def test_a_silent_node_goes_down_by_the_check_timeout(monitor: HealthMonitor) -> None:
    """A node that accepts TCP but never answers: memcached and redis checks time out."""
    with silent_server() as port:
        target = addr(port)
        monitor.sync([listener("m", target, cfg("memcached")),
                      listener("r", target, cfg("redis")),
                      listener("t", target, cfg("tcp"))])
        monitor.start()
        await wait_state(monitor, "m", target, State.DOWN, DOWN_WITHIN)
        await wait_state(monitor, "r", target, State.DOWN, DOWN_WITHIN)
        await wait_state(monitor, "t", target, State.UP, DOWN_WITHIN)  # TCP connects
        for name in ("m", "r"):
            [t] = monitor.targets_of(name)
            assert t.last is not None
            assert t.last.reason.startswith("timed out"), t.last.reason
            assert t.last_duration is not None and t.last_duration < 0.2 + 0.5


async def test_hanging_checks_never_block_the_event_loop(monitor: HealthMonitor) -> None:
    with silent_server() as port:
        nodes = [listener(f"m{i}", addr(port), cfg("memcached", timeout=0.2, interval=0.2))
                 for i in range(6)]
        monitor.sync(nodes)
        monitor.start()
        # A check that blocked the loop would hold it for its whole 0.2 s timeout, six
        # nodes every 0.2 s: the loop would be stalled nearly all the time. Sum the stalls
        # rather than bound the worst one: on a loaded 2-core machine the scheduler alone
        # can hold this thread off for 0.1 s now and then.
        window = 1.5
        stalled = worst = 0.0
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:
            began = time.perf_counter()
            await asyncio.sleep(0.005)
            lag = time.perf_counter() - began - 0.005
            worst = max(worst, lag)
            stalled += lag if lag > 0.02 else 0.0
        assert stalled < window / 2, (f"the loop stalled {stalled:.2f}s of {window}s "
                                      f"(worst {worst:.3f}s) while checks hung")
        for n in nodes:
            await wait_state(monitor, n.name, n.upstream, State.DOWN, DOWN_WITHIN)


async def test_memcached_checker_keeps_one_thread_per_node(
        pool: concurrent.futures.ThreadPoolExecutor) -> None:
    with silent_server() as port:
        checker = MemcachedChecker(addr(port), cfg("memcached", timeout=0.5, interval=0.5),
                                   pool)
        first = asyncio.ensure_future(checker.check())
        await asyncio.sleep(0.05)
        second = await run(checker)  # the first is still blocked in its thread
        assert (second.ok, second.reason) == (
            False, "timed out (the previous check is still waiting)")
        with pytest.raises(TimeoutError):  # pymemcache's own socket timeout ends the thread
            await asyncio.wait_for(first, 5)


async def test_monitor_marks_a_killed_node_down_then_up_and_logs_each_change_once(
        monitor: HealthMonitor, redis_server: ServerProcess,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cacheport.health")
    changes: list[tuple[str, State, State]] = []

    def on_change(target: Target, transition: object) -> None:
        changes.append((target.listener, target.state, target.state))

    monitor.on_change = on_change
    target = addr(redis_server)
    monitor.sync([listener("cache", target, cfg("redis"))])
    monitor.start()
    await wait_state(monitor, "cache", target, State.UP, UP_WITHIN)
    redis_server.kill()
    took = await wait_state(monitor, "cache", target, State.DOWN, DOWN_WITHIN)
    assert took >= 0.2 * 0.9 * 2, "went DOWN before fall=3 checks could have run"
    redis_server.restart()
    await wait_state(monitor, "cache", target, State.UP, UP_WITHIN)
    lines = [r.getMessage() for r in caplog.records if r.name == "cacheport.health"]
    assert lines == [
        f"listener cache upstream {target} UNKNOWN -> UP (reason: PONG, 1 check)",
        f"listener cache upstream {target} UP -> DOWN (reason: connection refused, 3 checks)",
        f"listener cache upstream {target} DOWN -> UP (reason: PONG, 2 checks)",
    ]
    [t] = monitor.targets_of("cache")
    assert t.changes == 2
    assert len(changes) == 3
    assert t.checks_failed >= 3 and t.durations.count == t.checks_ok + t.checks_failed


async def test_sync_keeps_unchanged_targets_and_drops_removed_ones(
        monitor: HealthMonitor, redis_server: ServerProcess) -> None:
    target = addr(redis_server)
    down = addr(closed_port())
    monitor.sync([listener("a", target, cfg("redis"), backup=(down,)),
                  listener("b", target, cfg("tcp"))])
    monitor.start()
    await wait_state(monitor, "a", down, State.DOWN, DOWN_WITHIN)
    [kept] = [t for t in monitor.targets_of("a") if t.upstream == down]
    assert kept.backup
    monitor.sync([listener("a", target, cfg("redis"), backup=(down,)),
                  listener("c", target, None)])
    assert [t for t in monitor.targets_of("a") if t.upstream == down] == [kept]
    assert kept.state is State.DOWN  # a reload does not forget what the checks saw
    assert monitor.targets_of("b") == [] and monitor.targets_of("c") == []
    assert monitor.state("c", target) is None  # not checked: always usable
    await monitor.stop()
    await monitor.stop()  # twice is harmless
