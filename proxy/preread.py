"""What a connection starts with, read before any relay sees it: peeked, not consumed.

::

    client --[PROXY header][ClientHello ...]--> peek(parse) --> header / hello / refusal

The PROXY protocol header (which the listener then takes off the stream) and the TLS
ClientHello of ``sni_routes`` (which stays in the stream for the upstream) are read with
MSG_PEEK until their parser is satisfied, within a time and size bound. Peeking leaves
the bytes in the kernel, so whichever relay takes the socket afterwards (the native
engine, splice, the buffered relay) reads them as if nothing had looked.
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Callable
from typing import TypeVar

P = TypeVar("P")

# A header split across segments is rare (the spec: it fits one); between peeks of an
# incomplete one the listener waits this long instead of spinning on a readable socket.
PEEK_PAUSE = 0.005


def shut_down(sock: socket.socket) -> bool:
    """The peer sent its FIN (POLLRDHUP), whatever is still unread before it."""
    rdhup = getattr(select, "POLLRDHUP", 0)  # Linux only
    if not rdhup:
        return False
    poller = select.poll()
    poller.register(sock, rdhup)
    return bool(poller.poll(0))


async def readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    future: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await future
    finally:
        loop.remove_reader(fd)


async def peek(loop: asyncio.AbstractEventLoop, sock: socket.socket,
               parse: Callable[[bytes], P | None], size: int, within: float) -> P:
    """Peek at up to ``size`` bytes until ``parse`` finds what it wants, within ``within``
    seconds (TimeoutError); the bytes stay in the stream. EOFError if the client closes
    first; ``parse``'s own errors pass through."""
    async with asyncio.timeout(within):
        seen = -1
        while True:
            await readable(loop, sock)
            try:
                data = sock.recv(size, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue  # a spurious wake-up: nothing to read after all
            if not data:
                raise EOFError("closed")
            found = parse(data)
            if found is not None:
                return found
            if len(data) == seen:
                # Nothing new since the last peek: the socket stays readable (the partial
                # bytes are there), so wait rather than spin -- unless the client has shut
                # its side, which a peek cannot see past the bytes.
                if shut_down(sock):
                    raise EOFError("closed before it was whole")
                await asyncio.sleep(PEEK_PAUSE)
            seen = len(data)
