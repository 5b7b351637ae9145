"""Fixtures: real memcached and redis-server processes, stopped by PID after each test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from proxy.relay.engine import native_available
from tests.certs import Pki, make_pki
from tests.support import ServerProcess, start_server

# Hypothesis profiles: the suite runs "ci" (a few seconds per fuzz test); by hand,
# ``pytest tests/test_fuzz_*.py --hypothesis-profile long --timeout 0`` (or
# HYPOTHESIS_PROFILE=long) runs HYPOTHESIS_EXAMPLES per test (default 50,000: minutes each).
settings.register_profile("ci", max_examples=300, deadline=None)
settings.register_profile("long", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES",
                                                                  50_000)),
                          deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def memcached() -> Iterator[ServerProcess]:
    """memcached with 2 MB items, so 1 MB values fit."""
    with start_server("memcached", ["-I", "2m"]) as server:
        yield server


@pytest.fixture
def redis_server() -> Iterator[ServerProcess]:
    with start_server("redis") as server:
        yield server


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A test CA, a server certificate for localhost, a client certificate and a CA that
    signed nothing, as files in the test's tmp_path (tests/certs.py)."""
    return make_pki(tmp_path)


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    """Run a test on uvloop (the default) and on plain asyncio (``--loop asyncio``)."""
    return str(request.param)


_NATIVE = pytest.mark.skipif(not native_available(),
                             reason="the native relay engine was not built here")


@pytest.fixture(params=["splice", "buffer", "auto",
                        *(pytest.param(f"native-{mode}", marks=_NATIVE)
                          for mode in ("splice", "buffer", "auto"))])
def copy_mode(request: pytest.FixtureRequest) -> str:
    """The copy path under test (``copy:``): splice(2) through pipes, through a buffer,
    or auto (small reads through a buffer, bulk through pipes) -- in the Python relays
    (``relay: python``) and, as ``native-*``, in the engine thread (``relay: native``).
    ``tests.support.copy_fields`` turns the name into listener fields."""
    return str(request.param)
