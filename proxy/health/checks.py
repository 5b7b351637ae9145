"""One checker per kind of node, each speaking the node's own protocol.

::

    tcp        connect succeeds
    memcached  ``version`` answers ``VERSION x`` (and ``stats`` if asked)
    redis      ``PING`` answers PONG, after AUTH when configured
               (and ``ROLE`` says master when ``role: primary``)

``WireChecker`` is what the monitor runs: one connection, the request of
``wire.request()`` written at once, the reply judged by ``wire.Judge`` as it
arrives, then a close with RST (no TIME_WAIT left behind: thousands of checks a
second must not use up the host's ephemeral ports). Plain checks run on the
``prober`` thread (a node's name resolved on the loop, its address reused for
``RESOLVE_TTL``), TLS ones as a transport on the loop. It costs a fraction of a
client library's check (``python -m bench scale``: 1,000 nodes every 2 s went
from 43 % of a core to about HAProxy's).
``MemcachedChecker`` (pymemcache, in a thread) and ``RedisChecker`` (redis.asyncio)
are the client-library checks the wire check was built to agree with; the
tests hold both to the same reasons.

memcached and redis checks speak TLS to nodes the listener reaches over TLS
(``upstream_tls``), with the listener's own context, so they verify what the
relayed connections verify.

A checker makes one fresh connection per check and closes it, so a check sees
what a new client would see. It never waits on its own: the monitor cuts every
check at ``timeout``. Results carry a short reason (``connection refused``,
``auth failed``, ``timed out``) that goes into the log and ``/status``; a
password can never be part of one (``_scrub``).
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import errno
import ipaddress
import math
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio
import redis.asyncio.connection
import redis.exceptions
from pymemcache.client.base import Client as MemcacheClient
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..config import Address, HealthConfig
from .prober import LINGER_OFF, Job, Prober
from .wire import Judge, Verdict, request


@dataclass(frozen=True, slots=True)
class CheckTls:
    """TLS to a node with in-transit encryption: the listener's context and the SNI name."""

    context: ssl.SSLContext
    server_name: str


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What one check saw: pass or fail, why, and what it read (for ``/status``)."""

    ok: bool
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict)


_ERRNO_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "timed out",
    errno.EPIPE: "connection closed by the node",
    errno.EMFILE: "out of file descriptors here",
    errno.ENFILE: "out of file descriptors here",
}
# A check that could not even open its socket says nothing about the node: at the
# open-files limit it must not mark every upstream DOWN (and cut them, on_down: close).
LOCAL_FAILURE = _ERRNO_REASONS[errno.EMFILE]


def describe_error(exc: BaseException) -> str:
    """A short, lower-case reason for a failed check; never a traceback."""
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return "auth failed"
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return "no permission (the ACL user may not run PING/ROLE)"
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return "loading its dataset"
    if isinstance(exc, TimeoutError | socket.timeout | redis.exceptions.TimeoutError):
        return "timed out"
    if isinstance(exc, MemcacheUnexpectedCloseError):
        return "connection closed by the node"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve: {exc.strerror}"
    if isinstance(exc, OSError):
        if exc.errno in _ERRNO_REASONS:
            return _ERRNO_REASONS[exc.errno]
        return (exc.strerror or str(exc) or type(exc).__name__).lower()
    if isinstance(exc, redis.exceptions.ConnectionError):
        # redis-py wraps socket errors in its own text: "Error 111 connecting to ..."
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError):
            return describe_error(cause)
        if "ssl" in str(exc).lower() or "certificate" in str(exc).lower():
            return "TLS handshake failed"
        text = str(exc).lower()
        if "refused" in text:
            return "connection refused"
        if "timeout" in text or "timed out" in text:
            return "timed out"
        if "closed" in text:
            return "connection closed by the node"
        return "connection error"
    if isinstance(exc, redis.exceptions.InvalidResponse):
        return "not a redis reply (is this a redis node?)"
    if isinstance(exc, redis.exceptions.ResponseError):
        return f"error reply: {str(exc)[:120]}"
    if isinstance(exc, MemcacheError):
        return f"unexpected reply: {str(exc)[:120]}"
    return f"check failed: {type(exc).__name__}"


class Checker(abc.ABC):
    """Checks one upstream address; ``check()`` is cut by the monitor at the timeout."""

    def __init__(self, address: Address, config: HealthConfig,
                 tls: CheckTls | None = None) -> None:
        self.address = address
        self.config = config
        self.tls = tls  # the TCP check ignores it: a connect is all it asks for

    @abc.abstractmethod
    async def check(self) -> CheckResult:
        """Run one check; raise or return a failing result when the node is not usable."""

    async def run(self, limit: float,
                  leftovers: set[asyncio.Task[CheckResult]] | None = None) -> CheckResult:
        """One check cut at ``limit``, any failure turned into a result (see ``run_check``)."""
        return await run_check(self, limit, leftovers)

    def start(self, limit: float, done: Callable[[CheckResult], None],
              leftovers: set[asyncio.Task[CheckResult]] | None = None) -> Callable[[], None]:
        """Begin one check; ``done`` gets its result once. Returns a function that abandons it.

        The monitor's way in; it abandons a check still running at ``limit``. This
        default runs ``run()`` as a task (cut at ``limit`` by itself as well); the
        wire check does it with callbacks alone.
        """
        task = asyncio.get_running_loop().create_task(self.run(limit, leftovers))

        def finished(t: asyncio.Task[CheckResult]) -> None:
            if not t.cancelled():
                done(t.result())

        task.add_done_callback(finished)
        return lambda: _abandon(task, leftovers)


class TcpChecker(Checker):
    """The node accepts a TCP connection."""

    async def check(self) -> CheckResult:
        _reader, writer = await asyncio.open_connection(self.address.host, self.address.port)
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return CheckResult(True, "connected")


class MemcachedChecker(Checker):
    """pymemcache ``version`` (and optionally ``stats``), run in the monitor's thread pool.

    At most one check per node is in a thread at any time: when the previous one
    is still blocked on a silent node, the next fails at once instead of taking a
    second thread, so hanging nodes cannot starve the checks of healthy ones.
    """

    def __init__(self, address: Address, config: HealthConfig,
                 pool: concurrent.futures.ThreadPoolExecutor, tls: CheckTls | None = None) -> None:
        super().__init__(address, config, tls)
        self.pool = pool
        self._inflight: concurrent.futures.Future[CheckResult] | None = None

    def _blocking_check(self) -> CheckResult:
        timeout = self.config.timeout
        tls_context = _SniContext(self.tls) if self.tls is not None else None
        client = MemcacheClient((self.address.host, self.address.port),
                                connect_timeout=timeout, timeout=timeout, no_delay=True,
                                tls_context=tls_context)
        try:
            version = client.version().decode("ascii", "replace")
            detail: dict[str, Any] = {"version": version}
            if self.config.stats:
                stats = client.stats()
                current = stats.get(b"curr_connections", stats.get("curr_connections"))
                if isinstance(current, int):
                    detail["curr_connections"] = current
            return CheckResult(True, f"VERSION {version}", detail)
        finally:
            client.close()

    async def check(self) -> CheckResult:
        if self._inflight is not None and not self._inflight.done():
            return CheckResult(False, "timed out (the previous check is still waiting)")
        future = self.pool.submit(self._blocking_check)
        self._inflight = future
        return await asyncio.wrap_future(future)


class RedisChecker(Checker):
    """redis.asyncio ``PING`` (after AUTH), and ``ROLE`` when the node must be the primary."""

    async def check(self) -> CheckResult:
        cfg = self.config
        secret = cfg.password.reveal() if cfg.password is not None else None
        tls: dict[str, Any] = {}
        connection_class: type[redis.asyncio.connection.Connection] = \
            redis.asyncio.connection.Connection
        if self.tls is not None:
            connection_class = _TlsConnection
            tls = {"tls_context": self.tls.context, "server_hostname": self.tls.server_name}
        pool = redis.asyncio.ConnectionPool(
            connection_class=connection_class, host=self.address.host, port=self.address.port,
            username=cfg.username, password=secret,
            socket_timeout=cfg.timeout, socket_connect_timeout=cfg.timeout,
            retry=Retry(NoBackoff(), 0),  # one try: the monitor's rise/fall is the retry
            **tls,
        )
        client = redis.asyncio.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        try:
            try:
                pong = await client.ping()
                if pong is not True:
                    return CheckResult(False, f"unexpected PING reply: {pong!r}"[:120])
                if cfg.role != "primary":
                    return CheckResult(True, "PONG")
                role = _decode_role(await client.role())
                if role != "master":
                    return CheckResult(False, f"role is {role}, not primary", {"role": role})
                return CheckResult(True, "PONG, role master", {"role": role})
            finally:
                await client.aclose(close_connection_pool=True)
        except Exception as exc:
            return CheckResult(False, _scrub(describe_error(exc), secret))


class _TlsConnection(redis.asyncio.connection.Connection):
    """redis-py's connection, over TLS with the listener's own context and SNI name.

    The same ``SSLContext`` the relay uses for this upstream, so a check verifies
    exactly what a client's connection will (CA, ``verify``, ``server_name``).
    """

    def __init__(self, *, tls_context: ssl.SSLContext, server_hostname: str,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tls_context = tls_context
        self._server_hostname = server_hostname

    def _connection_arguments(self) -> Mapping[str, Any]:
        return {**super()._connection_arguments(), "ssl": self._tls_context,
                "server_hostname": self._server_hostname}


class _SniContext:
    """What pymemcache needs of an SSLContext, sending the configured SNI name."""

    def __init__(self, tls: CheckTls) -> None:
        self.tls = tls

    def wrap_socket(self, sock: socket.socket, server_hostname: str | None = None,
                    **kwargs: Any) -> ssl.SSLSocket:
        return self.tls.context.wrap_socket(sock, server_hostname=self.tls.server_name,
                                            **kwargs)


def _decode_role(reply: Any) -> str:
    if isinstance(reply, list | tuple) and reply:
        first = reply[0]
        role = first.decode("ascii", "replace") if isinstance(first, bytes) else str(first)
        return "replica" if role == "slave" else role
    return "unknown"


def _scrub(text: str, secret: str | None) -> str:
    """Belt and braces: a server's error text must never carry the password into a log."""
    if secret and secret in text:
        return text.replace(secret, "***")
    return text


