"""The admin endpoint: a small HTTP/1.1 server on the proxy's own event loop.

::

    GET /metrics  Prometheus text format (metrics.CacheportMetrics, read at scrape time);
                  ?name[]=FAMILY ?listener=NAME ?histograms=listener|sum|none select series
    GET /healthz  200 while the process serves
    GET /readyz   200 when every listener accepts and (by default) an upstream is healthy
    GET /status   JSON: listeners, their upstreams, health, connections, bytes, last check

It binds 127.0.0.1:9180 unless the YAML says otherwise, answers one request per
connection (``Connection: close``), and never touches the relays: every answer
is built from counters on the loop's thread, so it needs no locks. Other
commands hook in with ``add_route`` (a later ``POST /-/reload``, for one).
``fetch_status`` and ``format_status`` are the client side, for ``cacheport status``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import __version__
from .config import Address, AdminConfig
from .health.monitor import HealthMonitor, Target
from .health.state import State, choose_upstream
from .listener import Listener, bind_socket
from .metrics import CONTENT_TYPE_LATEST, CacheportMetrics, Selection, make_registry, render
from .process import worker_id

log = logging.getLogger("cacheport.admin")

SERVER_HEADER = f"cacheport/{__version__}"
_MAX_HEAD = 16 * 1024
_MAX_BODY = 1 << 20
_READ_TIMEOUT = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


class AdminError(Exception):
    """The admin endpoint could not bind, or ``cacheport status`` could not reach it."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    # A large body (a scrape of thousands of listeners) in pieces, written one at a
    # time: no copy of megabytes in one go on the loop. Sent after ``body``.
    parts: tuple[bytes, ...] = ()

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, (text + "\n").encode())

    @classmethod
    def json(cls, status: int, doc: Any) -> Response:
        body = json.dumps(doc, indent=2, sort_keys=False).encode() + b"\n"
        return cls(status, body, "application/json")


