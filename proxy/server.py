"""The set of listeners, started together and stopped in order.

Start binds every listener before any accepts, so a port that is taken leaves
nothing half-started. Stop is ordered and idempotent: stop accepting
everywhere, give live connections a bounded time to finish, cut the rest.
"""

from __future__ import annotations

import asyncio
import logging

from .config import Config
from .listener import BindError, Listener
from .relay import BufferPool
from .resolver import Resolver

log = logging.getLogger("cacheport.server")


class StartError(Exception):
    """The server could not start; nothing is left listening."""


class Server:
    """Owns the listeners of one port map on one event loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.listeners: dict[str, Listener] = {}
        self._stopping: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._stopped = False
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        resolver = Resolver(loop)
        pools: dict[int, BufferPool] = {}
        listeners: list[Listener] = []
        for lc in self.config.listeners:
            pool = pools.setdefault(lc.buffer_size, BufferPool(lc.buffer_size))
            listeners.append(Listener(lc, loop, pool, resolver, self._maybe_idle))
        try:
            for listener in listeners:
                listener.bind()
        except BindError as exc:
            for listener in listeners:
                if listener.sock is not None:
                    listener.sock.close()
                    listener.sock = None
            raise StartError(str(exc)) from None
        for listener in listeners:
            listener.start()
            self.listeners[listener.name] = listener
        log.info("cacheport serving %d listener(s) from %s", len(listeners), self.config.path)

    def request_stop(self) -> None:
        """Safe from a signal handler: only sets an event."""
        if self._stopping is not None:
            self._stopping.set()

    async def wait_stopping(self) -> None:
        assert self._stopping is not None, "start() first"
        await self._stopping.wait()

    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting, wait up to ``drain_timeout`` for connections, close the rest."""
        if self._stopped:
            return
        self._stopped = True
        for listener in self.listeners.values():
            listener.stop_accepting()
        if drain_timeout > 0 and self.active and self._idle is not None:
            self._idle.clear()
            self._maybe_idle()
            try:
                async with asyncio.timeout(drain_timeout):
                    await self._idle.wait()
            except TimeoutError:
                pass
        cut = self.active
        for listener in self.listeners.values():
            listener.close_connections()
        # Let cancelled connect tasks run their cleanup.
        await asyncio.sleep(0)
        if cut:
            log.info("cacheport stopped; %d connection(s) cut", cut)
        else:
            log.info("cacheport stopped")

    def _maybe_idle(self) -> None:
        if self._idle is not None and not self.active:
            self._idle.set()

    @property
    def active(self) -> int:
        return sum(listener.active for listener in self.listeners.values())
