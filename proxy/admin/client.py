"""The admin endpoint's client side: ``cacheport status``, ``healthcheck`` and friends.

Plain ``urllib`` (these run in the CLI, not on the proxy's loop), and the table
``cacheport status`` prints from a ``/status`` document.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from ..config import Address


class AdminError(Exception):
    """The admin endpoint could not bind, or ``cacheport status`` could not reach it."""


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
            if up.get("role") in ("backup", "former", "replica", "fallback"):
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
    lines.append(f"cacheport {doc.get('version', '?')}, up {duration(doc.get('uptime_seconds'))}"
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


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
