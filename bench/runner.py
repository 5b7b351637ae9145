"""The workloads, and the loop that runs every target through them the same way.

Repetitions are the outer loop and targets the inner one, with the target
order rotated each repetition, so slow drift of a shared, noisy machine
lands on every target alike; ratios to ``direct`` are then taken within one
repetition (paired) before the median across repetitions.
"""

from __future__ import annotations

import array
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .clients import Client, redis_benchmark
from .procs import BenchError, Reaper, cpu_seconds, memory
from .targets import Backend, Options, Running, Target
from .topology import Topology

WORKLOADS = ("latency", "throughput", "bulk", "connections")
LATENCY_PERCENTILES = (*range(1, 100), 99.5, 99.9, 99.95, 99.99)


@dataclass(frozen=True)
class Plan:
    """Request counts and time caps of every workload (seconds per measurement)."""

    reps: int = 3
    lat_requests: int = 40_000
    lat_warmup: int = 500
    lat_size: int = 100
    lat_cap: float = 6.0  # per round
    lat_rounds: int = 8  # each repetition's requests, in rounds interleaved across targets
    tp_conns: int = 50
    tp_depth: int = 16
    tp_requests: int = 400_000
    tp_size: int = 100
    tp_cap: float = 8.0
    bulk_sizes: tuple[int, ...] = (16 * 1024, 1024 * 1024)
    bulk_requests: tuple[int, ...] = (20_000, 1_000)
    bulk_conns: int = 4
    bulk_cap: float = 6.0
    connections: int = 5_000
    conn_cap: float = 60.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(reps=1, lat_requests=12_000, lat_warmup=200, lat_cap=3.0, lat_rounds=4,
                   tp_requests=150_000, tp_cap=4.0, bulk_requests=(8_000, 400), bulk_cap=3.0,
                   connections=2_000, conn_cap=30.0)

    def capped(self, requests: int) -> Plan:
        """Every request count at most ``requests`` (the smoke test's few hundred)."""
        return replace(
            self,
            lat_requests=min(self.lat_requests, requests),
            lat_warmup=min(self.lat_warmup, max(10, requests // 10)),
            tp_requests=min(self.tp_requests, max(requests, self.tp_conns * self.tp_depth)),
            bulk_requests=tuple(min(n, requests) for n in self.bulk_requests),
        )


@dataclass
class Record:
    """One measurement: a target, a workload, a repetition."""

    rep: int
    workload: str
    backend: str
    target: str
    ok: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def percentile(sorted_values: list[float] | array.array[int], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    rank = max(1, min(n, int(-(-q * n // 100))))
    return float(sorted_values[rank - 1])


def latency_metrics(samples: array.array[int], elapsed: float) -> dict[str, Any]:
    ordered = sorted(samples)
    us = [v / 1000.0 for v in ordered]
    n = len(us)
    return {
        "requests": n,
        "elapsed_s": elapsed,
        "rps": n / elapsed if elapsed > 0 else 0.0,
        "min_us": us[0],
        "mean_us": sum(us) / n,
        "p50_us": percentile(us, 50),
        "p90_us": percentile(us, 90),
        "p99_us": percentile(us, 99),
        "p999_us": percentile(us, 99.9),
        "max_us": us[-1],
        "percentiles_us": {str(q): percentile(us, q) for q in LATENCY_PERCENTILES},
    }


class Bench:
    """Runs the plan over the launched targets; collects ``Record``s and latency samples."""

    def __init__(self, reaper: Reaper, topo: Topology, client: Client,
                 backends: dict[str, Backend], targets: dict[str, Target],
                 running: dict[str, Running], opts: Options, plan: Plan,
                 workloads: tuple[str, ...], workdir: Path,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)
                 ) -> None:
        self.reaper = reaper
        self.topo = topo
        self.client = client
        self.backends = backends
        self.targets = targets
        self.running = running
        self.opts = opts
        self.plan = plan
        self.workloads = workloads
        self.workdir = workdir
        self.log = log
        self.records: list[Record] = []
        self.samples: dict[tuple[str, str], array.array[int]] = {}

    def run(self) -> None:
        names = list(self.running)
        for rep in range(self.plan.reps):
            order = _rotate(names, rep)
            for workload in self.workloads:
                if workload == "latency":
                    self._latency_rounds(rep, order)
                    continue
                for backend in self._backends_for(workload):
                    for name in order:
                        self._measure(rep, workload, backend, name)

    def _backends_for(self, workload: str) -> list[str]:
        kinds = list(self.backends)
        if workload in ("latency", "throughput"):
            return kinds
        # Bulk and idle connections are about the proxy, not the protocol: one backend.
        return ["memcached" if "memcached" in kinds else kinds[0]]

    def _measure(self, rep: int, workload: str, backend: str, name: str) -> None:
        run = self.running[name]
        if workload == "connections" and self.targets[name].kind != "proxy":
            return  # no proxy process whose memory could be measured
        if not run.alive():
            self._record(Record(rep, workload, backend, name, False,
                                error=f"{name} is no longer running"))
            return
        started = time.monotonic()
        try:
            records = {
                "throughput": self._throughput,
                "bulk": self._bulk,
                "connections": self._connections,
            }[workload](rep, backend, name, run)
        except BenchError as exc:
            records = [Record(rep, workload, backend, name, False, error=str(exc))]
        for record in records:
            record.metrics.setdefault("wall_s", round(time.monotonic() - started, 3))
            self._record(record)

    def _record(self, record: Record) -> None:
        self.records.append(record)
        self.log(_progress(record, self.plan.reps))

    def _cpu(self, run: Running) -> float | None:
        return cpu_seconds(run.pids) if run.procs else None

    def _latency_rounds(self, rep: int, order: list[str]) -> None:
        """Latency in short rounds across the targets, so a burst of noise from the
        shared machine lands on all of them rather than on whichever ran at that moment."""
        p = self.plan
        per_round = max(1, p.lat_requests // p.lat_rounds)
        acc: dict[tuple[str, str], _LatAcc] = {}
        for rnd in range(p.lat_rounds):
            for backend in self._backends_for("latency"):
                for name in _rotate(order, rnd):
                    a = acc.setdefault((backend, name), _LatAcc())
                    run = self.running[name]
                    if a.error:
                        continue
                    if not run.alive():
                        a.error = f"{name} is no longer running"
                        continue
                    host, port = run.endpoints[backend]
                    started = time.monotonic()
                    try:
                        cpu0 = self._cpu(run)
                        result, samples = self.client.latency(
                            host, port, backend, "mix", p.lat_size, per_round, p.lat_cap,
                            p.lat_warmup, self.workdir / f"lat-{name}-{backend}.u32")
                        cpu1 = self._cpu(run)
                    except BenchError as exc:
                        a.error = str(exc)
                        continue
                    finally:
                        a.wall += time.monotonic() - started
                    a.samples.extend(samples)
                    a.elapsed += result.elapsed_s
                    if cpu0 is not None and cpu1 is not None:
                        a.cpu = (a.cpu or 0.0) + cpu1 - cpu0
        for (backend, name), a in acc.items():
            if a.error or not a.samples:
                self._record(Record(rep, "latency", backend, name, False,
                                    error=a.error or "no requests completed"))
                continue
            metrics = latency_metrics(a.samples, a.elapsed)
            metrics.update(op="alternating SET/GET", value_bytes=p.lat_size, rounds=p.lat_rounds,
                           wall_s=round(a.wall, 3))
            _add_cpu(metrics, 0.0 if a.cpu is not None else None, a.cpu, len(a.samples), None)
            self.samples.setdefault((backend, name), array.array("I")).extend(a.samples)
            self._record(Record(rep, "latency", backend, name, True, metrics))

    def _throughput(self, rep: int, backend: str, name: str, run: Running) -> list[Record]:
        host, port = run.endpoints[backend]
        p = self.plan
        cpu0 = self._cpu(run)
        if backend == "redis":
            tool = "redis-benchmark -t get"
            # The key redis-benchmark GETs, so GET returns a value rather than nil.
            self.client.pipelined(host, port, backend, "set", p.tp_size, 1, 1, 1, 5.0,
                                  key="key:__rand_int__")
            cpu0 = self._cpu(run)
            result = redis_benchmark(self.topo.prefix(self.topo.client_ns), host, port,
                                     p.tp_conns, p.tp_depth, p.tp_requests, p.tp_size, p.tp_cap)
        else:
            tool = f"bench client ({self.client.kind}) GET"
            result = self.client.pipelined(host, port, backend, "get", p.tp_size, p.tp_conns,
                                           p.tp_depth, p.tp_requests, p.tp_cap)
        cpu1 = self._cpu(run)
        metrics: dict[str, Any] = {
            "tool": tool, "connections": p.tp_conns, "depth": p.tp_depth,
            "value_bytes": p.tp_size, "requests": result.requests,
            "elapsed_s": result.elapsed_s,
            "rps": result.requests / result.elapsed_s if result.elapsed_s > 0 else 0.0,
        }
        _add_cpu(metrics, cpu0, cpu1, result.requests, None)
        return [Record(rep, "throughput", backend, name, True, metrics)]

    def _bulk(self, rep: int, backend: str, name: str, run: Running) -> list[Record]:
        host, port = run.endpoints[backend]
        p = self.plan
        records = []
        for size, n in zip(p.bulk_sizes, p.bulk_requests, strict=True):
            label = f"{backend} {_size_label(size)}"
            try:
                cpu0 = self._cpu(run)
                result = self.client.pipelined(host, port, backend, "get", size, p.bulk_conns, 1,
                                               n, p.bulk_cap)
                cpu1 = self._cpu(run)
            except BenchError as exc:
                records.append(Record(rep, "bulk", label, name, False, error=str(exc)))
                continue
            mb = result.bytes_in / 1e6
            metrics: dict[str, Any] = {
                "value_bytes": size, "connections": p.bulk_conns, "requests": result.requests,
                "bytes_in": result.bytes_in, "elapsed_s": result.elapsed_s,
                "mb_s": mb / result.elapsed_s if result.elapsed_s > 0 else 0.0,
            }
            _add_cpu(metrics, cpu0, cpu1, result.requests, mb)
            records.append(Record(rep, "bulk", label, name, True, metrics))
        return records

    def _connections(self, rep: int, backend: str, name: str, run: Running) -> list[Record]:
        """A fresh instance, so memory freed by earlier workloads cannot hide the cost."""
        target = self.targets[name]
        fresh = target.launch(self.reaper, self.topo, self.backends, self.opts, self.workdir)
        try:
            host, port = fresh.endpoints[backend]
            p = self.plan
            # One connection first, so start-up allocations (buffer pools) are in the baseline.
            warm = self.client.hold(self.reaper, host, port, backend, 1, 10.0)
            warm.release()
            before = memory(fresh.pids)
            held = self.client.hold(self.reaper, host, port, backend, p.connections, p.conn_cap)
            try:
                for proc in fresh.procs:
                    proc.remember_tree()
                after = memory(fresh.pids)
            finally:
                held.release()
            n = held.count
            metrics = {
                "connections": n, "connect_s": held.elapsed_s,
                "rss_before_kb": before.rss_kb, "pss_before_kb": before.pss_kb,
                "rss_after_kb": after.rss_kb, "pss_after_kb": after.pss_kb,
                "processes_after": after.processes,
                "rss_per_conn_kb": (after.rss_kb - before.rss_kb) / n,
                "pss_per_conn_kb": (after.pss_kb - before.pss_kb) / n,
            }
            return [Record(rep, "connections", backend, name, True, metrics)]
        finally:
            fresh.stop(self.reaper)


@dataclass
class _LatAcc:
    samples: array.array[int] = field(default_factory=lambda: array.array("I"))
    elapsed: float = 0.0
    wall: float = 0.0
    cpu: float | None = None
    error: str = ""


def _rotate(names: list[str], k: int) -> list[str]:
    if not names:
        return names
    k %= len(names)
    return names[k:] + names[:k]


def _add_cpu(metrics: dict[str, Any], cpu0: float | None, cpu1: float | None, requests: int,
             mb: float | None) -> None:
    if cpu0 is None or cpu1 is None:
        return
    cpu = cpu1 - cpu0
    metrics["proxy_cpu_s"] = round(cpu, 3)
    if requests:
        metrics["cpu_us_per_req"] = cpu * 1e6 / requests
    if mb:
        metrics["cpu_us_per_mb"] = cpu * 1e6 / mb


def _size_label(size: int) -> str:
    return f"{size // (1024 * 1024)}MB" if size >= 1024 * 1024 else f"{size // 1024}KB"


def _progress(r: Record, reps: int) -> str:
    head = f"[rep {r.rep + 1}/{reps}] {r.workload:<11} {r.backend:<14} {r.target:<16}"
    if not r.ok:
        return f"{head} FAILED: {r.error}"
    m = r.metrics
    if r.workload == "latency":
        return (f"{head} p50 {m['p50_us']:7.1f} us  p99 {m['p99_us']:7.1f} us  "
                f"p99.9 {m['p999_us']:7.1f} us  {m['rps']:8.0f} req/s")
    if r.workload == "throughput":
        cpu = f"  {m['cpu_us_per_req']:.2f} us CPU/req" if "cpu_us_per_req" in m else ""
        return f"{head} {m['rps']:10.0f} req/s{cpu}"
    if r.workload == "bulk":
        cpu = f"  {m['cpu_us_per_mb']:.0f} us CPU/MB" if "cpu_us_per_mb" in m else ""
        return f"{head} {m['mb_s']:8.0f} MB/s{cpu}"
    return (f"{head} {m['connections']} conns: {m['rss_per_conn_kb']:.2f} KB RSS, "
            f"{m['pss_per_conn_kb']:.2f} KB PSS per connection")


def record_dict(r: Record) -> dict[str, Any]:
    return asdict(r)
