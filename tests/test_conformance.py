"""Redis's own test suite through every kind of listener: the CI subset of bench/conformance.py.

The suite runs once per module: direct, through a native and a python plain listener, a
TLS-terminating listener on each relay (against redis-server's own TLS) and a clusters:
entry on each relay (against the direct single-node cluster). The kinds run at once
(PARALLEL), each with its own servers: a run is mostly the suite waiting (blocking
timeouts), so together they take about a minute on 2 cores where one after another took
three. Each cacheport kind must pass every test its baseline passes. Where the suite
cannot be had (not Debian, no deb-src entry, no tcl) the tests skip and say what is
missing; under CI=true they fail instead, since CI's scripts/bootstrap.sh installs it.

The parser, the comparison and the generated port maps are tested without the suite.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from bench import conformance as cf
from proxy.config import load_yaml, parse_config

PROXIED = [k.name for k in cf.KINDS if k.baseline is not None]

# Failures already filed, by kind and test: they make a kind's test xfail (naming them)
# instead of failing it; any other difference fails. Remove an entry when its fix lands.
KNOWN: dict[tuple[str, str], str] = {}
# Kinds run at once: all of them. Each run's wall grows under it (the TLS runs' Tcl
# handshakes want CPU), the whole shrinks to about the longest run.
PARALLEL = len(cf.KINDS)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cf.Report]:
    try:
        src = cf.fetch_suite(say=lambda text: None)
    except cf.SuiteUnavailable as exc:
        message = f"Redis's test suite is not available here: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must have it: scripts/bootstrap.sh installs it)")
        pytest.skip(message)
    logs = tmp_path_factory.mktemp("conformance")
    yield cf.conformance(cf.SUBSET, cf.KIND_NAMES, cf.Limits(deadline=100, stall=20), logs,
                         say=lambda text: None, src=src, tls_units=cf.SUBSET_TLS,
                         parallel=PARALLEL)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("baseline", [k.name for k in cf.KINDS if k.baseline is None])
def test_baseline_runs_the_whole_subset_without_a_hang(report: cf.Report, baseline: str) -> None:
    run = report.runs[baseline]
    assert not run.unavailable, f"{baseline}: {run.unavailable}"
    assert not run.interruptions and not run.not_run, cf.format_report(report)
    # A run that printed nothing would make every comparison vacuous.
    assert run.count("ok") >= 150, cf.format_report(report)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", PROXIED)
def test_every_test_that_passes_on_the_baseline_passes_through_cacheport(
        report: cf.Report, kind: str) -> None:
    run = report.runs[kind]
    if run.unavailable:
        pytest.skip(f"{kind}: {run.unavailable}")
    (comparison,) = [c for c in report.comparisons if c.kind == kind]
    table = cf.format_report(report)
    unknown = [(base, through) for base, through in comparison.regressions
               if (kind, base.name) not in KNOWN]
    assert not unknown, table
    hangs = [i for i in run.interruptions if (kind, i.test) not in KNOWN]
    assert not hangs and not run.not_run, table
    if comparison.regressions:
        known = sorted({f"{b.name!r} ({KNOWN[kind, b.name]})" for b, _ in comparison.regressions})
        pytest.xfail(f"{kind}: known defects: {'; '.join(known)}")


# ---------------------------------------------------------------------------
# Without the suite

OUTPUT = """\
Starting test server at port 21079
[ready]: 1234
\x1b[1;37;49mTesting unit/protocol\x1b[0m
[\x1b[0;32;49mok\x1b[0m]: Handle an empty query (42 ms)
[\x1b[0;31;49merr\x1b[0m]: Protocol desync regression test #2 in tests/unit/protocol.tcl
Expected 'x' to equal or match 'y'
    while executing
[skip]: BRPOPLPUSH with multiple blocked clients
[ok]: Handle an empty query (3 ms)
[1/2 done]: unit/protocol (1 seconds)
Testing unit/introspection
[ignore]: MONITOR: Not supported on external server
[ok]: PING (0 ms)
[TIMEOUT]: clients state report follows.
sock55d7 => (IN PROGRESS) CLIENT KILL SKIPME YES/NO will kill all clients

                   The End
"""


def test_parser_reads_each_outcome_its_unit_and_the_hung_test() -> None:
    parser = cf.parse_output(OUTPUT)
    got = [(o.unit, o.name, o.status) for o in parser.outcomes]
    assert got == [
        ("unit/protocol", "Handle an empty query", "ok"),
        ("unit/protocol", "Protocol desync regression test #2", "err"),
        ("unit/protocol", "BRPOPLPUSH with multiple blocked clients", "skip"),
        ("unit/protocol", "Handle an empty query", "ok"),
        ("unit/introspection", "MONITOR: Not supported on external server", "ignore"),
        ("unit/introspection", "PING", "ok"),
    ]
    assert parser.outcomes[1].detail.startswith("Expected 'x' to equal or match 'y'")
    assert parser.done == ["unit/protocol"] and parser.ended
    (hang,) = parser.interruptions
    assert (hang.unit, hang.kind, hang.test) == (
        "unit/introspection", "hang", "CLIENT KILL SKIPME YES/NO will kill all clients")


def test_an_exception_names_the_unit_and_the_last_test_finished() -> None:
    parser = cf.parse_output("Testing unit/multi\n[ok]: MULTI works (1 ms)\n"
                             "[exception]: Executing test client: I/O error reading reply.\n")
    (exc,) = parser.interruptions
    assert (exc.unit, exc.kind, exc.test) == ("unit/multi", "exception", "MULTI works")
    assert not parser.ended


def _run(kind: str, *outcomes: tuple[str, str]) -> cf.SuiteRun:
    return cf.SuiteRun(kind, [cf.Outcome("unit/a", name, status) for name, status in outcomes])


def test_comparison_fails_what_passed_on_the_baseline_and_did_not_pass_or_run_through() -> None:
    base = _run("direct", ("same", "ok"), ("same", "ok"), ("broken", "ok"), ("gone", "ok"),
                ("flaky direct", "err"), ("hangs", "ok"))
    through = _run("native", ("same", "ok"), ("same", "err"), ("broken", "err"),
                   ("flaky direct", "ok"), ("hangs", "hang"), ("extra", "ok"))
    c = cf.compare(through, base)
    assert [(b.name, t.status if t else None) for b, t in c.regressions] == [
        ("same", "err"), ("broken", "err"), ("gone", None), ("hangs", "hang")]
    assert [o.name for o in c.improvements] == ["flaky direct"]
    assert not c.clean


def test_a_run_like_its_baseline_is_clean() -> None:
    base = _run("direct", ("a", "ok"), ("b", "err"), ("c", "skip"))
    assert cf.compare(_run("python", ("a", "ok"), ("b", "err")), base).clean


def test_every_kind_asks_for_its_baseline() -> None:
    assert [k.name for k in cf.with_baselines(["tls", "cluster"])] == [
        "direct-tls", "tls", "direct-cluster", "cluster"]
    assert [k.name for k in cf.with_baselines(["native"])] == ["direct", "native"]
    assert [k.name for k in cf.with_baselines(["native-cluster"])] == [
        "direct-cluster", "native-cluster"]


@pytest.mark.parametrize("kind", PROXIED)
def test_each_kind_port_map_is_valid_and_has_no_health_checks_or_admin(
        tmp_path: Path, kind: str) -> None:
    for name in ("server.crt", "server.key", "ca.crt"):
        (tmp_path / name).write_text("placeholder")  # the validator checks they are readable
    doc = cf.cacheport_config(cf.kind(kind), 6379, 7000, tmp_path, tmp_path / "state", 1)
    config = parse_config(load_yaml(yaml.safe_dump(doc)), "<conformance>")
    assert config.admin is None and config.engine_threads == 1
    listeners = [*config.listeners, *(c.template for c in config.clusters)]
    assert len(listeners) == 1 and listeners[0].health is None
    if kind in ("cluster", "native-cluster"):
        (cluster,) = config.clusters
        assert cluster.seed_port == 7000 and cluster.announce == "127.0.0.1"
        assert cluster.template.relay == ("native" if kind == "native-cluster" else "python")
    else:
        (lc,) = config.listeners
        assert lc.listen.port == 7000 and lc.upstream.port == 6379
        assert (lc.tls is not None) == kind.startswith("tls")
        assert lc.relay == {"native": "native", "python": "python", "tls": "python",
                            "tls-native": "native"}[kind]


def test_runs_at_once_are_never_given_the_same_port() -> None:
    """A port is free only until its server binds it: runs started together must each be
    handed their own (redis-server's, cacheport's range, runtest's test server's)."""
    with ThreadPoolExecutor(8) as pool:
        singles = list(pool.map(lambda _: cf.take_ports(), range(16)))
        ranges = list(pool.map(lambda _: cf.take_ports(cf.CLUSTER_PORTS + 1), range(8)))
        bases = list(pool.map(lambda _: cf.suite_baseport(), range(8)))
    ports = singles + [p for base in ranges for p in range(base, base + cf.CLUSTER_PORTS + 1)]
    assert len(set(ports)) == len(ports)
    # runtest's test server binds one of the 32 ports below its --baseport.
    test_servers = [p for base in bases for p in range(base - 32, base)]
    assert len(set(test_servers)) == len(test_servers)
    assert not set(test_servers) & set(ports)
