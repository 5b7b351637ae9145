"""Plain-TCP wire checks on a thread of their own, with its own epoll: off the relaying loop.

::

    loop thread                                   prober thread (select.epoll)
    monitor wheel --submit(job)--> deque + eventfd --> socket, connect_ex, send request
                                                      EPOLLIN --> recv --> wire.Judge
    wheel tick --collect()--> job.done(outcome, s) <-- results deque

A check costs what its syscalls cost (measured: about HAProxy's per check), not
the event loop's handle and wake-up machinery, and none of it runs on the loop
that relays, handshakes TLS and answers the admin endpoint. The loop is never
woken by the thread: the monitor's wheel collects the results at its next tick
(it ticks while checks are out), so a result waits at most one tick. Only
numeric addresses without TLS come here (a name would need resolving, TLS needs
``ssl``'s objects); the rest stay on the loop (``checks.WireChecker``). The
thread holds no state the loop reads: every verdict goes back through ``done``
on the loop's thread.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .wire import Judge, Verdict

log = logging.getLogger("cacheport.health")

LINGER_OFF = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, no TIME_WAIT
_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT

Outcome = Verdict | OSError
Done = Callable[[Outcome, float], None]


@dataclass(eq=False, slots=True)
class Job:
    """One check to run: where, what to send, how to judge, whom to tell (on the loop)."""

    family: int
    host: str
    port: int
    payload: bytes
    judge: Judge
    done: Done
    began: float = 0.0
    sock: socket.socket | None = field(default=None, repr=False)


class Prober:
    """Owns the check thread, its epoll and the checks in flight; ``close()`` joins it."""

    def __init__(self) -> None:
        self._commands: collections.deque[tuple[bool, Job]] = collections.deque()
        self._results: collections.deque[tuple[Job, Outcome, float]] = collections.deque()
        self.outstanding: set[Job] = set()  # submitted, not cancelled, not yet collected
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Made now, not when the thread starts: at the open-files limit a thread that
        # could not make its epoll would die, and every later check would time out.
        self._epoll = select.epoll()
        self._epoll.register(self._wake, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.closed = False

    # -- the loop's side -------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Start ``job`` on the thread; ``job.done`` is called on this loop once."""
        if self.closed:
            raise RuntimeError("the prober is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="cacheport-checks",
                                            daemon=True)
            self._thread.start()
        self.outstanding.add(job)
        self._command(False, job)

    def cancel(self, job: Job) -> None:
        """Close ``job``'s connection if it is still in flight; its result is not wanted."""
        self.outstanding.discard(job)
        if not self.closed:
            self._command(True, job)

    def collect(self) -> None:
        """On the loop: hand each finished check's result to its ``done``."""
        while self._results:
            job, outcome, seconds = self._results.popleft()
            if job in self.outstanding:
                self.outstanding.discard(job)
                try:
                    job.done(outcome, seconds)
                except Exception:
                    log.exception("recording a health check result failed")

    def _command(self, cancel: bool, job: Job) -> None:
        empty = not self._commands
        self._commands.append((cancel, job))
        if empty:  # the thread drains until empty after reading the eventfd: one wake will do
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(self._wake, 1)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread (bounded wait) and close every connection; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._stop = True
        if self._thread is not None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(self._wake, 1)
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            os.close(self._wake)
            self._epoll.close()

    # -- the thread ----------------------------------------------------------------------

    def _main(self) -> None:
        epoll = self._epoll
        inflight: dict[int, Job] = {}
        results = self._results
        try:
            while not self._stop:
                try:
                    self._step(epoll, inflight, results)
                except Exception:
                    # A bug in one check must not end every check: log it, carry on
                    # (at most once a second if it repeats).
                    log.exception("a health check failed unexpectedly; checks go on")
                    time.sleep(1.0)
        finally:
            for fd, job in list(inflight.items()):
                self._close(epoll, fd, job)

    def _step(self, epoll: select.epoll, inflight: dict[int, Job],
              results: collections.deque[tuple[Job, Outcome, float]]) -> None:
        for fd, events in epoll.poll(1.0):
            if fd == self._wake:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
                self._drain(epoll, inflight, results)
                continue
            job = inflight.get(fd)
            if job is not None:
                outcome = self._event(epoll, job, events)
                if outcome is not None:
                    self._end(epoll, inflight, fd, job, outcome, results)

    def _drain(self, epoll: select.epoll, inflight: dict[int, Job],
               results: collections.deque[tuple[Job, Outcome, float]]) -> None:
        while self._commands:
            cancel, job = self._commands.popleft()
            if cancel:
                fd = job.sock.fileno() if job.sock is not None else -1
                if inflight.get(fd) is job:
                    del inflight[fd]
                    self._close(epoll, fd, job)  # closes the socket: its fileno() is -1 after
                continue
            outcome = self._start(epoll, job)
            if outcome is not None:
                results.append((job, outcome, time.perf_counter() - job.began))
            elif job.sock is not None:
                inflight[job.sock.fileno()] = job

    @staticmethod
    def _start(epoll: select.epoll, job: Job) -> Outcome | None:
        job.began = time.perf_counter()
        try:
            sock = socket.socket(job.family, socket.SOCK_STREAM)
        except OSError as exc:  # out of descriptors: a failed check, not a dead thread
            return exc
        sock.setblocking(False)
        err = sock.connect_ex((job.host, job.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            return OSError(err, os.strerror(err))
        job.sock = sock
        if not job.payload:
            epoll.register(sock.fileno(), _OUT)
            return None
        # A near node (loopback, the same host) has accepted by now: writing at once
        # saves a round of polling for writability. A far one is still connecting: EAGAIN.
        try:
            sent = sock.send(job.payload)
        except (BlockingIOError, InterruptedError):
            epoll.register(sock.fileno(), _OUT)
            return None
        except OSError as exc:
            _reset(sock)
            job.sock = None
            return exc
        if sent != len(job.payload):
            _reset(sock)
            job.sock = None
            return Verdict(False, "could not send the check request at once")
        epoll.register(sock.fileno(), _IN)
        return None

    @staticmethod
    def _event(epoll: select.epoll, job: Job, events: int) -> Outcome | None:
        sock = job.sock
        assert sock is not None
        if events & _OUT:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return OSError(err, os.strerror(err))
            if not job.payload:
                return Verdict(True, "connected")
            try:
                sent = sock.send(job.payload)
            except OSError as exc:
                return exc
            if sent != len(job.payload):
                return Verdict(False, "could not send the check request at once")
            epoll.modify(sock.fileno(), _IN)
            return None
        while True:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                return exc
            if not data:
                return job.judge.closed()
            verdict = job.judge.feed(data)
            if verdict is not None:
                return verdict

    def _end(self, epoll: select.epoll, inflight: dict[int, Job], fd: int, job: Job,
             outcome: Outcome, results: collections.deque[tuple[Job, Outcome, float]]) -> None:
        self._close(epoll, fd, job)
        del inflight[fd]
        results.append((job, outcome, time.perf_counter() - job.began))

    @staticmethod
    def _close(epoll: select.epoll, fd: int, job: Job) -> None:
        with contextlib.suppress(OSError):
            epoll.unregister(fd)
        if job.sock is not None:
            _reset(job.sock)
            job.sock = None


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_OFF)
    sock.close()
