"""Fixtures: real memcached and redis-server processes, stopped by PID after each test."""

from __future__ import annotations

import gc
import os
import sys
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


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """When a test failed, free what its traceback held now, in its own teardown.

    The failure's frames (and every local in them: sockets a failed assertion left open)
    sit in a reference cycle, collected whenever the cyclic GC next runs -- during some
    later test, whose ResourceWarning (an error here) then failed it too. Collected here,
    the warning is reported by pytest's own (trylast) teardown hook, on the test that
    leaked: one failure stays one failure.
    """
    if getattr(sys, "last_value", None) is None:
        return
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)
    gc.collect()


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
