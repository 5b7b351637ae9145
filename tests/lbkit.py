"""A real HAProxy in ``mode tcp`` in front of cacheport, as an AWS NLB stands in production.

It sends a PROXY header (``send-proxy-v2`` or ``send-proxy``) to every server and, when
asked, health-checks each server's ``/readyz`` the way an NLB target group does.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.cluster_helpers import free_range
from tests.support import require_binary, stop_process, wait_until


def quiet_port(host: str = "127.0.0.1") -> int:
    """A free port below the ephemeral range, for a process that binds it later: no
    outgoing connection on this busy machine can take it in between (free_port can)."""
    return free_range(1, host)


@dataclass(frozen=True)
class Backend:
    """One cacheport host as HAProxy sees it: its listener and (optionally) its admin port."""

    host: str
    port: int
    admin_port: int | None = None


def haproxy_config(port: int | str, backends: Sequence[Backend], send: str = "send-proxy-v2",
                   check_interval_ms: int = 200) -> str:
    """``port`` may be a range ("7000-7012"): a server given port 0 is then dialled on
    the port the client connected to, as an NLB listener per port would."""
    servers = []
    for index, b in enumerate(backends):
        # fall 2 rise 2, as an NLB's thresholds (at their 200 ms-scaled minimum)
        check = (f" check port {b.admin_port} inter {check_interval_ms}ms fall 2 rise 2"
                 if b.admin_port is not None else "")
        where = b.host if b.port == 0 else f"{b.host}:{b.port}"
        servers.append(f"    server c{index} {where} {send}{check}")
    checks = ("    option httpchk GET /readyz\n    http-check expect status 200\n"
              if any(b.admin_port is not None for b in backends) else "")
    return (
        "global\n    maxconn 512\n"
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n"
        # Like an NLB: a connection the chosen target refuses is not retried elsewhere.
        "    timeout server 30s\n    retries 0\n"
        f"frontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n"
        f"backend be\n    balance roundrobin\n{checks}" + "\n".join(servers) + "\n"
    )


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a socket listens on ``host:port`` (IPv4), asked of the kernel, not by
    connecting: a probe connection would be balanced to a server as a client."""
    wanted = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
                return True
    return False


@contextlib.contextmanager
def haproxy(tmp_path: Path, backends: Sequence[Backend], send: str = "send-proxy-v2",
            check_interval_ms: int = 200, bind: str | None = None) -> Iterator[int]:
    """Run HAProxy in the foreground; yields the port clients connect to (the first of
    ``bind``, e.g. "7000-7012", when given)."""
    binary = require_binary("haproxy")
    port = quiet_port() if bind is None else int(bind.split("-")[0])
    cfg = tmp_path / f"haproxy-{port}.cfg"
    cfg.write_text(haproxy_config(bind or port, backends, send, check_interval_ms))
    log = open(tmp_path / f"haproxy-{port}.log", "wb")  # closed below
    proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: proc.poll() is not None or listening(port), 10,
                   message="haproxy to listen")
        assert proc.poll() is None, (tmp_path / f"haproxy-{port}.log").read_text()
        yield port
    finally:
        stop_process(proc)
        log.close()


def resp_ping(port: int, source: str = "127.0.0.1", prefix: bytes = b"",
              timeout: float = 3.0) -> bytes:
    """Connect from ``source``, send ``prefix`` + PING, return what came back (b"" if closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0)) as sock:
        sock.sendall(prefix + b"*1\r\n$4\r\nPING\r\n")
        try:
            return sock.recv(64)
        except ConnectionResetError:
            return b""
