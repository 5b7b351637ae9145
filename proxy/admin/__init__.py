"""The admin endpoint: HTTP on the proxy's own loop, and its client side.

::

    GET /         the status page: listeners, upstreams, health, clusters (page.py)
    GET /metrics  Prometheus text format (metrics.CacheportMetrics, read at scrape time);
                  ?name[]=FAMILY ?listener=NAME ?histograms=listener|sum|none select series
    GET /healthz  200 while the process serves
    GET /readyz   200 when every listener accepts and (by default) an upstream is healthy
    GET /status   JSON: listeners, their upstreams, health, connections, bytes, last check
    POST /-/reload  (added by runtime) re-reads the port map; needs the token (auth.py)

It binds 127.0.0.1:9180 unless the YAML says otherwise. ``http`` parses requests with
hard limits, ``auth`` decides who may read and who may write, ``status`` builds the
status document in slices, ``page`` renders it as HTML, ``server`` ties them to a socket,
and ``client`` is ``cacheport status`` / ``healthcheck``'s side.
"""

from __future__ import annotations

from .client import (
    AdminError,
    fetch_status,
    format_cluster,
    format_status,
    human_bytes,
    probe_address,
    probe_health,
)
from .http import Request, Response
from .server import AdminServer, Handler
from .status import listener_status, readiness

__all__ = [
    "AdminError",
    "AdminServer",
    "Handler",
    "Request",
    "Response",
    "fetch_status",
    "format_cluster",
    "format_status",
    "human_bytes",
    "listener_status",
    "probe_address",
    "probe_health",
    "readiness",
]
