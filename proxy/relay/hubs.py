"""One hub per event loop, for the relays that keep per-loop state (engine, splice)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import TypeVar

Hub = TypeVar("Hub")


def per_loop(make: Callable[[asyncio.AbstractEventLoop], Hub]
             ) -> Callable[[asyncio.AbstractEventLoop], Hub]:
    """``hub_for(loop)``: the loop's hub, made by ``make`` on first use.

    Loops are weakly keyed, so a closed loop's hub goes with it; a hub must therefore
    hold its loop only weakly. A closure, not an object: no per-call attribute lookups.
    """
    hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = (
        weakref.WeakKeyDictionary())

    def hub_for(loop: asyncio.AbstractEventLoop) -> Hub:
        hub = hubs.get(loop)
        if hub is None:
            hub = hubs[loop] = make(loop)
        return hub

    return hub_for
