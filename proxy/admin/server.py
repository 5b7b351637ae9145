"""The admin endpoint: a small HTTP/1.1 server on the proxy's own event loop.

::

    client --(admin.allow?)--> read one request (bounded: http.py) --> route
                                       writes (POST): token? (auth.py) --^

It answers one request per connection (``Connection: close``) and never touches the
relays: every answer is built from counters on the loop's thread, so it needs no locks,
and a long one (``/status`` or the page at thousands of listeners) is built a slice at a
time (``status.Slicer``) so the relays keep the loop. Other commands hook in with
``add_route`` (``POST /-/reload``, for one); write routes pass ``auth.check_write``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from ..config import Address, AdminConfig
from ..config.parsers import is_loopback
from ..health.monitor import HealthMonitor
from ..listener import Listener
from ..metrics import CONTENT_TYPE_LATEST, CacheportMetrics, Selection, make_registry, render
from ..port import bind_socket
from ..process import worker_id
from . import http, page
from .auth import NOT_ALLOWED, READ_METHODS, Refusal, check_write, source_allowed, writes_open
from .client import AdminError
from .http import Malformed, Request, Response
from .status import LazyListeners, Slicer, json_parts, readiness

log = logging.getLogger("cacheport.admin")

Handler = Callable[[Request], Awaitable[Response]]
Listeners = Callable[[], Iterable[Listener]]
Monitor = Callable[[], HealthMonitor | None]
Document = Callable[[Request, Slicer], Awaitable[dict[str, Any]]]
_LOG_EVERY = 60.0  # seconds between two log lines about one source's refusals


class _Refusals(Collector):
    """``cacheport_admin_refused_total{reason}``: requests the admin endpoint turned away."""

    def __init__(self, counts: Counter[str]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("cacheport_admin_refused",
                                     "Admin requests refused, by reason", labels=["reason"])
        for reason, count in sorted(self.counts.items()):
            family.add_metric([reason], count)
        yield family


class AdminServer:
    """Owns the admin socket and the routes; reads listeners and monitor through callables."""

    def __init__(self, config: AdminConfig, listeners: Listeners, monitor: Monitor, *,
                 reuse_port: bool = False) -> None:
        self.config = config
        # Multi-process workers all bind the admin port too (SO_REUSEPORT): each answers
        # for its own connections, and /healthz works whichever one the kernel picks.
        self.reuse_port = reuse_port
        self.listeners = listeners
        self.monitor = monitor
        self.cacheport_metrics = CacheportMetrics(listeners, monitor)
        self.registry = make_registry()  # process-wide families; owners may add theirs
        self.refused: Counter[str] = Counter()  # by reason: not_allowed, bad_token, timeout...
        self.registry.register(_Refusals(self.refused))
        self.started_at = time.time()
        self.bound: Address | None = None
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._logged: dict[tuple[str, str], float] = {}
        self.routes: dict[tuple[str, str], Handler] = {}
        # More of /status from the owner (clusters, reload counts), kept out of this module
        self.status_extra: Callable[[], dict[str, Any]] | None = None
        # True once a stop began: /readyz says 503 so a load balancer deregisters this host
        self.draining: Callable[[], bool] = lambda: False
        # What /status and / show; the supervisor swaps in its merge of the workers'
        self.document: Document = self._document
        self.add_route("GET", "/", self._page)
        self.add_route("GET", "/metrics", self._metrics)
        self.add_route("GET", "/healthz", self._healthz)
        self.add_route("GET", "/readyz", self._readyz)
        self.add_route("GET", "/status", self._status)

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve ``method path`` with ``handler`` (e.g. ``POST /-/reload``); GET serves HEAD.
        Any method but GET/HEAD is a write: it passes ``auth.check_write`` first."""
        self.routes[(method.upper(), path)] = handler

    # -- life cycle --------------------------------------------------------------

    def bind(self) -> None:
        address = self.config.listen
        try:
            self._sock = bind_socket(address, backlog=64, reuse_port=self.reuse_port)
        except OSError as exc:
            raise AdminError(f"admin endpoint: cannot listen on {address}: "
                             f"{exc.strerror or exc}") from None
        host, port = self._sock.getsockname()[:2]
        self.bound = Address(host, port)

    async def start(self) -> None:
        assert self._sock is not None, "bind() first"
        self._server = await asyncio.start_server(self._serve, sock=self._sock,
                                                  limit=http.MAX_HEAD)
        self._sock = None
        bound = self.bound
        assert bound is not None
        if not is_loopback(bound):
            if self.config.allow is None:
                log.warning("admin endpoint on %s is reachable from other hosts and has no "
                            "allow list; set admin.allow: [CIDR, ...] to the hosts that "
                            "scrape and probe it", bound)
            if self.config.token is None:
                log.warning("admin endpoint on %s has no token: %s", bound,
                            "POST /-/reload is open to every allowed source "
                            "(admin.insecure_writes)" if self.config.insecure_writes else
                            "POST /-/reload is refused; set admin.token_file to allow it")
        log.info("admin endpoint on http://%s (/ /metrics /healthz /readyz /status)", bound)

    async def stop(self) -> None:
        """Close the socket and any request in flight; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- HTTP ------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if len(self._tasks) >= http.MAX_CONNECTIONS:
            self.refused["busy"] += 1
            writer.transport.abort()
            return
        self._tasks.add(task)
        try:
            try:
                async with asyncio.timeout(http.READ_TIMEOUT):
                    request = await http.read_request(reader, source)
            except Malformed as exc:
                self.refused["malformed"] += 1
                response, head_only = exc.response, False
            except TimeoutError:
                self.refused["timeout"] += 1
                return
            except (ConnectionError, asyncio.IncompleteReadError):
                return
            else:
                response = await self._dispatch(request)
                head_only = request.method == "HEAD"
            async with asyncio.timeout(http.WRITE_TIMEOUT):
                writer.write(http.encode_head(response, head_only))
                await writer.drain()
                for batch in () if head_only else _batches(response.parts):
                    writer.write(batch)
                    await writer.drain()
        except TimeoutError:
            self.refused["timeout"] += 1
        except ConnectionError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    async def _dispatch(self, request: Request) -> Response:
        if not source_allowed(request.source, self.config):
            return self._refuse(request, NOT_ALLOWED)
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.routes.get((method, request.path))
        if handler is None:
            allowed = sorted({m for m, p in self.routes if p == request.path})
            if allowed:
                if "GET" in allowed:
                    allowed.append("HEAD")
                return Response(405, b"method not allowed\n",
                                headers={"Allow": ", ".join(allowed)})
            paths = " ".join(sorted({p for _m, p in self.routes}))
            return Response.text(404, f"not found; try {paths}")
        if method not in READ_METHODS:
            assert self.bound is not None
            refusal = check_write(self.config, self.bound, request.headers.get("authorization"))
            if refusal is not None:
                return self._refuse(request, refusal)
        try:
            return await handler(request)
        except Exception:
            log.exception("admin endpoint: %s %s failed", request.method, request.path)
            return Response.text(500, "internal error; see cacheport's log")

    def _refuse(self, request: Request, refusal: Refusal) -> Response:
        """Count, log (once a minute per source and reason) and answer a refusal."""
        self.refused[refusal.reason] += 1
        key = (request.source, refusal.reason)
        now = time.monotonic()
        if now - self._logged.get(key, -_LOG_EVERY) >= _LOG_EVERY:
            if len(self._logged) >= 4096:
                self._logged = {k: t for k, t in self._logged.items() if now - t < _LOG_EVERY}
            self._logged[key] = now
            log.warning("admin endpoint: refused %s %s from %s (%s)", request.method,
                        request.path[:100], request.source or "?", refusal.reason)
        headers = {"WWW-Authenticate": 'Bearer realm="cacheport"'} if refusal.status == 401 \
            else {}
        return Response.text(refusal.status, refusal.text, headers)

    # -- the endpoints -------------------------------------------------------------

    async def _metrics(self, request: Request) -> Response:
        try:
            selection = Selection.from_query(request.query)
        except ValueError as exc:
            return Response.text(400, f"/metrics: {exc}")
        parts = await self.cacheport_metrics.render_parts(selection)
        return Response(200, b"", CONTENT_TYPE_LATEST,
                        parts=(*parts, render(self.registry, selection)))

    async def _healthz(self, _request: Request) -> Response:
        return Response.text(200, "ok")

    async def _readyz(self, _request: Request) -> Response:
        ready, why = readiness(list(self.listeners()), self.monitor(),
                               self.config.ready_requires_healthy, self.draining())
        return Response.text(200 if ready else 503, why)

    async def _status(self, request: Request) -> Response:
        slicer = Slicer()
        doc = await self.document(request, slicer)
        pretty = "pretty" in urllib.parse.parse_qs(request.query, keep_blank_values=True)
        parts = await json_parts(doc, slicer, pretty)
        return Response(200, b"", "application/json", parts=tuple(parts))

    async def _page(self, request: Request) -> Response:
        query = urllib.parse.parse_qs(request.query)
        refresh_text = (query.get("refresh") or [str(page.DEFAULT_REFRESH)])[-1]
        refresh = int(refresh_text) if refresh_text.isdigit() else page.DEFAULT_REFRESH
        slicer = Slicer()
        doc = await self.document(request, slicer)
        parts = await page.render_parts(doc, min(refresh, 3600), slicer)
        return Response(200, b"", "text/html; charset=utf-8", parts=tuple(parts))

    async def _document(self, request: Request, slicer: Slicer) -> dict[str, Any]:
        """This process's status; ``?listener=NAME`` (repeatable) keeps only those."""
        names = set(urllib.parse.parse_qs(request.query).get("listener", []))
        listeners = [lst for lst in self.listeners() if not names or lst.name in names]
        monitor = self.monitor()
        draining = self.draining()
        ready, why = readiness(list(self.listeners()), monitor,
                               self.config.ready_requires_healthy, draining)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "worker": worker_id(),  # None unless one of several workers
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "ready": ready,
            "ready_reason": why,
            "draining": draining,
            "listeners": LazyListeners(listeners, monitor),  # built as they are encoded
            **(self.status_extra() if self.status_extra is not None else {}),
            "admin": self.admin_status(),
        }

    def admin_status(self) -> dict[str, Any]:
        """The endpoint's own settings and refusals; says whether a token is set, never it."""
        bound = self.bound or self.config.listen
        return {
            "listen": str(bound),
            "allow": None if self.config.allow is None else [str(n) for n in self.config.allow],
            "writes": "token" if self.config.token is not None else
                      "open" if writes_open(self.config, bound) else "refused",
            "refused": dict(sorted(self.refused.items())),
        }


def _batches(parts: Iterable[bytes], size: int = 64 * 1024) -> Iterator[bytes]:
    """``parts`` joined into writes of about ``size``: one write per listener's few hundred
    bytes was one syscall each, thousands in a row without yielding to the loop."""
    batch: list[bytes] = []
    held = 0
    for part in parts:
        batch.append(part)
        held += len(part)
        if held >= size:
            yield b"".join(batch)
            batch, held = [], 0
    if batch:
        yield b"".join(batch)
