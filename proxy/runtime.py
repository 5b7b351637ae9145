"""The running process around one Server: signals, reload triggers, pid file, limits.

Signal handlers only set events; ``serve`` is the one coroutine that acts on
them. SIGINT/SIGTERM drain and stop (a second one cuts at once), SIGHUP and
``--watch`` reload the port map file.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import resource
import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .admin import Handler, Request, Response
from .config import Config, ConfigError, load_config
from .logs import CONNECTIONS
from .process import notify_ready
from .reload import ReloadPlan
from .server import ReloadError, Server, StartError

log = logging.getLogger("cacheport")

EXIT_OK = 0
EXIT_CONFIG = 2
WATCH_INTERVAL = 0.5


@dataclass(frozen=True)
class RunOptions:
    config_path: str
    pid_file: str | None = None
    watch: bool = False
    reuse_port: bool = False


def raise_nofile_limit() -> int:
    """Lift the soft open-files limit to the hard one: each connection costs two descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
            return soft
        log.info("open-files limit raised from %d to %d (about %d connections)",
                 soft, hard, hard // 2)
        return hard
    log.info("open-files limit is %d (about %d connections)", soft, soft // 2)
    return soft


def settle_heap() -> None:
    """Move every object alive now (listeners, configs, checks' probes) out of the cyclic
    garbage collector's reach (``gc.freeze``), after start-up and after each reload.

    With 3,000 listeners a full collection walked ~150,000 long-lived objects every
    few seconds and held the loop 45-150 ms (gc.callbacks, under ``python -m bench
    scale``'s 3,000-listener port map); frozen, it takes 2-3 ms. Reference counting
    still frees what dies later; only a reference cycle among objects alive at a
    freeze would stay in memory (at worst some of a listener a reload removed: a
    few KB per reload).
    """
    gc.freeze()


class Reloader:
    """Re-reads the port map file and applies it; every trigger goes through here."""

    def __init__(self, server: Server, path: str) -> None:
        self.server = server
        self.path = path
        self._lock = asyncio.Lock()
        # Set by the aws: source: adds the clusters it read to the file's text.
        self.extend: Callable[[str], str] | None = None

    async def reload(self) -> ReloadPlan:
        """Validate the file, then apply it; raise ConfigError/ReloadError and change nothing."""
        async with self._lock:
            try:
                # Parsing and validating thousands of listeners takes a few hundred ms;
                # in a thread the loop keeps relaying and checking meanwhile (the GIL is
                # handed back every few ms).
                # The file's own mistakes first, at its own lines.
                config = await asyncio.to_thread(load_config, self.path)
                if self.extend is not None:
                    config = await asyncio.to_thread(load_config, self.path, self.extend)
            except ConfigError:
                self.server.reload_failures += 1
                raise
            plan = await self.server.reload(config)
            settle_heap()
            return plan

    async def reload_logged(self, trigger: str) -> None:
        try:
            await self.reload()
        except (ConfigError, ReloadError) as exc:
            log.error("reload (%s) failed, the running port map is unchanged: %s", trigger, exc)


def reload_handler(reload: Callable[[], Awaitable[object]]) -> Handler:
    """``POST /-/reload``: 200 with what changed, 400 with why nothing did."""

    async def handle(_request: Request) -> Response:
        try:
            result = await reload()
        except (ConfigError, ReloadError) as exc:
            log.error("reload (admin endpoint) failed, the running port map is unchanged: %s",
                      exc)
            return Response.text(400, f"reload failed, nothing changed: {exc}")
        summary = result.summary() if isinstance(result, ReloadPlan) else str(result)
        return Response.text(200, f"reloaded: {summary}")

    return handle


def _fingerprint(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


async def watch_file(path: str, on_change: Callable[[], object],
                     interval: float = WATCH_INTERVAL) -> None:
    """Call ``on_change`` once the file's content changed and then held still for a poll.

    Polling keeps this free of inotify quirks (editors that replace the file, bind
    mounts, ConfigMaps swapping a symlink) at the cost of up to two intervals' delay.
    """
    applied = _fingerprint(path)
    candidate: str | None = None
    while True:
        await asyncio.sleep(interval)
        current = _fingerprint(path)
        if current is None or current == applied:
            candidate = None
            continue
        if current == candidate:  # unchanged since the last poll: the writer is done
            applied = current
            candidate = None
            on_change()
        else:
            candidate = current


@contextlib.contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    target = Path(path)
    target.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if target.read_text().strip() == str(os.getpid()):
                target.unlink()


async def serve(config: Config, options: RunOptions) -> int:
    """Run until SIGINT/SIGTERM; exit status 0 after a clean stop, 2 if start-up failed."""
    raise_nofile_limit()
    server = Server(config, reuse_port=options.reuse_port, private_admin=options.reuse_port)
    try:
        await server.start()
    except StartError as exc:
        log.error("%s; nothing was started", exc)
        return EXIT_CONFIG
    settle_heap()
    loop = asyncio.get_running_loop()
    reloader = Reloader(server, options.config_path)
    if server.admin is not None:
        server.admin.add_route("POST", "/-/reload", reload_handler(reloader.reload))
    notify_ready(server.admin.bound if server.admin is not None else None)
    reload_requested = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, server.request_stop)
    loop.add_signal_handler(signal.SIGTERM, server.request_stop)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    tasks: list[asyncio.Task[None]] = []
    if options.watch:
        tasks.append(loop.create_task(watch_file(options.config_path, reload_requested.set)))
    if config.aws is not None:
        from .aws.source import AwsSource  # only with an aws: block

        source = AwsSource(config.aws)
        reloader.extend = source.extend
        tasks.append(loop.create_task(source.run(reloader.reload), name="aws"))
    stopping = loop.create_task(server.wait_stopping())
    try:
        with pid_file(options.pid_file):
            while not stopping.done():
                reloading = loop.create_task(reload_requested.wait())
                await asyncio.wait({stopping, reloading}, return_when=asyncio.FIRST_COMPLETED)
                if reloading.done():
                    reload_requested.clear()
                    await reloader.reload_logged("SIGHUP or file change")
                else:
                    reloading.cancel()
            log.info("stop signal received; a second one cuts connections at once")
            await server.stop()
    finally:
        for task in tasks:
            task.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        CONNECTIONS.stop()  # the connection log's last lines
    return EXIT_OK
