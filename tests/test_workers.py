"""Multi-core: N workers on SO_REUSEPORT under a supervisor that restarts them."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
import redis

from tests.support import CacheportProcess, ServerProcess, free_port, wait_until


def worker_pids(supervisor_pid: int) -> list[int]:
    pids = []
    for child in psutil.Process(supervisor_pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "--reuse-port" in child.cmdline():
                pids.append(child.pid)
        except psutil.Error:
            continue  # exited while we looked
    return sorted(pids)


def write_map(path: Path, port: int, upstream: str, workers: int = 2) -> None:
    path.write_text(f"workers: {workers}\ndrain_timeout: 1s\nlisteners:\n"
                    f"  - {{name: rd, listen: '127.0.0.1:{port}', upstream: '{upstream}', "
                    "protocol: redis}\n")


@pytest.mark.timeout(90)
def test_two_workers_serve_200_clients_and_a_killed_worker_comes_back(
    tmp_path: Path, redis_server: ServerProcess
) -> None:
    port = free_port()
    path = tmp_path / "workers.yaml"
    write_map(path, port, redis_server.address)
    proc = CacheportProcess(path)
    try:
        wait_until(lambda: "serving with 2 workers" in proc.log(), 20,
                   message="both workers to be ready")
        pids = worker_pids(proc.pid)
        assert len(pids) == 2
        errors: list[str] = []

        def client(n: int) -> None:
            r = redis.Redis(port=port, socket_timeout=20)
            try:
                for i in range(20):
                    r.set(f"w{n}:{i}", i)
                    if r.get(f"w{n}:{i}") != str(i).encode():
                        errors.append(f"w{n}:{i}")
            except redis.RedisError as exc:
                errors.append(str(exc))
            finally:
                r.close()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []

        psutil.Process(pids[0]).kill()
        wait_until(lambda: len(worker_pids(proc.pid)) == 2
                   and pids[0] not in worker_pids(proc.pid), 20,
                   message="the supervisor to restart the killed worker")
        assert "worker 0 (pid" in proc.log() and "restarting in" in proc.log()
        # Every connection still lands on a live worker, and the listener is there.
        for _ in range(50):
            r = redis.Redis(port=port, socket_timeout=5)
            assert r.ping()
            r.close()
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()
    assert "all workers stopped" in proc.log()
    assert "Traceback" not in proc.log()


@pytest.mark.timeout(60)
def test_workers_fail_together_when_a_port_is_taken(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    path = tmp_path / "busy.yaml"
    write_map(path, taken.getsockname()[1], "127.0.0.1:1")
    proc = CacheportProcess(path)
    try:
        start = time.monotonic()
        assert proc.wait(30) == 2
        assert time.monotonic() - start < 30
    finally:
        proc.stop()
        taken.close()
    assert "address already in use" in proc.log()
    assert "failed to start; stopping the others" in proc.log()