async def run_check(checker: Checker, limit: float,
                    leftovers: set[asyncio.Task[CheckResult]] | None = None) -> CheckResult:
    """One check, cut after ``limit`` seconds; any failure becomes a result with a reason.

    The check runs as a task of its own and is waited for with ``asyncio.wait``, so a
    client library that mishandles cancellation can neither stretch the check past
    ``limit`` nor swallow the cancellation of the monitor that waits for it. A check
    cut at ``limit`` is cancelled and, if ``leftovers`` is given, kept there until it
    has wound down (its own socket timeouts bound that).
    """
    task = asyncio.ensure_future(checker.check())
    task.add_done_callback(_retrieve)
    try:
        done, _pending = await asyncio.wait((task,), timeout=limit)
    except asyncio.CancelledError:
        _abandon(task, leftovers)
        raise
    if not done:
        _abandon(task, leftovers)
        return CheckResult(False, f"timed out after {limit:g}s")
    exc = task.exception()
    if exc is None:
        return task.result()
    if isinstance(exc, Exception):  # one bad check must not end the checks
        return CheckResult(False, describe_error(exc))
    raise exc


def _abandon(task: asyncio.Task[CheckResult],
             leftovers: set[asyncio.Task[CheckResult]] | None) -> None:
    """Cancel a check nobody waits for any more; keep it where its owner can await its end."""
    task.cancel()
    if leftovers is not None and not task.done():
        leftovers.add(task)
        task.add_done_callback(leftovers.discard)


