"""Helpers for the small side-by-side scripts (workers_ab.py, tls_ab.py): free ports,
waiting for a listener, redis-benchmark figures, medians as a markdown table."""

from __future__ import annotations

import re
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {deadline}s")


def start_redis(procs: list[subprocess.Popen[bytes]], *extra: str) -> int:
    """A throwaway redis-server on a free port (``extra`` may add a TLS port); its port."""
    port = free_port()
    procs.append(subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                                   "--appendonly", "no", *extra], stdout=subprocess.DEVNULL))
    wait_port(port)
    return port


def redis_rps(port: int, test: str, requests: int, pipeline: int = 1, size: int = 3,
              extra: Sequence[str] = ()) -> float:
    """requests/s from one redis-benchmark run (50 clients); 0.0 if it printed none."""
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-q", "-t", test, "-n", str(requests), "-c", "50",
         "-P", str(pipeline), "-d", str(size), *extra],
        capture_output=True, text=True, timeout=300).stdout
    found = re.findall(rf"{test.upper()}: ([\d.]+) requests per second",
                       out.replace("\r", "\n"))
    return float(found[-1]) if found else 0.0


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


def stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
