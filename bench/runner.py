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

from .clients import Client, Run, redis_benchmark
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
    tp_cap: float = 8.0  # per round
    tp_rounds: int = 2
    bulk_sizes: tuple[int, ...] = (16 * 1024, 1024 * 1024)
    # About 1 GB and 3 GB per target and repetition, in 6 rounds. At 1,000 x 1 MB in 2
    # rounds a figure rested on 0.4 s of transfer and moved by more than the 5 % tolerance.
    bulk_requests: tuple[int, ...] = (60_000, 3_000)
    bulk_conns: int = 4
    bulk_cap: float = 6.0  # per round
    bulk_rounds: int = 6
    connections: int = 5_000
    conn_cap: float = 60.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(reps=1, lat_requests=12_000, lat_warmup=200, lat_cap=3.0, lat_rounds=4,
                   tp_requests=150_000, tp_cap=4.0, bulk_requests=(8_000, 400), bulk_cap=3.0,
                   bulk_rounds=2,
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


@dataclass
class _Acc:
    """One target's share of one workload over the rounds of a repetition."""

    requests: int = 0
    elapsed: float = 0.0
    bytes_in: int = 0
    cpu: float | None = None
    wall: float = 0.0
    samples: array.array[int] = field(default_factory=lambda: array.array("I"))
    round_p50: list[float] = field(default_factory=list)  # latency: each round's own
    round_p99: list[float] = field(default_factory=list)
    error: str = ""

    def add(self, run: Run, cpu0: float | None, cpu1: float | None) -> None:
        self.requests += run.requests
        self.elapsed += run.elapsed_s
        self.bytes_in += run.bytes_in
        if cpu0 is not None and cpu1 is not None:
            self.cpu = (self.cpu or 0.0) + cpu1 - cpu0


@dataclass(frozen=True)
class _Step:
    """One thing measured per target in a round: a backend, and for bulk a value size."""

    label: str
    backend: str
    size: int
    requests: int


class Bench:
    """Runs the plan over the launched targets; collects ``Record``s and latency samples.

    Latency, throughput and bulk run in rounds: each repetition's requests are split
    into short runs that go round the targets (in a rotating order), so a burst of
    noise from the shared machine lands on all of them rather than on whichever target
    ran at that moment. The rounds of one repetition add up to one record per target.
    """

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
                if workload == "connections":
                    backend = self._backends_for(workload)[0]
                    for name in order:
                        self._connections(rep, backend, name)
                else:
                    self._rounds(rep, workload, order)

    def _backends_for(self, workload: str) -> list[str]:
        kinds = list(self.backends)
        if workload in ("latency", "throughput"):
            return kinds
        # Bulk and idle connections are about the proxy, not the protocol: one backend.
        return ["memcached" if "memcached" in kinds else kinds[0]]

    def _steps(self, workload: str) -> tuple[list[_Step], int]:
        p = self.plan
        if workload == "latency":
            steps = [_Step(b, b, p.lat_size, p.lat_requests) for b in self._backends_for(workload)]
            return steps, p.lat_rounds
        if workload == "throughput":
            steps = [_Step(b, b, p.tp_size, p.tp_requests) for b in self._backends_for(workload)]
            return steps, p.tp_rounds
        b = self._backends_for(workload)[0]
        steps = [_Step(f"{b} {_size_label(size)}", b, size, n)
                 for size, n in zip(p.bulk_sizes, p.bulk_requests, strict=True)]
        return steps, p.bulk_rounds

    def _rounds(self, rep: int, workload: str, order: list[str]) -> None:
        steps, rounds = self._steps(workload)
        acc: dict[tuple[str, str], _Acc] = {}
        for rnd in range(rounds):
            for step in steps:
                per_round = max(1, step.requests // rounds)
                for name in _rotate(order, rnd):
                    a = acc.setdefault((step.label, name), _Acc())
                    run = self.running[name]
                    if a.error:
                        continue  # one failure fails this target's record for the repetition
                    if not run.alive():
                        a.error = f"{name} is no longer running"
                        continue
                    started = time.monotonic()
                    try:
                        self._once(workload, step, per_round, name, run, a)
                    except BenchError as exc:
                        a.error = str(exc)
                    finally:
                        a.wall += time.monotonic() - started
        for step in steps:
            for name in order:
                a = acc[(step.label, name)]
                if a.error or not a.requests:
                    self._record(Record(rep, workload, step.label, name, False,
                                        error=a.error or "no requests completed"))
                else:
                    self._record(Record(rep, workload, step.label, name, True,
                                        self._metrics(workload, step, rounds, name, a)))

    def _once(self, workload: str, step: _Step, n: int, name: str, run: Running,
              a: _Acc) -> None:
        """One client run against one target; adds what it did to ``a``."""
        p = self.plan
        host, port = run.endpoints[step.backend]
        if workload == "latency":
            cpu0 = self._cpu(run)
            result, samples = self.client.latency(
                host, port, step.backend, "mix", step.size, n, p.lat_cap, p.lat_warmup,
                self.workdir / f"lat-{name}-{step.backend}.u32")
            a.add(result, cpu0, self._cpu(run))
            a.samples.extend(samples)
            ordered = sorted(v / 1000.0 for v in samples)
            a.round_p50.append(percentile(ordered, 50))
            a.round_p99.append(percentile(ordered, 99))
        elif workload == "throughput" and step.backend == "redis":
            # The key redis-benchmark GETs, so GET returns a value rather than nil.
            self.client.pipelined(host, port, "redis", "set", step.size, 1, 1, 1, 5.0,
                                  key="key:__rand_int__")
            cpu0 = self._cpu(run)
            result = redis_benchmark(self.topo.prefix(self.topo.client_ns), host, port,
                                     p.tp_conns, p.tp_depth, n, step.size, p.tp_cap)
            a.add(result, cpu0, self._cpu(run))
        elif workload == "throughput":
            cpu0 = self._cpu(run)
            result = self.client.pipelined(host, port, step.backend, "get", step.size,
                                           p.tp_conns, p.tp_depth, n, p.tp_cap)
            a.add(result, cpu0, self._cpu(run))
        else:
            cpu0 = self._cpu(run)
            result = self.client.pipelined(host, port, step.backend, "get", step.size,
                                           p.bulk_conns, 1, n, p.bulk_cap)
            a.add(result, cpu0, self._cpu(run))

    def _metrics(self, workload: str, step: _Step, rounds: int, name: str,
                 a: _Acc) -> dict[str, Any]:
        p = self.plan
        metrics: dict[str, Any]
        mb: float | None = None
        if workload == "latency":
            metrics = latency_metrics(a.samples, a.elapsed)
            metrics["op"] = "alternating SET/GET"
            # Round i of every target ran back to back: report.py pairs them round by round.
            metrics["rounds_p50_us"] = a.round_p50
            metrics["rounds_p99_us"] = a.round_p99
            self.samples.setdefault((step.backend, name), array.array("I")).extend(a.samples)
        elif workload == "throughput":
            tool = ("redis-benchmark -t get" if step.backend == "redis"
                    else f"bench client ({self.client.kind}) GET")
            metrics = {"tool": tool, "connections": p.tp_conns, "depth": p.tp_depth,
                       "requests": a.requests, "elapsed_s": a.elapsed,
                       "rps": a.requests / a.elapsed if a.elapsed > 0 else 0.0}
        else:
            mb = a.bytes_in / 1e6
            metrics = {"connections": p.bulk_conns, "requests": a.requests,
                       "bytes_in": a.bytes_in, "elapsed_s": a.elapsed,
                       "mb_s": mb / a.elapsed if a.elapsed > 0 else 0.0}
        metrics.update(value_bytes=step.size, rounds=rounds, wall_s=round(a.wall, 3))
        _add_cpu(metrics, 0.0 if a.cpu is not None else None, a.cpu, a.requests, mb)
        return metrics

    def _record(self, record: Record) -> None:
        self.records.append(record)
        self.log(_progress(record, self.plan.reps))

    def _cpu(self, run: Running) -> float | None:
        return cpu_seconds(run.pids) if run.procs else None

    def _connections(self, rep: int, backend: str, name: str) -> None:
        """A fresh instance, so memory freed by earlier workloads cannot hide the cost."""
        if self.targets[name].kind != "proxy":
            return  # no proxy process whose memory could be measured
        started = time.monotonic()
        try:
            metrics = self._hold(backend, name)
        except BenchError as exc:
            self._record(Record(rep, "connections", backend, name, False, error=str(exc)))
            return
        metrics["wall_s"] = round(time.monotonic() - started, 3)
        self._record(Record(rep, "connections", backend, name, True, metrics))

    def _hold(self, backend: str, name: str) -> dict[str, Any]:
        fresh = self.targets[name].launch(self.reaper, self.topo, self.backends, self.opts,
                                          self.workdir)
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
                at_once = memory(fresh.pids)
                # The table's figure is taken once the connections have been idle for
                # IDLE_SETTLE_S, the same wait for every target: a proxy may keep a
                # connection that just moved bytes in a costlier state (cacheport parks
                # idle relays after 0.25-0.5 s). The at-once figure is kept beside it.
                time.sleep(IDLE_SETTLE_S)
                after = memory(fresh.pids)
            finally:
                held.release()
            n = held.count
            return {
                "connections": n, "connect_s": held.elapsed_s, "settle_s": IDLE_SETTLE_S,
                "rss_before_kb": before.rss_kb, "pss_before_kb": before.pss_kb,
                "rss_after_kb": after.rss_kb, "pss_after_kb": after.pss_kb,
                "rss_at_once_kb": at_once.rss_kb, "pss_at_once_kb": at_once.pss_kb,
                "processes_after": after.processes,
                "rss_per_conn_kb": (after.rss_kb - before.rss_kb) / n,
                "pss_per_conn_kb": (after.pss_kb - before.pss_kb) / n,
                "pss_per_conn_at_once_kb": (at_once.pss_kb - before.pss_kb) / n,
            }
        finally:
            fresh.stop(self.reaper)


IDLE_SETTLE_S = 1.0  # connections held idle this long before the memory is read


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
