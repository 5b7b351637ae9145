"""A/B of cacheport's copy paths: ``copy: buffer`` vs ``splice`` vs ``auto`` vs direct.

One redis-server, one cacheport process per copy mode (a ``tcp`` listener each),
and the same workloads through each target, interleaved and repeated; medians
of the repetitions. The proxy's CPU comes from /proc/PID/stat (utime + stime).

    python bench/splice_ab.py [--reps 3] [--modes buffer,splice,auto] [--quick]
                              [--json FILE] [--loop uvloop|asyncio]

Modes: buffer, splice, auto (cacheport's settings); nopipe: the splice relay with
every pipe refused, i.e. its recv_into/send fallback on raw readiness; splice64k:
splice through 64 KiB pipes (the kernel's default) instead of 1 MiB.

Workloads:
  small    redis-benchmark -c 1 -P 1, 100-byte GET and SET: requests/s, p50, CPU per request
  4k       the same with 4 KB values: where copying starts to cost more than splicing
  pipe     redis-benchmark -c 50 -P 16, 100-byte GET and SET: requests/s, CPU per request
  16k      redis-benchmark -c 8, 16 KB GET and SET: MB/s, CPU per MB
  1m       redis-benchmark -c 2, 1 MB GET and SET: MB/s, CPU per MB
  stream   one connection pulling a byte stream from socat: MB/s, CPU per MB
  idle     2,000 connections, each after one PING, held idle: proxy RSS and PSS per connection
           (first repetition only: later ones would reuse memory the first freed)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listened on port {port} within {timeout}s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/PID/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# Variants of the splice relay, for the A/B only (a patch run before cacheport starts).
VARIANTS = {
    "nopipe": "s.PipePool.create = lambda self: None",  # every pipe refused: buffer fallback
    "splice64k": "s.PIPE_SIZE = 64 << 10",  # the default pipe size instead of 1 MiB
}


@dataclass
class Target:
    name: str
    port: int  # to redis-server
    stream_port: int  # to the socat byte source
    pid: int | None  # None: direct, no proxy CPU to read


@contextmanager
def processes(modes: list[str], loop: str, workdir: Path) -> Iterator[tuple[list[Target], int]]:
    """redis-server, a socat byte source, and one cacheport per mode."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        rport = free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--logfile", "", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(redis)
        wait_port(rport, redis)
        sport = free_port()
        source = subprocess.Popen(
            ["socat", "-u", "-b", str(MB), "OPEN:/dev/zero",
             f"TCP-LISTEN:{sport},bind=127.0.0.1,reuseaddr,fork"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(source)
        wait_port(sport, source)
        targets = [Target("direct", rport, sport, None)]
        for mode in modes:
            port, stream_port = free_port(), free_port()
            cfg = workdir / f"{mode}.yaml"
            cfg.write_text(
                "listeners:\n"
                f"  - {{name: r, listen: '127.0.0.1:{port}', upstream: '127.0.0.1:{rport}',"
                f" protocol: tcp, copy: {mode}}}\n"
                f"  - {{name: s, listen: '127.0.0.1:{stream_port}', "
                f"upstream: '127.0.0.1:{sport}', protocol: tcp, copy: {mode}}}\n")
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            run = ["run", "-c", str(cfg), "--loop", loop, "--log-level", "warning"]
            prog = ["-m", "proxy"]
            if mode in VARIANTS:
                cfg.write_text(cfg.read_text().replace(f"copy: {mode}", "copy: splice"))
                prog = ["-c", "import sys, proxy.splice as s, proxy.cli as c; "
                        f"{VARIANTS[mode]}; sys.exit(c.main(sys.argv[1:]))"]
            proc = subprocess.Popen(
                [sys.executable, *prog, *run],
                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            wait_port(port, proc)
            wait_port(stream_port, proc)
            targets.append(Target(mode, port, stream_port, proc.pid))
        yield targets, rport
    finally:
        for proc in reversed(procs):
            stop(proc)


def redis_benchmark(port: int, clients: int, pipeline: int, size: int, requests: int,
                    tests: str = "set,get") -> dict[str, dict[str, float]]:
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients),
         "-P", str(pipeline), "-d", str(size), "-n", str(requests), "-t", tests, "--csv"],
        capture_output=True, text=True, timeout=300, check=True).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    return {row["test"]: {"rps": float(row["rps"]), "p50_ms": float(row["p50_latency_ms"]),
                          "avg_ms": float(row["avg_latency_ms"])} for row in rows}


def stream(port: int, total: int) -> float:
    """Pull ``total`` bytes over one connection; seconds taken."""
    buf = bytearray(MB)
    view = memoryview(buf)
    got = 0
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        while got < total:
            n = s.recv_into(view)
            if not n:
                raise SystemExit("stream ended early")
            got += n
    return time.perf_counter() - start


