"""Helpers for the small redis-benchmark side-by-sides (``tls``, ``cluster``): free ports,
waiting for a listener, starting redis-server and cacheport, redis-benchmark figures,
medians as a markdown table, stopping everything by PID."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bindable(ports: Iterable[int], hosts: Sequence[str] = ("127.0.0.1",)) -> bool:
    """Whether every port binds on every host now (each bound at once, then all released)."""
    socks: list[socket.socket] = []
    try:
        for port in ports:
            for host in hosts:
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def free_range(count: int) -> int:
    """First of ``count`` consecutive free ports below the ephemeral range (a cluster entry's
    port range); the start depends on the pid, so concurrent runs look in different places."""
    for base in range(20000 + os.getpid() % 5000, 32000, 7):
        if bindable(range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


def wait_port(port: int, deadline: float = 30.0,
              procs: Sequence[subprocess.Popen[bytes]] = ()) -> None:
    """Until something accepts on ``port``; fails early if one of ``procs`` has exited."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise SystemExit(f"{dead[0].args!r} exited with {dead[0].returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {deadline}s")


def start_redis(procs: list[subprocess.Popen[bytes]], *extra: str, port: int = 0) -> int:
    """A throwaway redis-server on a free port (``extra`` may add TLS or cluster mode)."""
    port = port or free_port()
    procs.append(subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--logfile", "", *extra],
                                  stdout=subprocess.DEVNULL))
    wait_port(port, procs=procs)
    return port


def start_cacheport(procs: list[subprocess.Popen[bytes]], config: Path) -> None:
    """``python -m proxy run -c config`` from this tree; the caller waits for its ports."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs.append(subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config),
                                   "--log-level", "warning"], cwd=ROOT, env=env))


def redis_rps(port: int, test: str, requests: int, pipeline: int = 1, size: int = 3,
              extra: Sequence[str] = (), clients: int = 50) -> float:
    """requests/s from one redis-benchmark run; 0.0 if it printed none. A run shorter
    than redis-benchmark's millisecond clock prints ``inf``: it is run again with ten
    times the requests (twice at most) rather than read as a figure."""
    for _ in range(3):
        out = subprocess.run(
            ["redis-benchmark", "-p", str(port), "-q", "-t", test, "-n", str(requests),
             "-c", str(clients), "-P", str(pipeline), "-d", str(size), *extra],
            capture_output=True, text=True, timeout=300).stdout
        found = re.findall(rf"{test.upper()}: ([\d.]+|inf) requests per second",
                           out.replace("\r", "\n"))
        if not found:
            return 0.0
        if found[-1] != "inf":
            return float(found[-1])
        requests *= 10
    return 0.0


def table(results: dict[tuple[str, str], list[float]], targets: Sequence[str],
          columns: Sequence[str], base: str = "direct") -> str:
    """Medians per (target, column), with the ratio to ``base`` in the same column."""
    head = "| target | " + " | ".join(f"{c} req/s | x {base}" for c in columns) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(columns)]
    for target in targets:
        cells = []
        for column in columns:
            value = statistics.median(results[(target, column)])
            ref = statistics.median(results[(base, column)])
            cells += [f"{value:,.0f}", f"{value / ref:.2f}x" if ref else "-"]
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(what: str, reps: int) -> str:
    """The line above a table: what, when, which commit, on what."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return (f"{what}; {time.strftime('%Y-%m-%d')}, commit {commit or '?'}, "
            f"{os.cpu_count()} CPUs, median of {reps}")


def save_results(kind: str, text: str, rows: object = None) -> None:
    """bench/results/STAMP-KIND.md (and .json with ``rows``): the run as printed."""
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{stamp}-{kind}.md").write_text(text + "\n")
    if rows is not None:
        (RESULTS / f"{stamp}-{kind}.json").write_text(json.dumps(rows, indent=1) + "\n")


def stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
