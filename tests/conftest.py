"""Fixtures: real memcached and redis-server processes, stopped by PID after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import ServerProcess, start_server


@pytest.fixture
def memcached() -> Iterator[ServerProcess]:
    """memcached with 2 MB items, so 1 MB values fit."""
    server = start_server("memcached", ["-I", "2m"])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server() -> Iterator[ServerProcess]:
    server = start_server("redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    """Run a test on uvloop (the default) and on plain asyncio (``--loop asyncio``)."""
    return str(request.param)


@pytest.fixture(params=["splice", "buffer", "auto", "sockmap"])
def copy_mode(request: pytest.FixtureRequest) -> str:
    """The copy path under test (``copy:``): splice(2) through pipes, through a buffer,
    auto (small reads through a buffer, bulk through pipes), or the kernel (BPF sockmap;
    skipped where the kernel refuses the program, e.g. without root)."""
    if request.param == "sockmap":
        from proxy import sockmap

        if sockmap.kernel_for_process() is None:
            pytest.skip("copy: sockmap: the kernel refused the BPF program (needs CAP_BPF "
                        "and CAP_NET_ADMIN)")
    return str(request.param)
