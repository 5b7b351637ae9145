"""``idle_timeout``: close a listener's connections on which no byte has moved for that long.

Byte counts are compared on a timer, a quarter of the timeout apart, which keeps clock
reads out of the hot loop; the timer runs only while there are connections, so
thousands of idle listeners keep no timers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from . import closes
from .relay.engine import AnyRelay

log = logging.getLogger("cacheport.listener")


class IdleSweep:
    """Watches one listener's live relays (its set, shared) for ``timeout`` seconds of quiet."""

    def __init__(self, loop: asyncio.AbstractEventLoop, relays: Collection[AnyRelay],
                 listener: str, timeout: float | None) -> None:
        self.loop = loop
        self.relays = relays
        self.listener = listener  # its name: a reload matches listeners by name
        self.timeout = timeout
        self.handle: asyncio.TimerHandle | None = None
        self.seen: dict[AnyRelay, tuple[int, float]] = {}  # bytes_total, when it last moved

    def schedule(self) -> None:
        idle = self.timeout
        if idle is not None and self.handle is None and self.relays:
            self.handle = self.loop.call_later(max(idle / 4, 0.05), self._sweep)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def retime(self, timeout: float | None) -> None:
        """A reload changed ``idle_timeout``."""
        self.timeout = timeout
        self.cancel()
        self.schedule()

    def _sweep(self) -> None:
        self.handle = None
        idle = self.timeout
        if idle is None:
            return
        now = self.loop.time()
        seen = self.seen
        for relay in list(self.relays):
            total = relay.bytes_total
            last = seen.get(relay)
            if last is None or last[0] != total:
                seen[relay] = (total, now)
            elif now - last[1] >= idle:
                log.debug("listener %s: closing a connection idle for %.1fs", self.listener,
                          idle)
                relay.why = closes.IDLE_TIMEOUT
                relay.close()
        self.schedule()