Handler = Callable[[Request], Awaitable[Response]]
Listeners = Callable[[], Iterable[Listener]]
Monitor = Callable[[], HealthMonitor | None]


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
        self.started_at = time.time()
        self.bound: Address | None = None
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False
        self.routes: dict[tuple[str, str], Handler] = {}
        # More of /status from the owner (clusters, reload counts), kept out of this module
        self.status_extra: Callable[[], dict[str, Any]] | None = None
        # True once a stop began: /readyz says 503 so a load balancer deregisters this host
        self.draining: Callable[[], bool] = lambda: False
        self.add_route("GET", "/metrics", self._metrics)
        self.add_route("GET", "/healthz", self._healthz)
        self.add_route("GET", "/readyz", self._readyz)
        self.add_route("GET", "/status", self._status)

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve ``method path`` with ``handler`` (e.g. ``POST /-/reload``); GET serves HEAD."""
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
        self._server = await asyncio.start_server(self._serve, sock=self._sock, limit=_MAX_HEAD)
        self._sock = None
        assert self.bound is not None
        if not _is_loopback(self.bound.host):
            log.warning("admin endpoint on %s is reachable from other hosts; it has no "
                        "authentication", self.bound)
        log.info("admin endpoint on http://%s (/metrics /healthz /readyz /status)", self.bound)

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
        self._tasks.add(task)
        try:
            try:
                async with asyncio.timeout(_READ_TIMEOUT):
                    request_or_error = await _read_request(reader)
            except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                return
            if isinstance(request_or_error, Response):
                response = request_or_error
                head_only = False
            else:
                response = await self._dispatch(request_or_error)
                head_only = request_or_error.method == "HEAD"
            writer.write(_encode(response, head_only))
            await writer.drain()
            for part in () if head_only else response.parts:
                writer.write(part)
                await writer.drain()
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
        try:
            return await handler(request)
        except Exception:
            log.exception("admin endpoint: %s %s failed", request.method, request.path)
            return Response.text(500, "internal error; see cacheport's log")

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

    async def _status(self, _request: Request) -> Response:
        return Response.json(200, self.status())

    def status(self) -> dict[str, Any]:
        listeners = list(self.listeners())
        monitor = self.monitor()
        draining = self.draining()
        ready, why = readiness(listeners, monitor, self.config.ready_requires_healthy, draining)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "worker": worker_id(),  # None unless one of several workers
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "ready": ready,
            "ready_reason": why,
            "draining": draining,
            "listeners": [listener_status(lst, monitor) for lst in listeners],
            **(self.status_extra() if self.status_extra is not None else {}),
        }


# ---------------------------------------------------------------------------
# Status and readiness: values in, values out


def _healthy(state: State | None) -> bool:
    return state is None or state is State.UP


def readiness(listeners: list[Listener], monitor: HealthMonitor | None,
              requires_healthy: bool, draining: bool = False) -> tuple[bool, str]:
    """Ready when every listener accepts and, if asked, at least one upstream is healthy.

    A host that is draining is never ready: that is how a load balancer learns to send
    new clients elsewhere while this one still accepts (``drain_delay``).
    """
    if draining:
        return False, "not ready: draining (stop requested)"
    if not listeners:
        return False, "not ready: no listeners"
    idle = [lst.name for lst in listeners if not lst.accepting]
    if idle:
        return False, f"not ready: not accepting on {', '.join(idle)}"
    if requires_healthy:
        states = [monitor.state(lst.name, addr) if monitor is not None else None
                  for lst in listeners for addr in lst.config.upstreams]
        if not any(_healthy(s) for s in states):
            return False, "not ready: no upstream is healthy"
    return True, "ready"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _target_status(target: Target | None) -> dict[str, Any]:
    if target is None:
        return {"health": "unchecked"}
    out: dict[str, Any] = {
        "health": target.state.value,
        "since": _iso(target.since),
        "state_changes": target.changes,
        "checks": {"ok": target.checks_ok, "failed": target.checks_failed},
        "last_check": None,
    }
    if target.last is not None:
        out["last_check"] = {
            "ok": target.last.ok,
            "reason": target.last.reason,
            "at": _iso(target.last_at),
            "duration_seconds": round(target.last_duration or 0.0, 6),
            **({"detail": dict(target.last.detail)} if target.last.detail else {}),
        }
    return out


def listener_status(listener: Listener, monitor: HealthMonitor | None) -> dict[str, Any]:
    """One listener for ``/status``; never includes credentials (only the check's timing)."""
    lc = listener.config
    targets = {t.upstream: t for t in monitor.targets_of(lc.name)} if monitor else {}

    def state_of(addr: Address) -> State | None:
        target = targets.get(addr)
        return target.state if target is not None else None

    in_use = choose_upstream((addr, state_of(addr)) for addr in lc.upstreams)
    totals = listener.book.totals()
    shown = list(lc.upstreams) + [a for a in totals if a not in lc.upstreams]
    upstreams = []
    for index, addr in enumerate(shown):
        active, up, down = totals.get(addr, (0, 0, 0))
        counters = listener.book.counters.get(addr)
        upstreams.append({
            "address": str(addr),
            "role": "upstream" if index == 0 else
                    "backup" if addr in lc.backup else "former",
            "in_use": addr == in_use,
            **_target_status(targets.get(addr)),
            "active": active,
            "connections": counters.connections if counters else 0,
            "bytes_upstream": up,
            "bytes_downstream": down,
        })
    health = lc.health
    return {
        "name": lc.name,
        "listen": str(listener.bound or lc.listen),
        "protocol": lc.protocol,
        "accepting": listener.accepting,
        "on_down": lc.on_down,
        "check": None if health is None else {
            "kind": health.kind, "interval": health.interval, "timeout": health.timeout,
            "rise": health.rise, "fall": health.fall,
        },
        "relay": listener.relay.value,  # engine, splice or buffered: who moves the bytes
        "accepted": listener.stats.accepted,
        "active": listener.active,
        "refused": dict(sorted(listener.stats.refused.items())),
        "proxy_protocol": lc.proxy_protocol,
        # Behind a load balancer with proxy_protocol, these are the header's addresses.
        "clients": listener.top_clients(),
        "upstreams": upstreams,
    }


# ---------------------------------------------------------------------------
# HTTP plumbing


async def _read_request(reader: asyncio.StreamReader) -> Request | Response:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        return Response.text(413, "request head too large")
    if len(head) > _MAX_HEAD:
        return Response.text(413, "request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return Response.text(400, "expected an HTTP/1.x request line")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return Response.text(400, f"malformed header line {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    body = b""
    length_text = headers.get("content-length")
    if length_text is not None:
        if not length_text.isdigit():
            return Response.text(400, "bad Content-Length")
        length = int(length_text)
        if length > _MAX_BODY:
            return Response.text(413, "request body too large")
        body = await reader.readexactly(length)
    path, _, query = target.partition("?")
    return Request(method.upper(), path, query, headers, body)


def _encode(response: Response, head_only: bool) -> bytes:
    reason = _REASONS.get(response.status, "")
    headers = {
        "Content-Type": response.content_type,
        "Content-Length": str(len(response.body) + sum(map(len, response.parts))),
        "Cache-Control": "no-store",
        "Connection": "close",
        # ``cacheport healthcheck`` tells this endpoint from another process on the port
        "Server": SERVER_HEADER,
        **response.headers,
    }
    head = f"HTTP/1.1 {response.status} {reason}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + (b"" if head_only else response.body)


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "localhost")


# ---------------------------------------------------------------------------
# Client side: ``cacheport status``


def fetch_status(address: Address, timeout: float = 5.0) -> dict[str, Any]:
    """GET /status from a running cacheport; ``AdminError`` says why it could not."""
    url = f"http://{address}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            doc = json.loads(reply.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise AdminError(f"admin endpoint {address} answered {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        raise AdminError(f"cannot reach the admin endpoint at {address}: {str(text).lower()}"
                         f" (is cacheport running, with this admin address?)") from None
    except TimeoutError:
        raise AdminError(f"the admin endpoint at {address} did not answer within "
                         f"{timeout:g}s") from None
    except (ValueError, OSError) as exc:
        raise AdminError(f"admin endpoint {address} sent something that is not status "
                         f"JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("listeners"), list):
        raise AdminError(f"admin endpoint {address} sent JSON without a 'listeners' list")
    return doc


def probe_address(listen: Address) -> Address:
    """Where a local client reaches an endpoint bound to ``listen``: the loopback address
    of the same family when it is bound to every address (``0.0.0.0``, ``[::]``)."""
    if listen.host in ("0.0.0.0", ""):
        return Address("127.0.0.1", listen.port)
    if listen.host == "::":
        return Address("::1", listen.port)
    return listen


def probe_health(address: Address, path: str = "/healthz",
                 timeout: float = 5.0) -> tuple[bool, str]:
    """GET ``path`` from the admin endpoint at ``address``: (healthy, what was seen).

    Healthy only on a 200 from cacheport itself (its ``Server`` header): with host
    networking another process may hold the port, and its 200 says nothing about us.
    """
    url = f"http://{address}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            status, server = reply.status, reply.headers.get("Server", "")
            body = reply.read(200).decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        status, server = exc.code, exc.headers.get("Server", "")
        body = exc.read(200).decode(errors="replace").strip()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        return False, f"cannot reach the admin endpoint at {url}: {str(text).lower()}"
    if not server.startswith("cacheport/"):
        return False, (f"{url} answered {status}, but not as cacheport (Server: "
                       f"{server or 'none'}): another process holds the admin port; "
                       f"give admin.listen a free one")
    return status == 200, f"{url}: {status} {body}".rstrip()


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_status(doc: dict[str, Any]) -> str:
    """``/status`` as a table for a person: one row per upstream, ``*`` where new ones go."""
    header = ("LISTENER", "LISTEN", "UPSTREAM", "HEALTH", "ACTIVE", "CLIENT->NODE",
              "NODE->CLIENT")
    rows: list[tuple[str, ...]] = [header]
    for lst in doc.get("listeners", []):
        first = True
        for up in lst.get("upstreams", []):
            name = str(lst.get("name", "?")) if first else ""
            listen = str(lst.get("listen", "?")) if first else ""
            if first and not lst.get("accepting", True):
                listen += " (not accepting)"
            first = False
            address = str(up.get("address", "?"))
            if up.get("role") in ("backup", "former"):
                address += f" ({up['role']})"
            if up.get("in_use"):
                address += " *"
            health = str(up.get("health", "?")).upper()
            if health == "UNCHECKED":
                health = "unchecked"
            last = up.get("last_check")
            if health == "DOWN" and isinstance(last, dict) and last.get("reason"):
                health += f" ({last['reason']})"
            rows.append((name, listen, address, health, str(up.get("active", 0)),
                         human_bytes(int(up.get("bytes_upstream", 0))),
                         human_bytes(int(up.get("bytes_downstream", 0)))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {4, 5, 6}
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in numeric else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    for cluster in doc.get("clusters") or []:
        lines += ["", *format_cluster(cluster)]
    workers = doc.get("workers")
    if workers:
        lines += ["", "workers: " + ", ".join(
            f"{w.get('worker')} (pid {w.get('pid')}, {'ready' if w.get('ready') else 'not ready'})"
            for w in workers)]
    ready = "ready" if doc.get("ready") else str(doc.get("ready_reason", "not ready"))
    lines.append("")
    lines.append(f"cacheport {doc.get('version', '?')}, up {_duration(doc.get('uptime_seconds'))}"
                 f", {ready}; * marks where new connections go")
    return "\n".join(lines)


def format_cluster(cluster: dict[str, Any]) -> list[str]:
    """One cluster's nodes: identity, role, slot ranges, the port clients are given."""
    seed = "".join(f", {word} port {cluster[key]}" for key, word in (
        ("seed_port", "seed"), ("primary_port", "primary"), ("reader_port", "reader"))
        if cluster.get(key))
    error = f"; last error: {cluster['last_error']}" if cluster.get("last_error") else ""
    lines = [f"cluster {cluster.get('name')} ({cluster.get('engine')}, seed {cluster.get('seed')}"
             f", announce {cluster.get('announce')}, ports {cluster.get('ports')}{seed}){error}"]
    header = ("NODE", "ADDRESS", "ROLE", "SLOTS", "PORT", "ACTIVE")
    rows: list[tuple[str, ...]] = [header]
    for node in cluster.get("nodes", []):
        slots = ",".join(f"{a}-{b}" if a != b else str(a) for a, b in node.get("slots") or [])
        port = str(node.get("port") or "-")
        if node.get("port") and not node.get("listening"):
            port += " (not listening)"
        rows.append((str(node.get("hostname") or node.get("id", "?"))[:40],
                     str(node.get("address", "?")), str(node.get("role") or "-") + (
                         " (failed)" if node.get("health") == "failed" else ""),
                     slots or "-", port, str(node.get("connections", 0))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if cluster.get("unassigned"):
        lines.append(f"no port (range full): {', '.join(map(str, cluster['unassigned']))}")
    return lines


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
