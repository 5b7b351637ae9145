"""The soak's short form: ~70 s of mixed load through cacheport (``workers: 2``) while a
seeded schedule kills a memcached node, fails a Redis primary over behind its DNS name,
reshards the cluster, adds and removes a cluster node, SIGKILLs a worker, resets and
half-closes clients, black-holes an upstream, fills the open-files limit, and reloads
every few seconds (some maps invalid).

It passes only if every acknowledged write reads back, client errors fall inside fault
windows, descriptors and RSS are back to baseline, the log holds no unexplained warning
or traceback, and /metrics agrees with a counted load (bench/soak/run.py has the
tolerances). ``pytest -m "not soak"`` skips it; the long form is run by hand
(bench/README.md, "Soak"). The schedule and its parts are also tested without sockets.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.soak.ledger import ClientError, KeyState, Ledger, Window, attribute, digest, verify
from bench.soak.rig import prerequisites
from bench.soak.schedule import KINDS, SHORT, make_schedule
from tests.support import ROOT, cacheport_env

SEED = int(os.environ.get("CACHEPORT_SOAK_SEED", "20261206"))


def test_the_schedule_is_a_function_of_its_seed() -> None:
    assert make_schedule(7, 600) == make_schedule(7, 600)
    assert make_schedule(7, 600) != make_schedule(8, 600)


def test_every_round_holds_each_kind_once_in_order_of_time() -> None:
    s = make_schedule(3, 1800, tuple(KINDS))
    counts = {k: sum(f.kind == k for f in s.faults) for k in KINDS}
    assert len(set(counts.values())) == 1 and counts["fd_limit"] >= 20
    times = [f.at for f in s.faults]
    assert times == sorted(times) and times[0] >= 8 and times[-1] < 1800 - 8
    assert any(not r.valid for r in s.reloads) and any(r.valid for r in s.reloads)


def test_a_short_schedule_still_injects_every_short_kind_once() -> None:
    s = make_schedule(1, 70)
    assert sorted(f.kind for f in s.faults) == sorted(SHORT)
    assert s.lines()[0].startswith("soak schedule: seed 1, 70 s, 8 faults")


def test_a_write_that_failed_may_have_landed_but_nothing_else() -> None:
    ledger = Ledger()
    ledger.acked_write("redis", "a", b"1")
    ledger.failed_write("redis", "a", b"2")
    ledger.acked_write("redis", "b", b"1")
    ledger.acked_write("redis", "c", b"1")
    ledger.failed_write("redis", "d", b"late")  # timed out, delivered after the next ack
    ledger.acked_write("redis", "d", b"1")
    store = {"a": b"2", "b": b"1", "c": b"other", "d": b"late"}
    v = verify(ledger.to_verify("redis"), lambda keys: [store.get(k) for k in keys])
    assert (v.checked, v.ok, v.landed_unacked, v.landed_late, len(v.bad)) == (4, 1, 1, 1, 1)
    assert v.bad[0].startswith("c: read ")


def test_a_killed_memcached_node_forgets_what_it_held() -> None:
    ledger = Ledger()
    ledger.acked_write("memcached", "k", b"v")
    assert ledger.forget("memcached", time.monotonic() + 1) == 1
    assert ledger.to_verify("memcached") == []
    assert KeyState().acked is None and len(digest(b"x")) == 24


def test_errors_go_to_the_latest_window_they_fall_in_and_the_rest_are_stray() -> None:
    windows = [Window("failover", 10, 12), Window("reshard", 11, 20)]
    errors = [ClientError(t, "kv0", "x") for t in (10.5, 11.5, 23.0, 25.0)]
    per, stray = attribute(errors, windows, grace=4)
    assert per == {"failover": 1, "reshard": 2}
    assert [e.at for e in stray] == [25.0]


_MISSING = prerequisites()


@pytest.mark.soak
@pytest.mark.timeout(240)
@pytest.mark.skipif(bool(_MISSING), reason=f"the soak needs {', '.join(_MISSING)}")
def test_short_soak_loses_no_acknowledged_write_and_leaks_nothing(tmp_path: Path) -> None:
    report = tmp_path / "soak.md"
    out = subprocess.run(
        [sys.executable, "-m", "bench", "soak", "--duration", "70", "--seed", str(SEED),
         "--report", str(report), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=220, cwd=ROOT, env=cacheport_env())
    text = report.read_text() if report.exists() else out.stdout
    assert f"soak schedule: seed {SEED}" in out.stdout
    assert out.returncode == 0, f"{text}\n{out.stderr[-3000:]}"
    assert "Verdict: **PASS**" in text
    for kind in SHORT:
        assert re.search(rf"^\| {kind} \| 1 \|", text, re.M), (kind, text)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "soak.png").stat().st_size > 10_000
