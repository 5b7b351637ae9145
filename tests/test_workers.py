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
        # The log is read from a pipe: the supervisor's line may trail the new worker.
        wait_until(lambda: "worker 0 (pid" in proc.log() and "restarting in" in proc.log(), 10,
                   message="the supervisor to log the restart")
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


@pytest.mark.timeout(90)
def test_supervisor_admin_reports_every_worker_together(
    tmp_path: Path, redis_server: ServerProcess
) -> None:
    import json
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.support import run_cli

    admin_port, port = free_port(), free_port()
    path = tmp_path / "fleet.yaml"
    path.write_text(
        f"workers: 2\ndrain_timeout: 1s\nadmin: {{listen: '127.0.0.1:{admin_port}'}}\n"
        f"listeners:\n  - {{name: rd, listen: '127.0.0.1:{port}', "
        f"upstream: '{redis_server.address}', protocol: redis, health: off}}\n")
    proc = CacheportProcess(path)
    try:
        wait_until(lambda: "serving with 2 workers" in proc.log(), 20,
                   message="both workers to be ready")
        sent = 0
        for i in range(40):  # new connections, spread by the kernel over both workers
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                request = f"*2\r\n$4\r\nECHO\r\n$2\r\n{i:02d}\r\n".encode()
                s.sendall(request)
                sent += len(request)
                assert s.recv(100) == f"$2\r\n{i:02d}\r\n".encode()
        base = f"http://127.0.0.1:{admin_port}"

        def scrape() -> dict[tuple[str, str], float]:
            text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
            values: dict[tuple[str, str], float] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "cacheport_connections_accepted_total":
                        values[("accepted", sample.labels["worker"])] = sample.value
                    if (sample.name == "cacheport_bytes_total"
                            and sample.labels.get("direction") == "upstream"):
                        key = ("up", sample.labels["worker"])
                        values[key] = values.get(key, 0) + sample.value
            return values

        values = wait_until(lambda: (v := scrape()) and sum(
            n for (k, _w), n in v.items() if k == "accepted") == 40 and v, 10,
            message="all 40 connections in the merged metrics")
        workers = {w for (_k, w) in values}
        assert workers == {"0", "1"}
        assert sum(n for (k, _w), n in values.items() if k == "up") == sent
        status = json.loads(urllib.request.urlopen(f"{base}/status", timeout=5).read())
        assert [w["worker"] for w in status["workers"]] == ["0", "1"]
        assert status["ready"] is True
        assert urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200
        table = run_cli("status", "--admin", f"127.0.0.1:{admin_port}")
        assert table.returncode == 0 and "rd" in table.stdout
        reload = run_cli("reload", "-c", str(path))
        assert reload.returncode == 0, reload.stderr
        assert reload.stdout.count("reloaded") == 2  # both workers answered
        good = path.read_text()
        path.write_text(good + "  - {name: broken\n")  # refused by the supervisor itself
        with pytest.raises(urllib.error.HTTPError) as refused:  # the CLI would check first
            urllib.request.urlopen(urllib.request.Request(f"{base}/-/reload", method="POST"),
                                   timeout=10)
        assert refused.value.code == 400
        refused.value.close()
        text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert "cacheport_supervisor_reload_failures_total 1.0" in text
        path.write_text(good)
    finally:
        proc.stop()
    assert "Traceback" not in proc.log()
