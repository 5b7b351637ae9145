"""The wire check: its requests and verdicts without sockets, then against real servers,
where it must agree with the client-library checkers reason for reason."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
from collections.abc import Iterator

import pytest

from proxy.config import Address, HealthConfig, Secret
from proxy.health.checks import CheckResult, MemcachedChecker, RedisChecker, WireChecker
from proxy.health.prober import Prober
from proxy.health.wire import Judge, request
from tests.healthkit import closed_port, secured_redis_server
from tests.support import ServerProcess

PASSWORD = "c0rrect-h0rse-battery"
WRONG = "wr0ng-passw0rd-staple"


def cfg(kind: str, **kw: object) -> HealthConfig:
    kw.setdefault("timeout", 1.0)
    return HealthConfig(kind=kind, **kw)  # type: ignore[arg-type]


def judge_bytewise(config: HealthConfig, reply: bytes) -> tuple[bool, str] | None:
    """Feed the reply one byte at a time: the verdict must not depend on how it is split."""
    judge = Judge(config)
    for i in range(len(reply)):
        verdict = judge.feed(reply[i:i + 1])
        if verdict is not None:
            return verdict.ok, verdict.reason
    return None


# -- no sockets --------------------------------------------------------------------------


def test_requests_pipeline_auth_ping_and_role() -> None:
    assert request(cfg("tcp")) == b""
    assert request(cfg("memcached")) == b"version\r\n"
    assert request(cfg("memcached", stats=True)) == b"version\r\nstats\r\n"
    assert request(cfg("redis")) == b"*1\r\n$4\r\nPING\r\n"
    assert request(cfg("redis", username="u", password=Secret("pw"), role="primary")) == (
        b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$2\r\npw\r\n*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nROLE\r\n")


@pytest.mark.parametrize(("config", "reply", "verdict"), [
    (cfg("redis"), b"+PONG\r\n", (True, "PONG")),
    (cfg("redis"), b"-NOAUTH Authentication required.\r\n", (False, "auth failed")),
    (cfg("redis"), b"-LOADING Redis is loading the dataset\r\n",
     (False, "loading its dataset")),
    (cfg("redis"), b"-NOPERM no\r\n",
     (False, "no permission (the ACL user may not run PING/ROLE)")),
    (cfg("redis"), b"ERROR\r\n", (False, "not a redis reply (is this a redis node?)")),
    (cfg("redis", password=Secret("pw")), b"-WRONGPASS bad\r\n-NOAUTH x\r\n",
     (False, "auth failed")),
    (cfg("redis", password=Secret("pw"), role="primary"),
     b"+OK\r\n+PONG\r\n*3\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n",
     (False, "role is replica, not primary")),
    (cfg("redis", role="primary"), b"+PONG\r\n*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n",
     (True, "PONG, role master")),
    (cfg("memcached"), b"VERSION 1.6.18\r\n", (True, "VERSION 1.6.18")),
    (cfg("memcached"), b"-ERR unknown command 'version'\r\n",
     (False, "unexpected reply: -ERR unknown command 'version'")),
])
def test_the_judge_reads_a_verdict_however_the_reply_is_split(
        config: HealthConfig, reply: bytes, verdict: tuple[bool, str]) -> None:
    assert judge_bytewise(config, reply) == verdict


def test_memcached_stats_waits_for_end_and_reads_curr_connections() -> None:
    judge = Judge(cfg("memcached", stats=True))
    assert judge.feed(b"VERSION 1.6.18\r\nSTAT pid 1\r\n") is None
    verdict = judge.feed(b"STAT curr_connections 7\r\nEND\r\n")
    assert verdict is not None and verdict.ok
    assert verdict.detail == {"version": "1.6.18", "curr_connections": 7}


def test_a_node_echoing_the_password_never_puts_it_in_a_reason() -> None:
    judge = Judge(cfg("redis", password=Secret(PASSWORD)))
    verdict = judge.feed(b"+OK\r\n-ERR weird " + PASSWORD.encode() + b"\r\n")
    assert verdict is not None and PASSWORD not in verdict.reason


# -- against real servers ------------------------------------------------------------------


@pytest.fixture
def secured_redis() -> Iterator[ServerProcess]:
    with secured_redis_server(PASSWORD) as server:
        yield server


async def on_prober(checker_of: type[WireChecker], address: Address,
                    config: HealthConfig) -> CheckResult:
    """One check the monitor's way: on the prober thread, results collected on the loop."""
    prober = Prober()
    try:
        checker = checker_of(address, config, None, prober)
        results: list[CheckResult] = []
        checker.start(config.timeout, results.append)
        async with asyncio.timeout(5):
            while not results:
                await asyncio.sleep(0.005)
                prober.collect()
        return results[0]
    finally:
        prober.close()


async def test_wire_and_library_checks_give_the_same_reasons(
        secured_redis: ServerProcess, memcached: ServerProcess) -> None:
    redis_at = Address("127.0.0.1", secured_redis.port)
    memcached_at = Address("127.0.0.1", memcached.port)
    cases = [
        (redis_at, cfg("redis", password=Secret(PASSWORD))),
        (redis_at, cfg("redis", username="checker", password=Secret(PASSWORD),
                       role="primary")),
        (redis_at, cfg("redis", password=Secret(WRONG))),
        (redis_at, cfg("redis")),  # NOAUTH
        (Address("127.0.0.1", closed_port()), cfg("redis")),
        (memcached_at, cfg("memcached")),
        (Address("127.0.0.1", closed_port()), cfg("memcached")),
    ]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    try:
        for address, config in cases:
            library = (RedisChecker(address, config) if config.kind == "redis"
                       else MemcachedChecker(address, config, pool))
            expected = await library.run(5.0)
            threaded = await on_prober(WireChecker, address, config)
            on_loop = await WireChecker(address, config).run(5.0)
            for result in (threaded, on_loop):
                assert (result.ok, result.reason) == (expected.ok, expected.reason), config
                assert PASSWORD not in repr(result) and WRONG not in repr(result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


async def test_a_node_named_by_host_name_is_resolved_once_and_checked_on_the_prober(
        redis_server: ServerProcess) -> None:
    config = cfg("redis")
    named = Address("localhost", redis_server.port)
    result = await on_prober(WireChecker, named, config)
    assert (result.ok, result.reason) == (True, "PONG")
    missing = await on_prober(WireChecker, Address("no-such-node.invalid", 6379), config)
    assert not missing.ok and missing.reason.startswith("cannot resolve")


async def test_a_check_cancelled_in_flight_leaves_the_thread_checking() -> None:
    """A reload cancels checks still waiting for a reply; the next checks must still run."""
    silent = socket.socket()  # accepts (the kernel does) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    prober = Prober()
    try:
        config = cfg("redis", timeout=5.0)
        address = Address("127.0.0.1", silent.getsockname()[1])
        stuck = WireChecker(address, config, None, prober)
        first: list[CheckResult] = []
        stuck.start(config.timeout, first.append)
        async with asyncio.timeout(5):
            while not any(job.sock is not None for job in prober.outstanding):
                await asyncio.sleep(0.005)
                prober.collect()  # nothing to collect yet: the node never answers
        for job in list(prober.outstanding):
            prober.cancel(job)
        checker = WireChecker(Address("127.0.0.1", closed_port()), cfg("redis"), None, prober)
        results: list[CheckResult] = []
        checker.start(1.0, results.append)
        async with asyncio.timeout(5):
            while not results:
                await asyncio.sleep(0.005)
                prober.collect()
        assert not results[0].ok and first == []
        assert prober._thread is not None and prober._thread.is_alive()
    finally:
        prober.close()
        silent.close()
