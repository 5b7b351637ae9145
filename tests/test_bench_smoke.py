"""The bench must not silently rot: a few hundred requests through every subcommand.

Runs ``python -m bench run --quick`` (and ``ab``, ``tls``, ``cluster``, ``protocols``,
``pool``) end to end against real memcached and redis-server (no HAProxy or nginx
needed), then checks that the JSON and the markdown carry sane figures and that
nothing the bench started is left running.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.pool import PoolError, load, pooled
from bench.report import Summary
from bench.runner import Record, record_dict
from tests.support import ROOT


def _bench(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # the C client is built fresh, here
    env["TMPDIR"] = str(tmp_path)  # the bench's configs and logs, to check clean-up
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry}: {cmdline}")
    return found


@pytest.mark.timeout(90)
def test_quick_run_reports_sane_figures_for_direct_and_cacheport(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = _bench(tmp_path, "run", "--quick", "--targets", "direct,cacheport",
                    "--requests", "300", "--connections", "50", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]

    [json_path] = out.glob("*.json")
    [md_path] = out.glob("*.md")
    doc: dict[str, Any] = json.loads(json_path.read_text())
    assert doc["topology"] == "loopback"
    assert set(doc["targets"]) == {"direct", "cacheport"}
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["kernel"]
    assert len(doc["commit"]["commit"]) == 40
    failed = [r for r in doc["records"] if not r["ok"]]
    assert not failed, failed

    by = {(r["workload"], r["backend"], r["target"]): r["metrics"] for r in doc["records"]}
    for backend in ("redis", "memcached"):
        for target in ("direct", "cacheport"):
            lat = by[("latency", backend, target)]
            assert lat["requests"] == 300
            assert 0 < lat["p50_us"] <= lat["p99_us"] <= lat["p999_us"] < 1_000_000
            assert lat["rps"] > 0
            tp = by[("throughput", backend, target)]
            assert tp["requests"] >= 300 and tp["rps"] > 0
        cacheport = by[("throughput", backend, "cacheport")]
        assert 0 <= cacheport["cpu_us_per_req"] < 10_000  # the proxy's CPU was counted
    for size in ("16KB", "1MB"):
        bulk = by[("bulk", f"memcached {size}", "cacheport")]
        assert bulk["mb_s"] > 0 and bulk["bytes_in"] >= 150 * 16 * 1024
        assert "cpu_us_per_mb" in bulk
    conns = by[("connections", "memcached", "cacheport")]
    assert conns["connections"] == 50
    assert math.isfinite(conns["pss_per_conn_kb"]) and conns["pss_after_kb"] > 0
    assert ("connections", "memcached", "direct") not in by  # no proxy memory to measure

    summary = doc["summary"]["cacheport"]
    assert 0 < summary["throughput"]["redis"]["ratio_of_direct"] < 10
    assert summary["latency"]["memcached"]["added_p50_us"] is not None

    md = md_path.read_text()
    assert "| direct |" in md and "| cacheport |" in md
    assert "### Latency" in md and "### Idle connections" in md
    assert result.stdout.strip() == md.strip()

    # Everything the bench started (servers, cacheport, clients) was stopped by PID.
    assert _processes_mentioning(str(tmp_path)) == []
    assert not list(tmp_path.glob("cacheport-bench-*")), "work dir left after a clean run"


def _namespaces() -> set[str]:
    """The bench's namespaces (``cpbPID-...``, bench/topology.py) now on the machine: only
    its own, since tests in another worker make and remove theirs meanwhile."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = (line.split()[0] for line in listing.splitlines() if line.strip())
    return {name for name in names if re.match(r"cpb\d+-", name)}


def _cannot_build_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to build network namespaces"
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    return f"needs {', '.join(missing)}" if missing else None


