"""Multi-core: N worker processes serve every listener through SO_REUSEPORT.

::

    supervisor --spawn--> worker 0  (cacheport run --reuse-port ...)
               --spawn--> worker 1      each binds every listener; the kernel
               ...                       spreads new connections across them

The supervisor serves no traffic. It starts the workers, restarts one that
dies (with back-off), forwards SIGHUP (reload) and SIGINT/SIGTERM (drain, then a
second one to cut), and exits when they have all stopped. Each worker is a
whole ``cacheport run`` that reports readiness through a pipe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import fleet
from .admin import AdminError, AdminServer, Request, Response
from .config import Address, AdminConfig, ConfigError, load_config
from .metrics import CONTENT_TYPE_LATEST
from .process import READY_FD_ENV, WORKER_ID_ENV, WORKERS_ENV
from .runtime import EXIT_CONFIG, EXIT_OK, RunOptions, pid_file, raise_nofile_limit, watch_file

log = logging.getLogger("cacheport.supervisor")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
HEALTHY_AFTER = 30.0  # a worker that lived this long restarts without back-off
START_TIMEOUT = 30.0


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_FIRST
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    admin: Address | None = None  # the worker's private admin endpoint


def _parse_admin(words: list[str]) -> Address | None:
    if not words or words[0] == "-":
        return None
    host, _, port = words[0].rpartition(":")
    return Address(host.strip("[]"), int(port)) if port.isdigit() else None


class Supervisor:
    """Keeps ``count`` workers running until asked to stop."""

    def __init__(self, options: RunOptions, worker_args: list[str], count: int) -> None:
        self.options = options
        self.worker_args = worker_args
        self.workers = [Worker(i) for i in range(count)]
        # Reloads refused here, before any worker saw the map (the workers count their own).
        self.reload_failures = 0
        self.stopping = False
        self._stop_requests = 0
        self._changed = asyncio.Event()

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "proxy", "run", "-c", self.options.config_path,
                "--reuse-port", "--workers", "1", *self.worker_args]

    async def _spawn(self, worker: Worker) -> None:
        read_fd, write_fd = os.pipe()
        env = {**os.environ, READY_FD_ENV: str(write_fd), WORKER_ID_ENV: str(worker.index),
               WORKERS_ENV: str(len(self.workers))}
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *self._command(), pass_fds=(write_fd,), env=env)
        finally:
            os.close(write_fd)
        worker.started = time.monotonic()
        worker.ready.clear()
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)
        asyncio.get_running_loop().create_task(self._await_ready(worker, read_fd))

    async def _await_ready(self, worker: Worker, read_fd: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(None, os.read, read_fd, 128)
        finally:
            os.close(read_fd)
        if data.startswith(b"ready"):
            worker.admin = _parse_admin(data.decode(errors="replace").split()[1:])
            worker.ready.set()

    async def start(self) -> bool:
        """Start every worker; False (all stopped) if one fails before it is ready."""
        for worker in self.workers:
            await self._spawn(worker)
        for worker in self.workers:
            assert worker.process is not None
            exited = asyncio.ensure_future(worker.process.wait())
            ready = asyncio.ensure_future(worker.ready.wait())
            done, _ = await asyncio.wait({exited, ready}, timeout=START_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if exited in done or not done:
                exited.cancel()
                log.error("worker %d failed to start; stopping the others", worker.index)
                await self.stop_all(signal.SIGTERM)
                return False
            exited.cancel()
        log.info("cacheport serving with %d workers", len(self.workers))
        return True

    def signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                try:
                    worker.process.send_signal(sig)
                except ProcessLookupError:
                    pass

    def request_stop(self, sig: int) -> None:
        """From a signal handler: forward it; the workers drain (a second one cuts)."""
        self.stopping = True
        self._stop_requests += 1
        self.signal_all(sig)
        self._changed.set()

    async def stop_all(self, sig: int) -> None:
        self.stopping = True
        self.signal_all(sig)
        for worker in self.workers:
            if worker.process is not None:
                await worker.process.wait()

    async def watch(self) -> None:
        """Restart workers that exit while we are not stopping."""
        loop = asyncio.get_running_loop()
        waits = {loop.create_task(w.process.wait()): w for w in self.workers if w.process}
        while waits:
            changed = loop.create_task(self._changed.wait())
            done, _ = await asyncio.wait({*waits, changed}, return_when=asyncio.FIRST_COMPLETED)
            if changed not in done:
                changed.cancel()
            self._changed.clear()
            for task in done:
                worker = waits.pop(task, None)
                if worker is None:
                    continue
                code = task.result()
                if self.stopping:
                    log.info("worker %d exited with %s", worker.index, code)
                    continue
                lived = time.monotonic() - worker.started
                if lived >= HEALTHY_AFTER:
                    worker.backoff = BACKOFF_FIRST
                delay = worker.backoff
                worker.backoff = min(worker.backoff * 2, BACKOFF_MAX)
                worker.restarts += 1
                log.warning("worker %d (pid %s) exited with %s after %.1fs; restarting in %.1fs",
                            worker.index, worker.process.pid if worker.process else "?", code,
                            lived, delay)
                await asyncio.sleep(delay)
                if self.stopping:
                    continue
                await self._spawn(worker)
                assert worker.process is not None
                waits[loop.create_task(worker.process.wait())] = worker


def fleet_admin(supervisor: Supervisor, config: AdminConfig) -> AdminServer:
    """The admin endpoint at the configured address, answering for every worker."""
    admin = AdminServer(config, lambda: [], lambda: None)

    def addresses() -> list[tuple[str, Address | None]]:
        return [(str(w.index), w.admin if w.ready.is_set() else None)
                for w in supervisor.workers]

    def own_metrics() -> list[Metric]:
        running = GaugeMetricFamily("cacheport_workers", "Worker processes running")
        running.add_metric([], sum(1 for w in supervisor.workers
                                   if w.process is not None and w.process.returncode is None))
        restarts = CounterMetricFamily("cacheport_worker_restarts",
                                       "Workers restarted after they exited", labels=["worker"])
        for w in supervisor.workers:
            restarts.add_metric([str(w.index)], w.restarts)
        refused = CounterMetricFamily(
            "cacheport_supervisor_reload_failures",
            "Reloads the supervisor refused before any worker saw the map (invalid file)")
        refused.add_metric([], supervisor.reload_failures)
        return [running, restarts, refused]

    async def metrics(request: Request) -> Response:
        texts = await fleet.gather_metrics(addresses, request.query)
        return Response(200, fleet.render_merged(texts, own_metrics()), CONTENT_TYPE_LATEST)

    async def document(_request: Request, _slicer: object) -> dict[str, Any]:
        doc = fleet.merge_status(await fleet.gather_status(addresses))
        return {**doc, "admin": admin.admin_status()}

    async def readyz(_request: Request) -> Response:
        doc = fleet.merge_status(await fleet.gather_status(addresses))
        return Response.text(200 if doc["ready"] else 503, str(doc["ready_reason"]))

    async def reload(request: Request) -> Response:
        try:
            load_config(supervisor.options.config_path)
        except ConfigError as exc:
            supervisor.reload_failures += 1
            log.error("reload refused, the workers keep the running port map: %s", exc)
            return Response.text(400, f"reload failed, nothing changed: {exc}")
        results = []
        ok = True
        for worker, address in addresses():
            if address is None:
                ok = False
                results.append(f"worker {worker}: not ready")
                continue
            try:
                # The workers' private endpoints hold the same token: pass the caller's on
                code, body = await fleet.http_request(
                    address, "POST", "/-/reload", request.headers.get("authorization"))
            except (OSError, TimeoutError) as exc:
                code, body = 502, str(exc).encode()
            ok = ok and code == 200
            results.append(f"worker {worker}: {body.decode(errors='replace').strip()}")
        return Response.text(200 if ok else 400, "\n".join(results))

    admin.add_route("GET", "/metrics", metrics)
    admin.document = document  # /status and the page (/)
    admin.add_route("GET", "/readyz", readyz)
    admin.add_route("POST", "/-/reload", reload)
    return admin


async def supervise(options: RunOptions, worker_args: list[str], count: int) -> int:
    raise_nofile_limit()
    supervisor = Supervisor(options, worker_args, count)
    loop = asyncio.get_running_loop()
    admin_config = load_config(options.config_path).admin
    admin = fleet_admin(supervisor, admin_config) if admin_config is not None else None
    if admin is not None:
        try:
            admin.bind()
        except AdminError as exc:
            if admin.config.explicit:
                log.error("%s; nothing was started", exc)
                return EXIT_CONFIG
            log.warning("%s; serving without it (set admin.listen, or admin: off)", exc)
            admin = None
    with pid_file(options.pid_file):
        if not await supervisor.start():
            if admin is not None:
                await admin.stop()
            return EXIT_CONFIG
        if admin is not None:
            await admin.start()

        def reload() -> None:
            try:
                load_config(options.config_path)
            except ConfigError as exc:
                supervisor.reload_failures += 1
                log.error("reload refused, the workers keep the running port map: %s", exc)
                return
            log.info("reload: signalling %d workers", len(supervisor.workers))
            supervisor.signal_all(signal.SIGHUP)

        loop.add_signal_handler(signal.SIGHUP, reload)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, supervisor.request_stop, sig)
        watcher = loop.create_task(watch_file(options.config_path, reload)) \
            if options.watch else None
        try:
            await supervisor.watch()
        finally:
            if watcher is not None:
                watcher.cancel()
            if admin is not None:
                await admin.stop()
            for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    log.info("all workers stopped")
    return EXIT_OK
