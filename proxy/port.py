"""A listener's listening socket, and what accept does when descriptors run out.

::

    bind / adopt --> start: the loop polls it --> Listener._on_acceptable (a batch of accepts)
                       |   EMFILE: FdReserve frees its spare to take one client off the
                       |   backlog and close it (fd_limit); no spare: pause, then poll again
                       +--> stop_accepting (closed) / release_socket (another listener has it)
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket

from .config import Address, ListenerConfig
from .logs import RateLimitedLog

log = logging.getLogger("cacheport.listener")

ACCEPT_BATCH = 64
FD_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_BACKOFF = 0.5


class FdReserve:
    """One spare descriptor per process, so a listener out of descriptors can still take
    a client off the backlog and close it (a clean FIN and a count) instead of leaving it
    to hang there; the pause alone would leave the kernel completing its handshake."""

    fd = -1

    @classmethod
    def keep(cls) -> None:
        if cls.fd < 0:
            try:
                cls.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                cls.fd = -1

    @classmethod
    def spend(cls, sock: socket.socket) -> bool | None:
        """Free the spare, accept one client and close it: True if one was closed, None if
        none was waiting (Linux reports EMFILE before it looks at the backlog), False if
        there is no spare or the accept failed otherwise."""
        if cls.fd < 0:
            return False
        os.close(cls.fd)
        cls.fd = -1
        try:
            client, _peer = sock.accept()
            client.close()
            return True
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return False
        finally:
            cls.keep()


def bind_socket(address: Address, backlog: int = 1024, reuse_port: bool = False) -> socket.socket:
    """Bind and listen; ``[::]`` is IPv6 only, as nginx does, so ``0.0.0.0`` can be bound too."""
    family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_failure(exc: OSError) -> str:
    """Why a bind failed, in words an operator can act on."""
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (another process, or another listener, has it)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this host"
    return exc.strerror or str(exc)


class Port:
    """One listening socket the loop polls; the listener built on it says what a batch
    of accepts does (``_on_acceptable``)."""

    def __init__(self, config: ListenerConfig, loop: asyncio.AbstractEventLoop, *,
                 reuse_port: bool = False) -> None:
        self.reuse_port = reuse_port
        self.config = config
        self.loop = loop
        self.sock: socket.socket | None = None
        self.bound: Address | None = None
        self.accepting = False
        self._accept_warn = RateLimitedLog(log)
        self._resume_handle: asyncio.TimerHandle | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def _on_acceptable(self) -> None:
        raise NotImplementedError

    def bind(self) -> None:
        """Bind ``config.listen``; OSError (``bind_failure`` words it) if it cannot."""
        self.sock = bind_socket(self.config.listen, reuse_port=self.reuse_port)
        self._note_bound()

    def _note_bound(self) -> None:
        assert self.sock is not None
        host, port = self.sock.getsockname()[:2]
        self.bound = Address(host, port)

    def adopt(self, sock: socket.socket) -> None:
        """Take over a listening socket from a listener a reload removes (same address)."""
        self.sock = sock
        self._note_bound()

    def unbind(self) -> None:
        """Undo ``bind`` before ``start`` (a reload or start that failed elsewhere)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def release_socket(self) -> None:
        """Stop accepting but leave the socket open: another listener has adopted it."""
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock = None
        self.accepting = False
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        log.info("listener %s %s handed its socket over", self.name, self.bound)

    def start(self) -> None:
        assert self.sock is not None, "bind() first"
        self.accepting = True
        FdReserve.keep()
        self.loop.add_reader(self.sock.fileno(), self._on_acceptable)

    def stop_accepting(self) -> None:
        """Close the listening socket; live connections are left alone."""
        if self.sock is None:
            return
        self.accepting = False
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        log.info("listener %s %s stopped", self.name, self.bound)

    def _fd_exhausted(self, exc: OSError) -> None:
        self._accept_warn.warning(
            "listener %s: out of file descriptors (%s; RLIMIT_NOFILE %d): new clients are "
            "closed, live connections go on", self.name, exc.strerror or exc,
            resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    def _pause_accepting(self) -> None:
        """No spare descriptor either: stop polling the socket for a while, not spin."""
        assert self.sock is not None
        self.loop.remove_reader(self.sock.fileno())
        self._resume_handle = self.loop.call_later(_ACCEPT_BACKOFF, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume_handle = None
        FdReserve.keep()
        if self.sock is not None and self.accepting:
            self.loop.add_reader(self.sock.fileno(), self._on_acceptable)