def memory_kib(pid: int) -> tuple[int, int]:
    """RSS and PSS of ``pid`` in KiB (smaps_rollup)."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def idle(target: Target, count: int) -> dict[str, float]:
    """Bytes of proxy memory per idle relayed connection."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 256)), hard))
    assert target.pid is not None
    rss0, pss0 = memory_kib(target.pid)
    socks = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", target.port), timeout=10)
            s.sendall(b"PING\r\n")
            socks.append(s)
        for s in socks:
            if s.recv(16) != b"+PONG\r\n":
                raise SystemExit("idle: no PONG")
        rss1, pss1 = memory_kib(target.pid)
    finally:
        for s in socks:
            s.close()
    return {"RSS B/conn": (rss1 - rss0) * 1024 / count, "PSS B/conn": (pss1 - pss0) * 1024 / count}


def measure(target: Target, workload: str, quick: bool, rep: int) -> dict[str, float]:
    """One run of ``workload`` against ``target``; figures plus the proxy's CPU."""
    scale = 0.2 if quick else 1.0
    before = cpu_seconds(target.pid) if target.pid else 0.0
    result: dict[str, float] = {}
    if workload == "idle":
        return idle(target, 500 if quick else 2000) if target.pid and rep == 0 else {}
    if workload == "stream":
        total = int(1024 * MB * scale)
        seconds = stream(target.stream_port, total)
        result["MB/s"] = total / MB / seconds
        volume, unit = total / MB, "MB"
    else:
        clients, pipeline, size, requests = {
            "small": (1, 1, 100, 40000),
            "4k": (1, 1, 4096, 30000),
            "pipe": (50, 16, 100, 400000),
            "16k": (8, 1, 16384, 20000),
            "1m": (2, 1, MB, 400),
        }[workload]
        requests = max(int(requests * scale), 50)
        rows = redis_benchmark(target.port, clients, pipeline, size, requests)
        for test, row in rows.items():
            key = test.lower()
            result[f"{key} rps"] = row["rps"]
            if workload == "small":
                result[f"{key} p50 us"] = row["p50_ms"] * 1000
        if size >= 16384:
            seconds = sum(requests / row["rps"] for row in rows.values())
            volume = len(rows) * requests * size / MB
            result["MB/s"] = volume / seconds
            unit = "MB"
        else:
            volume, unit = len(rows) * requests, "request"
    if target.pid:
        used = cpu_seconds(target.pid) - before
        result[f"CPU us/{unit}"] = used * 1e6 / volume
    return result


def median_table(raw: dict[str, dict[str, list[dict[str, float]]]], workloads: list[str]) -> str:
    lines = []
    for workload in workloads:
        keys: list[str] = []
        for runs in raw[workload].values():
            for run in runs:
                keys.extend(k for k in run if k not in keys)
        lines.append(f"\n### {workload}\n")
        lines.append("| target | " + " | ".join(keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for name, runs in raw[workload].items():
            cells = []
            for key in keys:
                values = [run[key] for run in runs if key in run]
                cells.append(f"{statistics.median(values):,.1f}" if values else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--modes", default="buffer,splice,auto")
    parser.add_argument("--workloads", default="idle,small,pipe,16k,1m,stream")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--quick", action="store_true", help="a fifth of the volume")
    parser.add_argument("--json", type=Path, help="write every raw figure here")
    args = parser.parse_args()
    for tool in ("redis-server", "redis-benchmark", "socat"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    modes = [m for m in args.modes.split(",") if m]
    workloads = [w for w in args.workloads.split(",") if w]
    raw: dict[str, dict[str, list[dict[str, float]]]] = {w: {} for w in workloads}
    with tempfile.TemporaryDirectory() as tmp, processes(modes, args.loop, Path(tmp)) as (
            targets, _):
        for rep in range(args.reps):
            for workload in workloads:
                # Interleave targets, rotating the order each repetition.
                order = targets[rep % len(targets):] + targets[:rep % len(targets)]
                for target in order:
                    run = measure(target, workload, args.quick, rep)
                    if not run:
                        continue
                    raw[workload].setdefault(target.name, []).append(run)
                    print(f"rep {rep + 1} {workload:6} {target.name:7} "
                          + "  ".join(f"{k}={v:,.1f}" for k, v in run.items()), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    header = (f"splice A/B, {time.strftime('%Y-%m-%d')}, commit {commit}, "
              f"{platform.machine()} {os.cpu_count()} cores, Linux {platform.release()}, "
              f"loop {args.loop}, {args.reps} reps, medians"
              f", load average at the end "
              f"{os.getloadavg()[0]:.1f}")
    print(f"\n{header}\n{median_table(raw, workloads)}")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "raw": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
