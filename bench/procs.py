"""Processes the bench starts, and what it reads about them from /proc.

Every process is started in its own session (so a Ctrl-C reaches only the bench,
which then stops them in order) and registered with a ``Reaper``; the reaper
stops them by PID -- the process and every descendant recorded while it ran --
when the run ends, whether it ends well or not.

CPU and memory of a proxy are summed over its process tree: nginx has a
master and a worker, socat forks one child per connection, a multi-worker
cacheport has a supervisor and workers.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """Something the bench cannot work around; the message says what and why."""


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm is in parentheses and may hold spaces: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest  # rest[0] is field 3 (state)


def start_time(pid: int) -> int | None:
    """Field 22 (starttime): with the PID, identifies a process across PID reuse.

    None when the process is gone or a zombie (it has nothing left to stop).
    """
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def children_map() -> dict[int, list[int]]:
    """ppid -> pids, from one scan of /proc (works without CONFIG_PROC_CHILDREN)."""
    result: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        result.setdefault(int(fields[1]), []).append(int(entry))
    return result


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    kids = children_map()
    tree: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(kids.get(pid, ()))
    return tree


def _task_ns(pid: int) -> int | None:
    """On-CPU nanoseconds of every live thread of ``pid`` (schedstat: ns, not 10 ms ticks)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for tid in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
        except (PermissionError, ValueError, IndexError):
            return None
    return total


def cpu_seconds(roots: Sequence[int]) -> float:
    """CPU time of the trees of ``roots``: live threads from schedstat (ns), plus the time
    of reaped children (cutime/cstime), so a forked child (socat) that ends between two
    readings still counts. Falls back to utime/stime ticks where schedstat is missing.
    """
    total = 0.0
    for root in roots:
        for pid in process_tree(root):
            fields = _stat_fields(pid)
            if fields is None:
                continue
            utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
            ns = _task_ns(pid)
            own = ns / 1e9 if ns is not None else (utime + stime) / CLK_TCK
            total += own + (cutime + cstime) / CLK_TCK
    return total


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, to tell how noisy a run was."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8])


@dataclass(frozen=True)
class Memory:
    rss_kb: int
    pss_kb: int
    processes: int


def memory(roots: Sequence[int]) -> Memory:
    """RSS and PSS (kB) summed over the trees of ``roots``, from smaps_rollup."""
    rss = pss = count = 0
    for root in roots:
        for pid in process_tree(root):
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            except PermissionError as exc:
                raise BenchError(f"cannot read /proc/{pid}/smaps_rollup: {exc}") from None
            count += 1
            for line in text.splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return Memory(rss, pss, count)


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (soft, and hard when root) to ``wanted``; return the soft limit.

    Children inherit it: cacheport, HAProxy, socat and the clients all need more
    than the usual 1024 descriptors for the connections workload.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted and os.geteuid() == 0:
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        except OSError:
            nr_open = wanted
        target = min(wanted, nr_open)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            soft, hard = target, target
    new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if new_soft > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        soft = new_soft
    return soft


@dataclass
class Proc:
    """A started process and the descendants seen while it ran (for stopping by PID)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None
    stop_signal: int = signal.SIGTERM
    seen: dict[int, int] = field(default_factory=dict)  # pid -> starttime

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def remember_tree(self) -> None:
        """Record the live descendants, so they can be stopped even if the root dies first."""
        if not self.alive():
            return
        for pid in process_tree(self.pid):
            st = start_time(pid)
            if st is not None:
                self.seen[pid] = st

    def stop(self, timeout: float = 10.0) -> None:
        """Signal the root, wait with a deadline, then SIGKILL what is left, by PID."""
        self.remember_tree()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        # Descendants left behind (socat's per-connection children, nginx workers):
        # the same PID *and* start time, so a reused PID is never signalled.
        left = [(pid, st) for pid, st in self.seen.items()
                if pid != self.pid and start_time(pid) == st]
        for pid, _st in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        while left and time.monotonic() < deadline:
            left = [(pid, st) for pid, st in left if start_time(pid) == st]
            time.sleep(0.02)
        for pid, _st in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Reaper:
    """Owns everything the bench started; ``close()`` undoes it in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> Proc:
        """Start ``argv`` with its output in ``workdir/NAME.log`` (unless stdout is given)."""
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "ab")  # the child keeps its own copy; ours is closed below
        try:
            popen = subprocess.Popen(
                list(argv), stdin=stdin, stdout=stdout if stdout is not None else log,
                stderr=log, env=env, cwd=cwd, start_new_session=True,
            )
        except FileNotFoundError:
            raise BenchError(f"{name}: {argv[0]} not found") from None
        finally:
            log.close()
        proc = Proc(name, popen, log_path, stop_signal)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def on_close(self, what: str, undo: Callable[[], None]) -> None:
        """Run ``undo`` at close (after the processes started later than it are stopped)."""
        self._undo.append((what, undo))

    def close(self) -> list[str]:
        """Stop every process (newest first), then run the undo steps; return problems."""
        problems: list[str] = []
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep going: the rest must still be stopped
                problems.append(f"stopping {proc.name} (pid {proc.pid}): {exc}")
        self.procs.clear()
        for what, undo in reversed(self._undo):
            try:
                undo()
            except Exception as exc:
                problems.append(f"{what}: {exc}")
        self._undo.clear()
        return problems


def wait_port(host: str, port: int, proc: Proc | None, timeout: float,
              netns: str | None = None) -> None:
    """Wait until something accepts on ``host:port`` (checked from ``netns`` if given)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive():
            tail = proc.log_tail()
            raise BenchError(
                f"{proc.name} exited with status {proc.popen.returncode} before listening on "
                f"{host}:{port}" + (f":\n{tail}" if tail else "")
            )
        if _port_open(host, port, netns):
            return
        if time.monotonic() >= deadline:
            name = proc.name if proc is not None else "server"
            raise BenchError(f"{name} did not listen on {host}:{port} within {timeout:.0f}s")
        time.sleep(0.05)


def _port_open(host: str, port: int, netns: str | None) -> bool:
    import socket

    if netns is None:
        try:
            with socket.create_connection((host, port), timeout=0.3):
                return True
        except OSError:
            return False
    # A TCP connect from inside the namespace; bash's /dev/tcp keeps it dependency-free.
    result = subprocess.run(
        ["ip", "netns", "exec", netns, "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"],
        capture_output=True, timeout=5, check=False,
    )
    return result.returncode == 0


def run_checked(argv: Sequence[str], what: str, timeout: float = 30) -> str:
    """Run a set-up command; a failure raises ``BenchError`` with its stderr."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                                check=False)
    except FileNotFoundError:
        raise BenchError(f"{what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: {' '.join(argv)} took more than {timeout}s") from None
    if result.returncode != 0:
        raise BenchError(f"{what}: {' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout
