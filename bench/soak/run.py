"""``python -m bench soak --duration 90 --seed N [--report bench/results/soak-....md]``.

Start the rig, warm up, take the baseline (descriptors, RSS), run the load with the
seeded fault schedule, then check: acknowledged writes read back, errors only inside
fault windows, descriptors and RSS back to baseline, a clean log, /metrics agreeing
with a counted load. Exit 0 when every check passed, 1 when one failed, 2 when the
machine lacks a prerequisite.
"""

from __future__ import annotations

import argparse
import random
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
from pymemcache.client.base import Client as Memcache

from ..procs import BenchError, raise_nofile
from .faults import Faults
from .ledger import Errors, Ledger, Verdict, Window, attribute, judge_log, verify
from .load import Load
from .rig import HOST, MapState, Rig, prerequisites
from .schedule import KINDS, SHORT, Schedule, make_schedule

GRACE = 4.0  # an error up to this long after a fault's action ends is still its own
FD_SLACK = 8  # descriptors the end may hold above the baseline (see bench/README.md)
RSS_SLACK = 0.25  # and RSS: a quarter above the baseline, or RSS_FLOOR_MB, whichever more
RSS_FLOOR_MB = 24.0
BYTES_TOLERANCE = 0.01
# Log lines at WARNING and above that a fault explains; any other is a finding.
ALLOWED_LOG = re.compile(r"reload .*(failed|refused)|exited with -9 .*restarting")
BAD_LOG = re.compile(r"Traceback|\b(WARNING|ERROR|CRITICAL)\b"
                     r"|\"level\": ?\"(warning|error|critical)\"", re.IGNORECASE)


@dataclass
class Options:
    duration: float = 75.0
    seed: int = 1
    kinds: tuple[str, ...] = SHORT
    nofile: int = 1024
    scale: int = 1
    report: Path | None = None
    workdir: Path | None = None


@dataclass
class Result:
    schedule: Schedule
    windows: list[tuple[Window, str]] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)
    errors_per_fault: dict[str, int] = field(default_factory=dict)
    stray: list[str] = field(default_factory=list)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    forgotten: dict[str, int] = field(default_factory=dict)
    reloads: tuple[int, int] = (0, 0)  # valid applied, invalid refused
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # t, RSS MB, fds
    base: tuple[float, int] = (0.0, 0)
    end: tuple[float, int] = (0.0, 0)
    metrics: list[str] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)  # unexplained
    log_per_fault: dict[str, int] = field(default_factory=dict)
    pubsub: tuple[int, int] = (0, 0)
    failures: list[str] = field(default_factory=list)
    elapsed: float = 0.0


def _active(rig: Rig) -> float:
    return sum(v for (name, _l, _d), v in rig.metrics().items()
               if name == "cacheport_connections_active")


def _quiet(rig: Rig, timeout: float = 30) -> tuple[float, int]:
    """Wait for no client connection, then (RSS MB, descriptors): medians of 3 samples."""
    deadline = time.monotonic() + timeout
    while _active(rig) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    rss, fds = [], []
    for _ in range(3):
        rss.append(rig.rss_mb())
        fds.append(rig.fds())
        time.sleep(0.3)
    return statistics.median(rss), int(statistics.median(fds))


def _sampler(rig: Rig, t0: float, stop: threading.Event, out: list[tuple[float, float, int]]
             ) -> None:
    while not stop.wait(1.0):
        try:
            out.append((time.monotonic() - t0, rig.rss_mb(), rig.fds()))
        except Exception:  # a worker replaced between two reads: skip one sample
            continue


def _reloads(rig: Rig, schedule: Schedule, t0: float, stop: threading.Event,
             result: Result, problems: list[str]) -> None:
    rng = random.Random(schedule.seed + 1)
    applied = refused = 0
    for r in schedule.reloads:
        if stop.wait(max(0.0, t0 + r.at - time.monotonic())):
            break
        if r.valid:
            def edit(s: MapState, what: str = r.edit) -> MapState:
                if what == "idle":
                    s.idle = rng.choice([v for v in ("5m", "10m", "off") if v != s.idle])
                elif what == "extra":
                    s.extra = not s.extra
                else:
                    s.drain = "3s" if s.drain == "2s" else "2s"
                return s
            code, body = rig.reload(edit)
            applied += code == 200
            if code != 200:
                problems.append(f"valid reload ({r.edit}) at t={r.at}: {code} {body[:200]}")
        else:
            code, body = rig.reload(lambda s: s, bad=r.edit)
            refused += code != 200
            if code == 200:
                problems.append(f"invalid map ({r.edit}) accepted at t={r.at}")
    result.reloads = (applied, refused)


