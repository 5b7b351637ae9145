"""The supervisor's admin endpoint: every worker's metrics and status, together.

::

    Prometheus --GET /metrics--> supervisor admin (the configured address)
                                   |-- GET 127.0.0.1:<w0>/metrics  worker 0 (loopback, port 0)
                                   '-- GET 127.0.0.1:<w1>/metrics  worker 1

Each worker serves its own admin endpoint on a private loopback port and tells
the supervisor which one when it reports ready. The supervisor fetches them
all per scrape (passing on the scrape's query, so ``?listener=`` and the other
filters work here too) and re-exports every sample with a ``worker`` label, so
nothing is summed wrongly (a health gauge stays 0/1) and ``sum without
(worker)`` gives the totals. Values in, values out: merging is a pure function
on the text.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from .config import Address

FETCH_TIMEOUT = 2.0


async def http_request(address: Address, method: str, path: str,
                       authorization: str | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 request to a worker's admin endpoint (which closes after answering)."""
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    async with asyncio.timeout(FETCH_TIMEOUT):
        reader, writer = await asyncio.open_connection(address.host, address.port)
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: {address}\r\n{auth}"
                         "Content-Length: 0\r\nConnection: close\r\n\r\n".encode("latin-1"))
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 502
    return status, body


def merge_metrics(texts: Sequence[tuple[str, str]]) -> str:
    """Families from each ``(worker, exposition text)``, every sample labelled with its worker.

    A text operation, line by line: each sample line gets ``worker="N"`` as its last
    label, and a family's samples from every worker go together under one HELP and
    TYPE. Parsing every sample into objects and rendering them again took seconds
    per scrape with a thousand listeners per worker; this is a split and a join.
    """
    heads: dict[str, list[str]] = {}
    bodies: dict[str, list[str]] = {}
    for worker, text in texts:
        label = f'worker="{worker}"'
        family = ""
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    if family not in bodies:
                        heads[family], bodies[family] = [], []
                    if not any(h.startswith(f"# {parts[1]} ") for h in heads[family]):
                        heads[family].append(line)  # the first worker's HELP and TYPE
                continue
            if family not in bodies:  # a sample before any HELP/TYPE: its own family
                family = line.split("{", 1)[0].split(" ", 1)[0]
                heads.setdefault(family, [])
                bodies.setdefault(family, [])
            sample, _, value = line.rpartition(" ")
            if sample.endswith("}"):
                sample = f"{sample[:-1]}{',' if not sample.endswith('{}') else ''}{label}}}"
            else:
                sample = f"{sample}{{{label}}}"
            bodies[family].append(f"{sample} {value}")
    out = []
    for family, body in bodies.items():
        out.extend(heads[family])
        out.extend(body)
    return "\n".join(out) + "\n" if out else ""


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def render_merged(texts: Sequence[tuple[str, str]], extra: Iterable[Metric] = ()) -> bytes:
    """The workers' merged text, then the supervisor's own families (``extra``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(extra))
    return merge_metrics(texts).encode() + generate_latest(registry)


def merge_status(docs: Sequence[tuple[str, dict[str, Any] | None]]) -> dict[str, Any]:
    """One status document: listeners from the first worker that answered, connection and
    byte counts summed over every worker, and each worker's own readiness."""
    answered = [(w, d) for w, d in docs if d is not None]
    workers = [{"worker": w, "pid": d.get("pid") if d else None,
                "ready": bool(d and d.get("ready")),
                "ready_reason": d.get("ready_reason") if d else "did not answer"}
               for w, d in docs]
    if not answered:
        return {"ready": False, "ready_reason": "no worker answered", "workers": workers,
                "listeners": []}
    first = answered[0][1]
    listeners: list[dict[str, Any]] = json.loads(json.dumps(first.get("listeners", [])))
    by_name = {lst.get("name"): lst for lst in listeners}
    for _w, doc in answered[1:]:
        for other in doc.get("listeners", []):
            mine = by_name.get(other.get("name"))
            if mine is not None:
                _add_numbers(mine, other)
    merged = {key: value for key, value in first.items()
              if key not in ("listeners", "pid", "worker", "ready", "ready_reason")}
    ready = len(answered) == len(docs) and all(d.get("ready") for _w, d in answered)
    reason = "ready" if ready else "; ".join(
        f"worker {w['worker']}: {w['ready_reason']}" for w in workers if not w["ready"])
    return {**merged, "ready": ready, "ready_reason": reason, "workers": workers,
            "listeners": listeners}


_SUMMED = ("active", "accepted", "bytes_upstream", "bytes_downstream", "connections",
           "refused", "bytes_in", "bytes_out")


def _add_numbers(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Add the per-connection counters of ``other`` into ``into``, recursively."""
    for key, value in other.items():
        mine = into.get(key)
        if isinstance(value, dict) and isinstance(mine, dict):
            _add_numbers(mine, value)
        elif isinstance(value, list) and isinstance(mine, list) and len(value) == len(mine):
            for a, b in zip(mine, value, strict=True):
                if isinstance(a, dict) and isinstance(b, dict):
                    _add_numbers(a, b)
        elif (isinstance(value, int) and isinstance(mine, int)
              and not isinstance(value, bool) and _summed(key)):
            into[key] = mine + value


def _summed(key: str) -> bool:
    return key in _SUMMED or key.startswith(("bytes", "connections")) or key.endswith("_total")


WorkerAddresses = Callable[[], list[tuple[str, Address | None]]]


async def gather_metrics(addresses: WorkerAddresses, query: str = "") -> list[tuple[str, str]]:
    """Every ready worker's ``/metrics`` (with the scrape's own query: its filters apply)."""
    path = "/metrics" + (f"?{query}" if query else "")

    async def one(worker: str, address: Address | None) -> tuple[str, str] | None:
        if address is None:
            return None
        try:
            status, body = await http_request(address, "GET", path)
        except (OSError, TimeoutError):
            return None
        return (worker, body.decode("utf-8", "replace")) if status == 200 else None

    results = await asyncio.gather(*(one(w, a) for w, a in addresses()))
    return [r for r in results if r is not None]


async def gather_status(addresses: WorkerAddresses) -> list[tuple[str, dict[str, Any] | None]]:
    async def one(worker: str, address: Address | None) -> tuple[str, dict[str, Any] | None]:
        if address is None:
            return worker, None
        try:
            status, body = await http_request(address, "GET", "/status")
            doc = json.loads(body) if status == 200 else None
        except (OSError, TimeoutError, ValueError):
            doc = None
        return worker, doc if isinstance(doc, dict) else None

    return list(await asyncio.gather(*(one(w, a) for w, a in addresses())))