@pytest.mark.timeout(150)
def test_netns_quick_run_measures_cacheport_and_dnat_in_the_nat_topology(tmp_path: Path) -> None:
    """The NAT-instance topology end to end: a cacheport that the namespaces' clients can
    reach (its allow list included), the kernel DNAT rule, and the namespaces gone after."""
    reason = _cannot_build_namespaces()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "results"
    before = _namespaces()
    result = _bench(tmp_path, "run", "--quick", "--netns", "--targets", "direct,dnat,cacheport",
                    "--backends", "redis", "--workloads", "latency,throughput",
                    "--requests", "300", "--out", str(out), timeout=140)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped" not in result.stderr, result.stderr[-3000:]
    [json_path] = out.glob("*.json")
    doc = json.loads(json_path.read_text())
    assert doc["topology"] == "netns"
    assert set(doc["targets"]) == {"direct", "dnat", "cacheport"}
    assert all(r["ok"] for r in doc["records"]), doc["records"]
    lat = {r["target"]: r["metrics"] for r in doc["records"] if r["workload"] == "latency"}
    assert set(lat) == {"direct", "dnat", "cacheport"}
    assert all(0 < m["p50_us"] < 1_000_000 and m["requests"] == 300 for m in lat.values())
    assert "allow:" in doc["targets"]["cacheport"]["config"]
    assert _namespaces() <= before, "the bench left namespaces behind"
    assert _processes_mentioning(str(tmp_path)) == []