def _run_faults(faults: Faults, schedule: Schedule, t0: float, stop: threading.Event,
                windows: list[tuple[Window, str]]) -> None:
    threads = []

    def one(kind: str) -> None:
        start = time.monotonic()
        try:
            start, detail = faults.run(kind)
        except Exception as exc:
            detail = f"FAILED: {type(exc).__name__}: {exc}"
            faults.problems.append(f"{kind} at t={start - t0:.1f}: {detail}")
        windows.append((Window(kind, start, time.monotonic()), detail))

    for f in schedule.faults:
        if stop.wait(max(0.0, t0 + f.at - time.monotonic())):
            break
        t = threading.Thread(target=one, args=(f.kind,), name=f"fault-{f.kind}", daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(300)


def _counted_load(rig: Rig, result: Result, connections: int = 20, ops: int = 10) -> None:
    """A load whose every byte the client counts, between two /metrics reads: the
    connection count must match exactly, the bytes within BYTES_TOLERANCE."""
    before = rig.metrics()
    sent = received = 0
    for c in range(connections):
        with socket.create_connection((HOST, rig.listen["mc"]), 5) as s:
            s.settimeout(5)
            for i in range(ops):
                body = b"v" * (100 * (i + 1))
                for req, end in ((b"set acct:%d:%d 0 0 %d\r\n%s\r\n" % (c, i, len(body), body),
                                  b"STORED\r\n"), (b"get acct:%d:%d\r\n" % (c, i), b"END\r\n")):
                    s.sendall(req)
                    sent += len(req)
                    got = b""
                    while not got.endswith(end):
                        chunk = s.recv(65536)
                        if not chunk:
                            raise BenchError("counted load: connection closed")
                        got += chunk
                    received += len(got)
    deadline = time.monotonic() + 15
    while _active(rig) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    after = rig.metrics()

    def delta(name: str, direction: str = "") -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items()
                   if k[0] == name and k[1] == "mc" and (not direction or k[2] == direction))

    accepted = delta("cacheport_connections_accepted_total")
    up = delta("cacheport_bytes_total", "upstream")
    down = delta("cacheport_bytes_total", "downstream")
    result.metrics = [f"connections: clients opened {connections}, /metrics counted {accepted:.0f}",
                      f"bytes client->upstream: clients sent {sent}, /metrics {up:.0f}",
                      f"bytes upstream->client: clients read {received}, /metrics {down:.0f}"]
    if accepted != connections:
        result.failures.append(f"/metrics: {accepted:.0f} connections, clients opened "
                               f"{connections}")
    for what, mine, theirs in (("sent", sent, up), ("read", received, down)):
        if abs(theirs - mine) > BYTES_TOLERANCE * mine:
            result.failures.append(f"/metrics bytes {what}: {theirs:.0f} vs clients' {mine}")


def _b(value: object) -> bytes | None:
    return value if isinstance(value, bytes) else None


def _verify(rig: Rig, ledger: Ledger, result: Result) -> None:
    r = redis.Redis(host=rig.primary_ip, port=rig.redis_port, socket_timeout=10)
    result.verdicts["redis"] = verify(ledger.to_verify("redis"),
                                      lambda keys: [_b(v) for v in r.mget(keys)])
    r.close()
    rc = redis.RedisCluster(host=HOST, port=rig.nodes[0][0], socket_timeout=10)
    result.verdicts["cluster"] = verify(ledger.to_verify("cluster"),
                                        lambda keys: [_b(v) for v in rc.mget_nonatomic(keys)])
    rc.close()
    mc = Memcache((HOST, rig.mc_port), timeout=10)

    def mc_many(keys: list[str]) -> list[bytes | None]:
        found = mc.get_many(keys)
        return [found.get(k) for k in keys]

    result.verdicts["memcached"] = verify(ledger.to_verify("memcached"), mc_many)
    mc.close()
    result.forgotten = dict(ledger.forgotten)
    for store, v in result.verdicts.items():
        if v.bad:
            result.failures.append(f"{store}: {len(v.bad)} acknowledged writes not read back, "
                                   f"e.g. {v.bad[:3]}")