def _retrieve(task: asyncio.Task[CheckResult]) -> None:
    """Mark a finished check's exception as seen, so asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()


class _WireProtocol(asyncio.Protocol):
    """One check's connection: write the request, judge the reply, wake the checker once."""

    __slots__ = ("done", "judge", "payload", "transport")

    def __init__(self, payload: bytes, judge: Judge, done: asyncio.Future[Verdict]) -> None:
        self.payload = payload
        self.judge = judge
        self.done = done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        if self.payload:
            self.transport.write(self.payload)
        else:
            self._decide(Verdict(True, "connected"))

    def data_received(self, data: bytes) -> None:
        verdict = self.judge.feed(data)
        if verdict is not None:
            self._decide(verdict)

    def eof_received(self) -> bool | None:
        self._decide(self.judge.closed())
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is not None:
                self.done.set_exception(exc)
            else:
                self._decide(self.judge.closed())

    def _decide(self, verdict: Verdict) -> None:
        if not self.done.done():
            self.done.set_result(verdict)




RESOLVE_TTL = 5.0  # a node's name is resolved again after this long: the listeners' dns_ttl


class WireChecker(Checker):
    """Any kind of node, spoken to directly: connect, one request, judge the reply, RST."""

    def __init__(self, address: Address, config: HealthConfig,
                 tls: CheckTls | None = None, prober: Prober | None = None) -> None:
        super().__init__(address, config, tls)
        self._payload = request(config)
        self._secret = config.password.reveal() if config.password is not None else None
        # The TCP check never speaks TLS: a connect is all it asks for.
        self._tls = tls if config.kind != "tcp" else None
        # Plain checks run on the prober's thread; TLS ones here, on the loop.
        self._prober = prober if self._tls is None else None
        family = _numeric_family(address.host)
        # A name is resolved on the loop and its address reused for RESOLVE_TTL.
        self._resolved: tuple[float, int, str] | None = (
            (math.inf, family, address.host) if family is not None else None)

    def _result(self, outcome: Verdict | OSError) -> CheckResult:
        if isinstance(outcome, Verdict):
            return CheckResult(outcome.ok, outcome.reason, outcome.detail)
        return CheckResult(False, _scrub(describe_error(outcome), self._secret))

    def start(self, limit: float, done: Callable[[CheckResult], None],
              leftovers: set[asyncio.Task[CheckResult]] | None = None) -> Callable[[], None]:
        prober = self._prober
        if prober is None:
            return super().start(limit, done, leftovers)
        loop = asyncio.get_running_loop()
        resolved = self._resolved
        if resolved is not None and resolved[0] > loop.time():
            return self._submit(prober, resolved[1], resolved[2], done)
        # The name's address is stale: resolve first (getaddrinfo in the loop's executor).
        submitted: list[Callable[[], None]] = []

        async def resolve_then_submit() -> None:
            try:
                family, host = await self._resolve()
            except OSError as exc:
                done(self._result(exc))
                return
            submitted.append(self._submit(prober, family, host, done))

        task = loop.create_task(resolve_then_submit())

        def abandon() -> None:
            task.cancel()
            for cancel in submitted:
                cancel()

        return abandon

    def _submit(self, prober: Prober, family: int, host: str,
                done: Callable[[CheckResult], None]) -> Callable[[], None]:
        job = Job(family, host, self.address.port, self._payload, Judge(self.config),
                  lambda outcome, _seconds: done(self._result(outcome)))
        prober.submit(job)
        return lambda: prober.cancel(job)

    async def _resolve(self) -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.address.host, self.address.port,
                                       type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        if not infos:
            raise socket.gaierror(socket.EAI_NONAME, "no addresses")
        family, _type, _proto, _canon, sockaddr = infos[0]
        self._resolved = (loop.time() + RESOLVE_TTL, family, str(sockaddr[0]))
        return family, str(sockaddr[0])

    async def check(self) -> CheckResult:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Verdict] = loop.create_future()
        payload, judge = self._payload, Judge(self.config)
        tls = self._tls
        transport, _protocol = await loop.create_connection(
            lambda: _WireProtocol(payload, judge, done), self.address.host, self.address.port,
            ssl=tls.context if tls is not None else None,
            server_hostname=tls.server_name if tls is not None else None)
        try:
            verdict = await done
        finally:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_OFF)
            transport.abort()
        return CheckResult(verdict.ok, verdict.reason, verdict.detail)

    async def run(self, limit: float,
                  leftovers: set[asyncio.Task[CheckResult]] | None = None) -> CheckResult:
        """Cut at ``limit`` in place: no task, no client library that could mishandle it."""
        try:
            async with asyncio.timeout(limit):
                return await self.check()
        except TimeoutError:
            return CheckResult(False, f"timed out after {limit:g}s")
        except Exception as exc:  # one bad check must not end the checks
            return CheckResult(False, _scrub(describe_error(exc), self._secret))


def _numeric_family(host: str) -> int | None:
    """AF_INET/AF_INET6 for an IP literal, ``None`` for a name (resolved per check)."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


def make_checker(address: Address, config: HealthConfig, tls: CheckTls | None = None,
                 prober: Prober | None = None) -> Checker:
    """The checker the monitor runs for one node: the wire check, for every kind."""
    return WireChecker(address, config, tls, prober)