@pytest.mark.timeout(60)
def test_python_client_fallback_measures_the_same_workloads(tmp_path: Path) -> None:
    """The client used when there is no C compiler must keep working too."""
    out = tmp_path / "results"
    result = _bench(tmp_path, "run", "--quick", "--python-client",
                    "--targets", "direct,cacheport",
                    "--backends", "memcached", "--workloads", "latency,throughput,connections",
                    "--requests", "200", "--connections", "20", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING: using the Python client" in result.stderr
    [json_path] = out.glob("*.json")
    doc = json.loads(json_path.read_text())
    assert doc["client"] == "python client (fallback)"
    assert all(r["ok"] for r in doc["records"]), doc["records"]
    assert {(r["workload"], r["target"]) for r in doc["records"]} == {
        ("latency", "direct"), ("latency", "cacheport"), ("throughput", "direct"),
        ("throughput", "cacheport"), ("connections", "cacheport")}
    assert _processes_mentioning(str(tmp_path)) == []


def test_unknown_target_is_a_clear_usage_error(tmp_path: Path) -> None:
    # Without a subcommand, ``run`` is meant (the bench's command line before subcommands).
    for args in (("--targets", "direct,varnish"), ("run", "--targets", "direct,varnish")):
        result = _bench(tmp_path, *args, timeout=30)
        assert result.returncode == 2
        assert "unknown target varnish" in result.stderr
        assert "Traceback" not in result.stderr


def test_help_lists_every_subcommand_and_an_unknown_one_is_a_usage_error(
        tmp_path: Path) -> None:
    result = _bench(tmp_path, "--help", timeout=30)
    assert result.returncode == 0
    for name in ("run", "ab", "pool", "tls", "cluster", "protocols"):
        assert f"\n  {name} " in result.stdout, result.stdout
    result = _bench(tmp_path, "sockmap", timeout=30)
    assert result.returncode == 2
    assert "unknown subcommand 'sockmap'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.timeout(90)
def test_ab_measures_two_configurations_paired_with_direct(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = _bench(tmp_path, "ab", "--a", "copy=buffer", "--b", "workers=2", "buffer_size=32k",
                    "--quick", "--backends", "redis", "--workloads", "latency,throughput",
                    "--requests", "300", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    [json_path] = out.glob("*.json")
    doc: dict[str, Any] = json.loads(json_path.read_text())
    assert set(doc["targets"]) == {"direct", "cacheport-a", "cacheport-b"}
    assert doc["compare"] == ["cacheport-a", "cacheport-b"]
    assert doc["argv"][:3] == ["ab", "--a", "copy=buffer"]
    failed = [r for r in doc["records"] if not r["ok"]]
    assert not failed, failed
    # Each side's keys land where the port map wants them: workers at the top.
    a = yaml.safe_load(doc["targets"]["cacheport-a"]["config"])
    b = yaml.safe_load(doc["targets"]["cacheport-b"]["config"])
    assert a["defaults"]["copy"] == "buffer" and "workers" not in a
    assert b["workers"] == 2 and b["defaults"]["buffer_size"] == "32k"
    by = {(r["workload"], r["target"]): r["metrics"] for r in doc["records"]}
    for target in ("direct", "cacheport-a", "cacheport-b"):
        assert 0 < by[("latency", target)]["p50_us"] < 1_000_000
        assert by[("throughput", target)]["rps"] > 0
    md = (out / json_path.name).with_suffix(".md").read_text()
    assert "### cacheport-b against cacheport-a" in md
    row = next(line for line in md.splitlines() if line.startswith("| pipelined redis"))
    assert row.split(" | ")[-1].rstrip(" |") in ("beats", "matches", "matches (within noise)",
                                                 "behind")
    assert _processes_mentioning(str(tmp_path)) == []


def test_ab_rejects_a_setting_without_a_value(tmp_path: Path) -> None:
    result = _bench(tmp_path, "ab", "--b", "copy", timeout=30)
    assert result.returncode == 2
    assert "--b 'copy': expected KEY=VALUE" in result.stderr
    assert "Traceback" not in result.stderr


def _table_rows(stdout: str) -> dict[str, list[str]]:
    """A side-by-side's (first) markdown table: target -> its cells."""
    return _tables(stdout)[0]


def _tables(stdout: str) -> list[dict[str, list[str]]]:
    """Every markdown table in ``stdout``, in order: target -> its cells."""
    tables: list[dict[str, list[str]]] = []
    inside = False
    for line in stdout.splitlines():
        if not line.startswith("|"):
            inside = False
            continue
        if not inside:
            tables.append({})
            inside = True
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] != "target" and not cells[0].startswith("---"):
            tables[-1][cells[0]] = cells[1:]
    return tables or [{}]


@pytest.mark.timeout(90)
def test_cluster_side_by_side_measures_direct_plain_and_rewriting(tmp_path: Path) -> None:
    result = _bench(tmp_path, "cluster", "--reps", "1", "--requests", "300", "--pipeline", "1",
                    timeout=80)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _table_rows(result.stdout)
    want = {"direct", "plain tcp", "cluster, relay: python", "cluster, relay: native"}
    assert set(rows) - {"twemproxy"} == want, result.stdout
    for cells in rows.values():  # GET and SET: req/s, x direct
        assert len(cells) == 4
        assert float(cells[0].replace(",", "")) > 0 and cells[1].endswith("x")
    assert rows["direct"][1] == "1.00x"
    latency = _tables(result.stdout)[1]  # one connection: p50, added p50, p99, added p99
    assert set(latency) - {"twemproxy"} == want and latency["direct"][1] == "+0.0"
    assert _processes_mentioning(str(tmp_path)) == []  # TMPDIR: this run's own


@pytest.mark.timeout(150)
def test_tls_side_by_side_measures_both_legs_on_every_target(tmp_path: Path) -> None:
    pytest.importorskip("trustme")
    result = _bench(tmp_path, "tls", "--reps", "1", "--requests", "300", "--latency", "50",
                    "--small-values", "20", "--big-values", "3", "--connects", "10",
                    "--idle", "5", timeout=140)
    assert result.returncode == 0, result.stderr[-3000:]
    term, orig = result.stdout.split("Origination")
    for table, base in ((term, "redis-server TLS port"), (orig, "direct (plain)")):
        rows = _table_rows(table)
        assert {base, "cacheport relay: native", "cacheport relay: python"} <= set(rows), table
        assert set(rows) <= {base, "cacheport relay: native", "cacheport relay: python",
                             "stunnel", "haproxy", "nginx"}, table
        for name, cells in rows.items():
            # p50, p99 added; then pipelined, 16 KB and 1 MB GET/s: all measured
            assert all(float(c.replace(",", "")) > 0 for c in cells[2:5]), (name, table)
    assert _processes_mentioning(str(tmp_path)) == []


@pytest.mark.timeout(90)
def test_connlog_side_by_side_measures_the_log_on_and_off(tmp_path: Path) -> None:
    result = _bench(tmp_path, "connlog", "--reps", "2", "--requests", "200", timeout=80)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _table_rows(result.stdout)
    assert set(rows) == {"direct", "native, log off", "native, log on", "python, log off",
                         "python, log on"}
    for name, cells in rows.items():
        assert float(cells[0].replace(",", "")) > 0, (name, result.stdout)
    assert "connection log lines written: 0\n" not in result.stdout
    assert _processes_mentioning(str(tmp_path)) == []


def test_protocols_micro_benchmark_reports_every_path(tmp_path: Path) -> None:
    result = _bench(tmp_path, "protocols", "--pairs", "200", "--repeat", "1", timeout=30)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in ("ClusterRewriter.feed_reply", "ClusterRewriter.feed_request", "resp.Framer",
                 "AutoDiscoveryRewriter.feed_reply"):
        line = next(ln for ln in result.stdout.splitlines() if ln.startswith(path))
        assert float(line.split()[-2]) > 0, line


def test_ratios_and_added_latency_are_paired_within_each_repetition() -> None:
    def rec(rep: int, target: str, p50: float, rps: float) -> list[Record]:
        return [Record(rep, "latency", "redis", target, True, {"p50_us": p50}),
                Record(rep, "throughput", "redis", target, True, {"rps": rps})]

    # A noisy second repetition slows both sides: pairing keeps the ratio at 0.5.
    records = [*rec(0, "direct", 20, 1000), *rec(0, "cacheport", 50, 500),
               *rec(1, "direct", 80, 200), *rec(1, "cacheport", 110, 100),
               *rec(2, "direct", 21, 1100), *rec(2, "cacheport", 52, 550)]
    s = Summary(records, ["direct", "cacheport"])
    assert s.ratio("throughput", "redis", "cacheport", "rps") == pytest.approx(0.5)
    assert s.added("latency", "redis", "cacheport", "p50_us") == pytest.approx(30)
    assert s.value("latency", "redis", "cacheport", "p50_us") == pytest.approx(52)


def test_tail_latency_is_also_paired_round_by_round() -> None:
    def rec(rep: int, target: str, p99s: list[float]) -> Record:
        return Record(rep, "latency", "redis", target, True,
                      {"p99_us": max(p99s), "rounds_p99_us": p99s})

    # One burst of noise lands on cacheport's second round of repetition 0: the pooled p99
    # of that repetition takes it, the round-by-round median leaves it out.
    records = [rec(0, "direct", [100, 100, 100]), rec(0, "cacheport", [130, 900, 130]),
               rec(1, "direct", [120, 110, 100]), rec(1, "cacheport", [150, 140, 130])]
    s = Summary(records, ["direct", "cacheport"])
    assert s.added_by_round("latency", "redis", "cacheport", "rounds_p99_us") == pytest.approx(30)
    assert s.added("latency", "redis", "cacheport", "p99_us") == pytest.approx(415)
    # A record without per-round figures (an older JSON) gives no figure, not an error.
    old = Summary([Record(0, "latency", "redis", t, True, {"p99_us": 1.0})
                   for t in ("direct", "cacheport")], ["direct", "cacheport"])
    assert old.added_by_round("latency", "redis", "cacheport", "rounds_p99_us") is None


def _run_doc(topology: str, figures: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """One run's JSON: per target (added-free p50, 1 MB CPU µs/MB); direct's p50 is 100."""
    records = []
    for target, (p50, cpu) in {"direct": (100.0, 0.0), **figures}.items():
        records.append(Record(0, "latency", "redis", target, True, {"p50_us": p50}))
        records.append(Record(0, "bulk", "memcached 1MB", target, True,
                              {"mb_s": 100.0, "cpu_us_per_mb": cpu}))
    return {"topology": topology, "started": "2026-12-03T00:00:00+00:00",
            "commit": {"short": "abc"}, "plan": {"reps": 1}, "machine": {},
            "targets": {"direct": {}, **{t: {} for t in figures}},
            "records": [record_dict(r) for r in records]}


def test_pooling_judges_the_median_of_each_target_over_runs(tmp_path: Path) -> None:
    # nginx is best in one run by luck; over three runs cacheport's median is the lower one.
    runs = [_run_doc("netns", {"cacheport": (130, 400), "nginx": (120, 420)}),
            _run_doc("netns", {"cacheport": (125, 390), "nginx": (140, 450)}),
            _run_doc("netns", {"cacheport": (128, 500), "nginx": (135, 430)})]
    paths = []
    for i, doc in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(doc))
    text = "\n".join(pooled([load(p) for p in paths]))
    row = next(line for line in text.splitlines() if line.startswith("| redis added p50 (µs)"))
    assert row.split(" | ")[1:] == ["30.00, 25.00, 28.00", "28.00", "35.00 (nginx)", "beats",
                                    "2 of 3 |"]
    cpu = next(line for line in text.splitlines() if line.startswith("| proxy CPU per MB"))
    assert cpu.split(" | ")[2:] == ["400.00", "430.00 (nginx)", "beats", "2 of 3 |"]
    assert "Behind in 0 of" in text

    mixed = tmp_path / "loopback.json"
    mixed.write_text(json.dumps(_run_doc("loopback", {"cacheport": (1, 1), "nginx": (1, 1)})))
    with pytest.raises(PoolError, match="different topologies"):
        pooled([load(paths[0]), load(mixed)])
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    result = _bench(tmp_path, "pool", str(garbage), timeout=30)
    assert result.returncode == 2
    assert "not a bench JSON report" in result.stderr and "Traceback" not in result.stderr