def soak(opts: Options) -> Result:
    schedule = make_schedule(opts.seed, opts.duration, opts.kinds)
    for line in schedule.lines():
        print(line, flush=True)
    result = Result(schedule)
    raise_nofile(65536)
    with tempfile.TemporaryDirectory(prefix="cacheport-soak-") as tmp:
        work = opts.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rig = Rig(work, opts.nofile)
        ledger, errors = Ledger(), Errors()
        started = time.monotonic()
        try:
            rig.start_redis_pair()
            rig.start_memcached()
            rig.start_cluster()
            rig.start_cacheport()
            warm = Load(rig, ledger, Errors(), opts.seed + 7, time.monotonic() + 6)
            warm.start(opts.scale)
            warm.finish()
            result.base = _quiet(rig)
            print(f"baseline: RSS {result.base[0]:.1f} MB, {result.base[1]} descriptors",
                  flush=True)
            t0 = time.monotonic()
            load = Load(rig, ledger, errors, opts.seed, t0 + opts.duration)
            faults = Faults(rig, ledger, errors, random.Random(opts.seed + 2))
            stop = threading.Event()
            problems: list[str] = []
            helpers = [
                threading.Thread(target=_sampler, args=(rig, t0, stop, result.samples)),
                threading.Thread(target=_reloads, args=(rig, schedule, t0, stop, result,
                                                        problems)),
                threading.Thread(target=_run_faults, args=(faults, schedule, t0, stop,
                                                           result.windows)),
            ]
            try:
                load.start(opts.scale)
                for t in helpers:
                    t.daemon = True  # an interrupted run must not wait for them
                    t.start()
                while time.monotonic() < t0 + opts.duration:
                    time.sleep(0.5)
            finally:
                stop.set()
                load.finish()
                for t in helpers:  # a fault under way finishes first: it may start a node
                    t.join(300)
            result.elapsed = time.monotonic() - t0
            rig.reload(lambda s: MapState(spare_upstream=f"{HOST}:{rig.mc_port}"))
            result.end = _quiet(rig)
            print(f"end: RSS {result.end[0]:.1f} MB, {result.end[1]} descriptors", flush=True)
            result.requests = dict(errors.requests)
            result.pubsub = (load.published, load.received)
            per, stray = attribute(errors.items, [w for w, _ in result.windows], GRACE)
            result.errors_per_fault = dict(per)
            result.stray = [f"t={e.at - t0:.1f}s {e.client}: {e.what}" for e in stray]
            result.failures += problems + faults.problems
            if stray:
                result.failures.append(f"{len(stray)} client errors outside every fault "
                                       f"window, e.g. {result.stray[:5]}")
            _counted_load(rig, result)
            _verify(rig, ledger, result)
            _judge_resources(result)
            per_log, result.log_lines = judge_log(
                [line for line in rig.log().splitlines() if BAD_LOG.search(line)],
                [w for w, _ in result.windows], time.time() - time.monotonic(), GRACE,
                ALLOWED_LOG)
            result.log_per_fault = dict(per_log)
            if result.log_lines:
                result.failures.append(f"{len(result.log_lines)} unexpected log lines, e.g. "
                                       f"{result.log_lines[:3]}")
            failovers = sum(v for k, v in rig.metrics().items()
                            if k[0] == "cacheport_cluster_failovers_total")
            if failovers:
                result.failures.append(f"/metrics: {failovers:.0f} cluster failovers counted; "
                                       "the cluster's masters never failed over")
            if not rig.cacheport or not rig.cacheport.alive():
                result.failures.append("cacheport's supervisor is gone")
        finally:
            for problem in rig.close():
                print(f"soak: cleanup: {problem}", file=sys.stderr)
        print(f"soak: rig {time.monotonic() - started:.0f} s in all", flush=True)
    return result


def _judge_resources(result: Result) -> None:
    (rss0, fd0), (rss1, fd1) = result.base, result.end
    if fd1 > fd0 + FD_SLACK:
        result.failures.append(f"descriptors: {fd1} at the end, {fd0} at the start "
                               f"(tolerance +{FD_SLACK})")
    if rss1 > rss0 + max(rss0 * RSS_SLACK, RSS_FLOOR_MB):
        result.failures.append(f"RSS: {rss1:.1f} MB at the end, {rss0:.1f} MB at the start")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=75.0, help="seconds of load")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument("--nofile", type=int, default=1024,
                        help="cacheport's RLIMIT_NOFILE (soft and hard)")
    parser.add_argument("--scale", type=int, default=1, help="multiply the client threads")
    parser.add_argument("--kinds", help=f"comma-separated fault kinds (default: all of "
                                        f"{','.join(KINDS)})")
    parser.add_argument("--workdir", type=Path, help="keep logs and maps here")
    parser.add_argument("--report", type=Path, help="write a markdown report here, and a PNG "
                                                    "of RSS and descriptors beside it")
    args = parser.parse_args(argv)
    missing = prerequisites()
    if missing:
        print(f"bench soak: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    opts = Options(duration=args.duration, seed=seed, nofile=args.nofile, scale=args.scale,
                   report=args.report,
                   workdir=args.workdir)
    if args.kinds:
        unknown = set(args.kinds.split(",")) - set(KINDS)
        if unknown:
            print(f"bench soak: unknown fault kinds {sorted(unknown)}", file=sys.stderr)
            return 2
        opts.kinds = tuple(args.kinds.split(","))
    try:
        result = soak(opts)
    except BenchError as exc:
        print(f"bench soak: {exc}", file=sys.stderr)
        return 1
    from .report import markdown, write

    text = markdown(result)
    print(text)
    if args.report:
        write(result, args.report)
    return 0 if not result.failures else 1
