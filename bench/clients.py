"""The load generators: the bench's own client (C, or its Python fallback) and redis-benchmark.

Every call has a request count and a time cap, and its subprocess a timeout
on top, so a stuck target costs a bounded amount of time and an error entry
in the results instead of a hung run.
"""

from __future__ import annotations

import array
import hashlib
import json
import math
import os
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .procs import BenchError, Proc, Reaper

SOURCE = Path(__file__).with_name("client.c")
ROOT = Path(__file__).resolve().parent.parent
SLACK = 20.0  # seconds a client may overrun its own time cap before it is killed


@dataclass(frozen=True)
class Run:
    """What a client reported for one measurement."""

    requests: int
    elapsed_s: float
    bytes_in: int
    bytes_out: int
    connections: int


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cacheport-bench"


def build_c_client(cache: Path | None = None) -> tuple[Path | None, str]:
    """Compile client.c with cc into the cache dir (once per source version).

    Returns the binary, or None and the reason when there is no working compiler.
    """
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc) found"
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    target = (cache or cache_dir()) / digest / "client"
    if target.exists():
        return target, ""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    result = subprocess.run([cc, "-O2", "-o", str(tmp), str(SOURCE)], capture_output=True,
                            text=True, timeout=120, check=False)
    if result.returncode != 0:
        return None, f"{cc} failed: {result.stderr.strip()[:500]}"
    tmp.replace(target)
    return target, ""


class Client:
    """Runs the bench client, optionally inside a network namespace."""

    def __init__(self, binary: Path | None, netns: str | None = None) -> None:
        self.kind = "c" if binary is not None else "python"
        self.base = [str(binary)] if binary is not None else [sys.executable, "-m",
                                                              "bench.pyclient"]
        self.prefix = ["ip", "netns", "exec", netns] if netns else []

    def argv(self, *args: str) -> list[str]:
        return [*self.prefix, *self.base, *args]

    def _run(self, args: list[str], tcap: float) -> Run:
        argv = self.argv(*args)
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=tcap + SLACK,
                                    cwd=ROOT, check=False, env=_env())
        except subprocess.TimeoutExpired:
            raise BenchError(f"client did not finish within {tcap + SLACK:.0f}s") from None
        if result.returncode != 0:
            raise BenchError(f"client failed: {result.stderr.strip()[-400:]}")
        return _parse(result.stdout)

    def latency(self, host: str, port: int, proto: str, op: str, size: int, n: int,
                tcap: float, warmup: int, out: Path) -> tuple[Run, array.array[int]]:
        """One connection, one request at a time; per-request latency in ns."""
        run = self._run(["-m", "lat", "-H", host, "-p", str(port), "-P", proto, "-x", op,
                         "-s", str(size), "-n", str(n), "-t", str(tcap), "-w", str(warmup),
                         "-o", str(out)], tcap)
        samples = array.array("I")
        with open(out, "rb") as f:
            samples.frombytes(f.read())
        out.unlink()
        if len(samples) != run.requests:
            raise BenchError(f"client wrote {len(samples)} samples for {run.requests} requests")
        return run, samples

    def pipelined(self, host: str, port: int, proto: str, op: str, size: int, conns: int,
                  depth: int, n: int, tcap: float, key: str = "cacheport:bench") -> Run:
        """``conns`` connections, ``depth`` requests in flight on each (the key is SET first)."""
        return self._run(["-m", "pipe", "-H", host, "-p", str(port), "-P", proto, "-x", op,
                          "-s", str(size), "-c", str(conns), "-d", str(depth), "-n", str(n),
                          "-t", str(tcap), "-k", key], tcap)

    def hold(self, reaper: Reaper, host: str, port: int, proto: str, conns: int,
             tcap: float) -> Held:
        """Open ``conns`` connections (one small request each) and keep them open."""
        proc = reaper.spawn("client-hold", self.argv(
            "-m", "hold", "-H", host, "-p", str(port), "-P", proto, "-c", str(conns),
            "-t", str(tcap)), stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
            env=_env())
        return Held(reaper, proc, tcap + SLACK)


class Held:
    """Connections held open by a ``hold`` client until ``release()``."""

    def __init__(self, reaper: Reaper, proc: Proc, timeout: float) -> None:
        self.reaper = reaper
        self.proc = proc
        self.elapsed_s = 0.0
        self.count = 0
        stdout = proc.popen.stdout
        assert stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            if time.monotonic() > deadline:
                self.release()
                raise BenchError(f"connections not established within {timeout:.0f}s")
            if not sel.select(0.2):
                if not proc.alive():
                    break
                continue
            chunk = os.read(stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
        sel.close()
        if not line.startswith(b"ready "):
            tail = proc.log_tail()
            self.release()
            raise BenchError(f"hold client failed: {tail or line.decode(errors='replace')}")
        _, count, elapsed = line.split()[:3]
        self.count = int(count)
        self.elapsed_s = float(elapsed)

    def release(self) -> None:
        """Close stdin: the client closes every connection and exits."""
        stdin = self.proc.popen.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.popen.wait(30)
        except subprocess.TimeoutExpired:
            pass
        stdout = self.proc.popen.stdout
        if stdout is not None:
            stdout.close()
        self.reaper.stop(self.proc)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _parse(stdout: str) -> Run:
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"client printed no result: {stdout[-200:]!r}")
    d = json.loads(lines[-1])
    return Run(int(d["requests"]), float(d["elapsed_s"]), int(d["bytes_in"]),
               int(d["bytes_out"]), int(d["connections"]))


RB_MIN_S = 0.05  # redis-benchmark's own timing is trusted for runs at least this long


def redis_benchmark(prefix: Sequence[str], host: str, port: int, conns: int, depth: int,
                    n: int, size: int, tcap: float) -> Run:
    """redis-benchmark GET: requests/s as it reports them, elapsed as we measure it.

    redis-benchmark has no time cap of its own; it is killed after ``tcap`` plus slack
    and the measurement counts as failed. It times a run in whole milliseconds, so a run
    shorter than that prints ``inf`` requests/s, and one of a few milliseconds is off by
    tens of percent: below ``RB_MIN_S`` our own wall clock (which includes its start-up,
    so errs low) is used instead.
    """
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise BenchError("redis-benchmark is not installed (Debian: redis-tools)")
    argv = [*prefix, exe, "-h", host, "-p", str(port), "-c", str(conns), "-P", str(depth),
            "-n", str(n), "-d", str(size), "-t", "get", "-q", "--csv"]
    start = time.monotonic()
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=tcap + SLACK,
                                check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"redis-benchmark did not finish within {tcap + SLACK:.0f}s") from None
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise BenchError(f"redis-benchmark failed: {result.stderr.strip()[-300:]}")
    for line in result.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] == "GET" and len(cells) > 1:
            rps = float(cells[1])
            timed = n / rps if math.isfinite(rps) and rps > 0 else 0.0
            return Run(n, timed if timed >= RB_MIN_S else elapsed, 0, 0, conns)
    raise BenchError(f"redis-benchmark printed no GET result: {result.stdout[-300:]!r}")
