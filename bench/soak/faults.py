"""The faults a soak injects. Each returns a short line saying what it did; the runner
times it into a ``Window``. Problems that must fail the soak whatever the window
(a half-close answer lost, a connection left hanging at the fd limit, an invalid map
accepted) go to ``Faults.problems``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field

from ..procs import BenchError
from .ledger import Errors, Ledger
from .rig import HOST, REDIS_IPS, MapState, Rig

RST = struct.pack("ii", 1, 0)
# Faults that cut or count connections of the same listeners: one at a time.
EXCLUSIVE = frozenset({"cache_kill", "worker_kill", "client_reset", "fd_limit"})


@dataclass
class Faults:
    rig: Rig
    ledger: Ledger
    errors: Errors
    rng: random.Random
    problems: list[str] = field(default_factory=list)

    def run(self, kind: str) -> tuple[float, str]:
        """Inject ``kind``; (when it really started, what it did)."""
        fn = getattr(self, kind)
        if kind in EXCLUSIVE:  # their checks would blame cacheport for each other's cuts
            with self.rig.exclusive:
                start = time.monotonic()
                detail: str = fn()
        else:
            start = time.monotonic()
            detail = fn()
        return start, detail

    # -- nodes ---------------------------------------------------------------------------

    def cache_kill(self) -> str:
        rig = self.rig
        assert rig.mc is not None
        os.kill(rig.mc.pid, signal.SIGKILL)
        rig.mc.popen.wait(10)
        rig.reaper.procs.remove(rig.mc)
        time.sleep(2.0)
        rig.start_memcached()
        lost = self.ledger.forget("memcached", time.monotonic())
        return f"memcached pid {rig.mc.pid} restarted; {lost} keys it held dropped from the ledger"

    def failover(self) -> str:
        """A planned failover, as ElastiCache's: writes paused on the old primary until the
        replica has every acknowledged write, the replica promoted, the DNS name moved,
        the old primary made a replica of the new one."""
        rig = self.rig
        old = rig.primary_ip
        new = REDIS_IPS[1] if old == REDIS_IPS[0] else REDIS_IPS[0]
        rig.redis_cli(old, "CLIENT", "PAUSE", "10000", "WRITE")
        try:
            deadline = time.monotonic() + 8
            while True:
                a = _field(rig.redis_cli(old, "INFO", "replication"), "master_repl_offset")
                b = _field(rig.redis_cli(new, "INFO", "replication"), "slave_repl_offset")
                if a and a == b:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"replica {new} did not catch up ({b} of {a})")
                time.sleep(0.02)
            rig.redis_cli(new, "REPLICAOF", "NO", "ONE")
            rig.write_hosts(new)
            rig.primary_ip = new
            rig.redis_cli(old, "REPLICAOF", new, str(rig.redis_port))
        finally:
            rig.redis_cli(old, "CLIENT", "UNPAUSE")
        rig.wait_replica_synced(old, 30)
        return f"primary {old} -> {new}"

    def _ids(self) -> dict[int, str]:
        return {port: self.rig.redis_cli(HOST, "CLUSTER", "MYID", port=port).strip()
                for port, proc in self.rig.nodes if proc.alive()}

    def _slots(self, port: int) -> int:
        info = self.rig.redis_cli(HOST, "CLUSTER", "NODES", port=port)
        for line in info.splitlines():
            if "myself" in line:
                count = 0
                for part in line.split()[8:]:
                    lo, _, hi = part.partition("-")
                    if lo.isdigit():
                        count += int(hi or lo) - int(lo) + 1
                return count
        return 0

    def _reshard(self, src: str, dst: str, slots: int) -> None:
        rig = self.rig
        rig.wait_cluster_settled(40)
        out = subprocess.run(["redis-cli", "--cluster", "reshard", f"{HOST}:{rig.nodes[0][0]}",
                              "--cluster-from", src, "--cluster-to", dst, "--cluster-slots",
                              str(slots), "--cluster-yes"],
                             capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise BenchError(f"reshard {src} -> {dst}: {out.stdout[-500:]}{out.stderr[-500:]}")
        rig.wait_cluster_settled(40)

    def reshard(self) -> str:
        with self.rig.cluster_lock:
            ids = self._ids()
            donors = [p for p in ids if self._slots(p) >= 100]
            src = self.rng.choice(donors)
            dst = self.rng.choice([p for p in ids if p != src])
            self._reshard(ids[src], ids[dst], 100)
        return f"100 slots {src} -> {dst}"

    def node_add_remove(self) -> str:
        rig = self.rig
        with rig.cluster_lock:
            port, proc = rig.start_node()
            seed = rig.nodes[0][0]
            out = subprocess.run(["redis-cli", "--cluster", "add-node", f"{HOST}:{port}",
                                  f"{HOST}:{seed}"], capture_output=True, text=True, timeout=60)
            if out.returncode:
                raise BenchError(f"add-node: {out.stdout[-500:]}")
            rig.nodes.append((port, proc))
            ids = self._ids()
            deadline = time.monotonic() + 30
            while not all(ids[port] in rig.redis_cli(HOST, "CLUSTER", "NODES", port=p)
                          for p in ids):
                if time.monotonic() > deadline:
                    raise BenchError(f"node {port} not known to every node within 30s")
                time.sleep(0.2)
            donor = self.rng.choice([p for p in ids if p != port and self._slots(p) >= 20])
            self._reshard(ids[donor], ids[port], 20)
            time.sleep(3.0)  # clients use it through its new listener
            self._reshard(ids[port], ids[donor], 20)
            rig.nodes.remove((port, proc))
            out = subprocess.run(["redis-cli", "--cluster", "del-node", f"{HOST}:{seed}",
                                  ids[port]], capture_output=True, text=True, timeout=60)
            if out.returncode:
                raise BenchError(f"del-node: {out.stdout[-500:]}")
            rig.reaper.stop(proc)
            rig.wait_cluster_settled(40)
        return f"node {port} added, 20 slots from {donor} and back, removed"

    # -- cacheport -----------------------------------------------------------------------

    def worker_kill(self) -> str:
        """SIGKILL a worker and wait until the supervisor's replacement is ready. Reloads
        wait meanwhile: the supervisor answers one with 400 "worker N: not ready" while a
        worker restarts (the new worker then starts from the map on disk)."""
        rig = self.rig
        with rig.reload_lock:
            before = rig.workers()
            victim = self.rng.choice(before)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while True:
                now = rig.workers()
                if len(now) == 2 and victim not in now and _all_ready(rig):
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"worker {victim} was not replaced within 30s")
                time.sleep(0.1)
        return f"worker pid {victim} killed, replaced by {sorted(set(now) - set(before))}"

    def client_reset(self) -> str:
        """40 clients RST with a 1 MB reply in flight; 40 send a request then half-close,
        and must still get the whole answer followed by EOF."""
        rig = self.rig
        for i in range(40):
            with contextlib.suppress(OSError):
                s = socket.create_connection((HOST, rig.listen["rd"]), 3)
                s.sendall(b"*2\r\n$3\r\nGET\r\n$9\r\nbig:slow0\r\n")
                if i % 2:
                    s.recv(1000)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
                s.close()
        lost = 0
        t_rst = time.monotonic()
        for _ in range(40):
            try:
                with socket.create_connection((HOST, rig.listen["mc"]), 3) as s:
                    s.settimeout(5)
                    s.sendall(b"version\r\n")
                    s.shutdown(socket.SHUT_WR)
                    got = b""
                    while chunk := s.recv(4096):
                        got += chunk
                    if not got.startswith(b"VERSION "):
                        lost += 1
            except OSError as exc:
                self.errors.add("halfclose", exc)
                lost += 1
        if lost:
            self.problems.append(f"half-close: {lost} of 40 answers lost")
        took = time.monotonic() - t_rst
        return f"40 resets, 40 half-closes in {took:.1f} s ({lost} answers lost)"

    def blackhole(self) -> str:
        rig = self.rig
        assert rig.blackhole is not None
        hole = f"{HOST}:{rig.blackhole.port}"
        good = f"{HOST}:{rig.mc_port}"
        self._reload(lambda s: _with(s, spare_upstream=hole))
        time.sleep(5.0)
        self._reload(lambda s: _with(s, spare_upstream=good))
        return f"spare -> {hole} for 5 s"

    def _reload(self, edit: object) -> None:
        code, body = self.rig.reload(edit)  # type: ignore[arg-type]
        if code != 200:
            self.problems.append(f"reload refused ({code}): {body[:200]}")

    def fd_limit(self) -> str:
        """Hold idle connections until both workers are within 10 descriptors of
        RLIMIT_NOFILE, then open 30 more. At EMFILE a worker pauses its accepts, so a new
        connection may wait in the kernel's accept queue: each new one must be answered,
        closed cleanly, or -- if it waited -- be answered or closed within 10 s once the
        held ones are gone; none may hang. Every held connection must still answer.
        Reloads wait meanwhile, until the workers have closed what was held: at the limit
        a worker cannot open the map (it says so and keeps the running one, which is
        right, but not what the reload ticks test)."""
        rig = self.rig
        limit = rig.nofile
        held: list[socket.socket] = []
        queued: list[socket.socket] = []
        refused = 0
        with rig.reload_lock:
            try:
                for _ in range(limit // 10):
                    if min(rig.worker_fds().values(), default=0) >= limit - 10 or \
                            len(queued) >= 30:  # one worker is full and the other near
                        break
                    batch = []
                    for _ in range(10):
                        try:
                            batch.append(socket.create_connection((HOST, rig.listen["mc"]), 3))
                        except OSError:  # the accept queue is full: the worker pauses
                            refused += 1
                    for s in batch:
                        s.settimeout(5)
                        with contextlib.suppress(OSError):
                            s.sendall(b"version\r\n")
                    answer_by = time.monotonic() + 5  # for the whole batch
                    for s in batch:
                        try:
                            s.settimeout(max(0.05, answer_by - time.monotonic()))
                            if s.recv(64).startswith(b"VERSION "):
                                held.append(s)
                                continue
                        except TimeoutError:
                            queued.append(s)  # its worker is at the limit: it waits
                            continue
                        except (ConnectionResetError, BrokenPipeError):
                            pass
                        refused += 1  # closed: its worker is at the limit
                        s.close()
                return self._at_limit(held, queued, refused)
            finally:
                for s in held + queued:
                    s.close()
                deadline = time.monotonic() + 20
                while max(rig.worker_fds().values(), default=0) > limit // 2 and \
                        time.monotonic() < deadline:
                    time.sleep(0.1)

    def _at_limit(self, held: list[socket.socket], queued: list[socket.socket],
                  refused: int) -> str:
        rig = self.rig
        peak = min(rig.worker_fds().values(), default=0)
        closed = answered = unaccepted = 0
        waiting: list[socket.socket] = []
        for _ in range(30):
            try:
                s = socket.create_connection((HOST, rig.listen["mc"]), 3)
            except OSError:
                unaccepted += 1  # not even queued: the accept queue is full
                continue
            try:
                s.settimeout(2)
                s.sendall(b"version\r\n")
                got = s.recv(64)
                answered += got.startswith(b"VERSION ")
                closed += got == b""
                s.close()
            except TimeoutError:
                waiting.append(s)
            except (ConnectionResetError, BrokenPipeError):
                closed += 1
                s.close()
        old_failed, n_held = 0, len(held)
        for s in held:
            try:
                s.sendall(b"version\r\n")
                if not s.recv(64).startswith(b"VERSION "):
                    old_failed += 1
            except OSError:
                old_failed += 1
        for s in held:
            s.close()
        held.clear()
        later = hung = 0
        for s in waiting + queued:  # the limit is gone: each must now be served or closed
            try:
                s.settimeout(10)
                got = s.recv(64)
                later += 1 if got.startswith(b"VERSION ") or got == b"" else 0
                hung += 0 if got.startswith(b"VERSION ") or got == b"" else 1
            except (ConnectionResetError, BrokenPipeError):
                later += 1
            except OSError:
                hung += 1
        if hung:
            self.problems.append(f"fd limit: {hung} of {len(waiting) + len(queued)} waiting "
                                 "connections neither answered nor closed 10 s after the "
                                 "limit was gone")
        if old_failed:
            self.problems.append(f"fd limit: {old_failed} of {n_held} held connections "
                                 "stopped answering")
        return (f"{n_held} held until both workers were at {peak}+ of {rig.nofile} fds ({refused} "
                f"closed on the way); 30 new: {answered} answered, {closed} closed, "
                f"{len(waiting)} waited in the accept queue, {unaccepted} not queued; "
                f"{later} waiting ones served or closed after, {hung} hung; {old_failed} "
                "held ones failed")


def _all_ready(rig: Rig) -> bool:
    code, body = rig.http("GET", "/status")
    try:
        workers = json.loads(body).get("workers", [])
    except ValueError:
        return False
    return code == 200 and len(workers) == 2 and all(w.get("ready") for w in workers)


def _with(state: MapState, **changes: object) -> MapState:
    for key, value in changes.items():
        setattr(state, key, value)
    return state


def _field(info: str, name: str) -> str:
    for line in info.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""
