"""Pipes for splice(2), and the copy rules both zero-copy relays share.

The Python splice relay (relay/splice.py) and the engine (relay/engine.c) copy by the
same rules with the same measured constants, kept here: under ``copy: auto`` a read
below ``BULK_READ`` copies through a buffer, a full one switches the direction to a
pooled pipe, ``SMALL_READS`` small spliced reads in a row switch it back
(docs/hot-loop.md has the figures).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sys
import time
from collections.abc import Callable

log = logging.getLogger("cacheport.splice")

PIPE_SIZE = 1 << 20  # measured: 1 MiB pipes move bulk with ~12 syscalls/MiB; 64 KiB is worst
MAX_PIPES = 64  # per loop; beyond this a burst copies through the buffer instead
REFUSED_RETRY = 5.0  # seconds before asking the kernel again after it refused a pipe
IDLE_TRIM = 2.0  # an idle loop closes its pooled pipes: kernel memory and the per-user budget
BULK_READ = 16 << 10  # copy: auto -- reads below this copy through the buffer, at or above splice
SMALL_READS = 2  # copy: auto -- this many small spliced reads in a row go back to copying


def splice_supported() -> bool:
    """Whether this platform has splice(2) and F_SETPIPE_SZ (Linux, Python >= 3.10)."""
    return (sys.platform.startswith("linux") and hasattr(os, "splice")
            and hasattr(fcntl, "F_SETPIPE_SZ"))



class PipePool:
    """Pipes for one event loop, leased to a direction only while it has bytes in flight.

    Created lazily and sized with F_SETPIPE_SZ. ``free`` holds empty pipes as
    ``(read_fd, write_fd)`` tuples; a relay pops and appends them directly.
    """

    __slots__ = ("busy", "created", "failures", "free", "limit", "live", "opener", "refused",
                 "refused_at", "size", "warned")

    def __init__(self, size: int | None = None, limit: int | None = None,
                 opener: Callable[[int], tuple[int, int]] | None = None) -> None:
        self.size = size or PIPE_SIZE
        self.limit = MAX_PIPES if limit is None else limit
        self.free: list[tuple[int, int]] = []
        self.live = 0  # pipes open: leased plus free
        self.created = 0  # pipes ever made (reuse shows as leases far above this)
        self.failures = 0  # times the kernel refused a pipe or its size
        self.busy = 0  # bursts that found every pipe (``limit``) leased
        self.refused: str | None = None  # why the last attempt failed, until REFUSED_RETRY
        self.refused_at = 0.0
        self.warned = False
        self.opener = opener or open_pipe

    def create(self) -> tuple[int, int] | None:
        """A new pipe, or None (the caller copies through a buffer) when none may be had."""
        if self.live >= self.limit:
            self.busy += 1
            return None
        if self.refused is not None:
            if time.monotonic() - self.refused_at < REFUSED_RETRY:
                return None
            self.refused = None
        try:
            pipe = self.opener(self.size)
        except OSError as exc:
            self._refused(exc)
            return None
        self.live += 1
        self.created += 1
        return pipe

    def _refused(self, exc: OSError) -> None:
        self.failures += 1
        self.refused = exc.strerror or str(exc)
        self.refused_at = time.monotonic()
        if not self.warned:
            self.warned = True
            hint = ""
            if exc.errno == errno.EPERM:
                hint = (" (an unprivileged user past fs.pipe-user-pages-soft or "
                        "fs.pipe-max-size gets no large pipes)")
            log.warning("splice: the kernel refused a %d KiB pipe: %s%s; connections copy "
                        "through a buffer until pipes are available again (logged once)",
                        self.size >> 10, self.refused, hint)

    def recycle(self, pipe: tuple[int, int], scratch: memoryview) -> None:
        """Empty a pipe whose relay was cut with bytes in it, and pool it again.

        Reading it out through the scratch buffer costs a few syscalls on a rare path
        and keeps the pool (and the process's descriptor count) steady.
        """
        try:
            for _ in range(self.size // max(len(scratch), 1) + 2):
                if os.readv(pipe[0], [scratch]) < len(scratch):
                    break
            else:
                raise OSError(errno.EIO, "pipe did not drain")
        except BlockingIOError:
            pass  # empty
        except OSError:
            self.discard(pipe)
            return
        self.free.append(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        """Close a pipe for good."""
        self.live -= 1
        _close_pipe(pipe)

    def trim(self) -> None:
        """Close every pooled (empty) pipe."""
        while self.free:
            self.live -= 1
            _close_pipe(self.free.pop())


def open_pipe(size: int) -> tuple[int, int]:
    """A non-blocking pipe of exactly ``size`` bytes, or OSError."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        got = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        _close_pipe((r, w))
        raise
    if got < size:  # never happens on Linux (it rounds up), but a small pipe is the worst case
        _close_pipe((r, w))
        raise OSError(errno.EPERM, f"pipe size {got} below {size}")
    return r, w


def _close_pipe(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        try:
            os.close(fd)
        except OSError:
            pass
