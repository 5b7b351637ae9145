"""Many checked listeners on one host: does a listener's cost stay flat as they multiply?

``python -m bench scale [--sizes 1,100,1000] [--before REV]`` starts, per size N,
one cacheport with N listeners, health checks on at their defaults (redis PING
every 2 s): two listeners under test to a real redis-server (``relay: python``
and ``relay: native``) and N-1 more to distinct stand-in nodes (``bench.nodes``,
one port each, so N-1 nodes are really checked). Per size it reports:

- GET/s and p50/p99/max latency of the listener under test (redis-benchmark
  ``-c 1``), without and with a ``/metrics`` scrape every second, on both relays;
- idle CPU (checks only), and HAProxy's CPU with the same nodes and
  ``option redis-check inter 2s`` in the same run;
- one scrape's time, size and series (default, and ``?histograms=sum``), and
  one ``/status``'s time;
- RSS, start-up (until ``/readyz`` says ready) and one reload (one listener edited).

``--before REV`` runs an older commit's cacheport (``git archive`` into the work
dir, the native engine copied from this tree) beside this one, size by size, so
before/after ratios come from one run on one machine. Every load is bounded in
requests and time; everything is on loopback and stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .procs import cpu_seconds, host_cpu, memory
from .sidebyside import ROOT, header, save_results, start_redis, stop_all, wait_port


def _get(url: str, method: str = "GET", timeout: float = 30.0) -> tuple[int, bytes, float]:
    began = time.perf_counter()
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            body = reply.read()
            status = reply.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    return status, body, time.perf_counter() - began


def _ready(base: str) -> bool:
    try:
        return _get(base + "/readyz", timeout=5)[0] == 200
    except OSError:  # the admin endpoint binds after the listeners
        return False


def redis_get(port: int, requests: int) -> dict[str, float] | None:
    """One redis-benchmark -c 1 GET run: rps and latency (ms) as it reports them; ``None``
    (and why, on stderr) when it reported none, e.g. the listener closed the connection."""
    run = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-c", "1", "-n", str(requests), "-t", "get",
         "-q", "--csv"], capture_output=True, text=True, timeout=120, check=False)
    for line in run.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] == "GET" and len(cells) >= 8:
            return {"rps": float(cells[1]), "p50_ms": float(cells[4]),
                    "p99_ms": float(cells[6]), "max_ms": float(cells[7])}
    print(f"scale: redis-benchmark on port {port} reported nothing: "
          f"{(run.stdout + run.stderr)[-300:]!r}", file=sys.stderr)
    return None


class Scraper:
    """GET /metrics every ``period`` seconds until stopped (bounded by ``limit`` scrapes)."""

    def __init__(self, url: str, period: float = 1.0, limit: int = 600) -> None:
        self.url, self.period, self.limit = url, period, limit
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.times) < self.limit:
            self.times.append(_get(self.url)[2])
            self._stop.wait(self.period)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


_PROBE = """
import select, sys, time, urllib.request
url, limit = sys.argv[1], time.monotonic() + float(sys.argv[2])
worst = 0.0
print("probing", flush=True)
while time.monotonic() < limit and not sys.stdin.closed:
    began = time.perf_counter()
    urllib.request.urlopen(url, timeout=30).read()
    worst = max(worst, time.perf_counter() - began)
    if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.read(1):
        break
print(worst, flush=True)
"""


def loop_held(base: str, path: str, fetches: int = 3) -> tuple[float | None, float | None]:
    """(median time of one GET ``path``, slowest /healthz answer while they ran), seconds.

    /healthz is answered on the same event loop, so its slowest answer during the
    fetches is about the longest stretch the loop was held by them (what the relays and
    checks wait), plus the probe's own ~1 ms and whatever the host's other tenants take.
    The probe is a process of its own: in a thread here it would wait for this one's
    GIL while it reads a megabyte of /status.
    """
    times: list[float] = []
    probe = subprocess.Popen([sys.executable, "-c", _PROBE, base + "/healthz", "120"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert probe.stdin is not None and probe.stdout is not None
    try:
        probe.stdout.readline()  # probing
        time.sleep(0.2)
        for _ in range(fetches):
            status, _body, took = _get(base + path, timeout=60)
            if status != 200:
                return None, None  # an older build without this path
            times.append(took)
        probe.stdin.close()
        worst = float(probe.stdout.readline())
    finally:
        if probe.poll() is None:
            probe.kill()
        probe.wait(10)
    return statistics.median(times), worst


def write_config(path: Path, redis_port: int, node_ports: Sequence[int], admin: int,
                 luts: dict[str, int], edited: bool = False) -> None:
    listeners: list[dict[str, Any]] = [
        {"name": f"lut-{relay}", "listen": f"127.0.0.1:{port}",
         "upstream": f"127.0.0.1:{redis_port}", "relay": relay}
        for relay, port in luts.items()]
    listeners += [{"name": f"n{i}", "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{port}"}
                  for i, port in enumerate(node_ports)]
    if edited:  # "one listener edited": a reload's smallest real change
        listeners[-1]["idle_timeout"] = "301s"
    path.write_text(yaml.safe_dump({
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "defaults": {"protocol": "redis", "health": {}},
        "listeners": listeners,
    }))


def samples(text: bytes) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held together while chosen, so never the same)."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class PortRaced(Exception):
    """A port free_port() found was taken before cacheport bound it (checks use ephemeral
    ports by the hundred a second here)."""


def measure_cacheport(source: Path, size: int, redis_port: int, node_ports: Sequence[int],
                      work: Path, args: argparse.Namespace) -> dict[str, Any]:
    for _attempt in range(3):
        try:
            return _measure_cacheport(source, size, redis_port, node_ports, work, args)
        except PortRaced:
            print(f"scale: a port was taken before cacheport bound it; again ({size})",
                  file=sys.stderr)
    raise SystemExit("scale: three port races in a row")


def _measure_cacheport(source: Path, size: int, redis_port: int, node_ports: Sequence[int],
                       work: Path, args: argparse.Namespace) -> dict[str, Any]:
    admin, *ports = free_ports(1 + len(args.relays))
    luts = dict(zip(args.relays, ports, strict=True))
    config = work / f"cacheport-{size}.yaml"
    others = list(node_ports[:max(0, size - 1)])
    write_config(config, redis_port, others, admin, luts)
    env = dict(os.environ, PYTHONPATH=str(source))
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {}
    base = f"http://127.0.0.1:{admin}"
    try:
        began = time.monotonic()
        log = work / f"cacheport-{size}.log"
        log.write_text("")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "-c", str(config), "--log-level", "warning"],
            cwd=source, env=env, stderr=open(log, "ab")))
        try:
            for port in luts.values():
                wait_port(port, 120, procs)
        except SystemExit:
            if "already" in log.read_text():
                raise PortRaced from None
            raise
        deadline = time.monotonic() + 120
        while not _ready(base):
            if time.monotonic() > deadline or procs[0].poll() is not None:
                if "already" in log.read_text():
                    raise PortRaced
                raise SystemExit(f"cacheport never said ready (see {work})")
            time.sleep(0.05)
        out["startup_s"] = time.monotonic() - began
        time.sleep(3.0)  # every node checked at least once
        pid = procs[0].pid
        c0, t0 = cpu_seconds([pid]), time.monotonic()
        time.sleep(args.idle)
        out["idle_cpu"] = (cpu_seconds([pid]) - c0) / (time.monotonic() - t0)
        scrapes = [_get(base + "/metrics") for _ in range(3)]
        out["scrape_s"] = statistics.median(s[2] for s in scrapes)
        out["scrape_bytes"] = len(scrapes[-1][1])
        out["series"] = samples(scrapes[-1][1])
        out["scrape_hold_s"] = loop_held(base, "/metrics")[1]
        out["status_s"], out["status_hold_s"] = loop_held(base, "/status")
        out["page_s"], out["page_hold_s"] = loop_held(base, "/")
        if args.admin_only:
            return out
        summed = _get(base + "/metrics?histograms=sum")
        out["series_sum"] = samples(summed[1]) if summed[0] == 200 else None
        for relay, port in luts.items():
            quiet, scraped = [], []
            for _ in range(args.reps):
                quiet.append(redis_get(port, args.requests))
                with Scraper(base + "/metrics"):
                    scraped.append(redis_get(port, args.requests))
            for name, runs in (("quiet", quiet), ("scraped", scraped)):
                done = [r for r in runs if r is not None]
                out[f"{relay}_{name}_failed"] = len(runs) - len(done)
                for key in ("rps", "p50_ms", "p99_ms", "max_ms"):
                    out[f"{relay}_{name}_{key}"] = (statistics.median(r[key] for r in done)
                                                    if done else None)
        out["rss_mb"] = memory([pid]).rss_kb / 1024
        write_config(config, redis_port, others, admin, luts, edited=True)
        status, _body, took = _get(base + "/-/reload", "POST", timeout=120)
        out["reload_s"] = took if status == 200 else None
    finally:
        stop_all(procs)
    return out


def measure_haproxy(size: int, node_ports: Sequence[int], work: Path, idle: float) -> float | None:
    exe = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if exe is None:
        return None
    servers = "\n".join(f"  server n{i} 127.0.0.1:{p}"
                        for i, p in enumerate(node_ports[:max(1, size - 1)]))
    config = work / f"haproxy-{size}.cfg"
    config.write_text(f"""global
  maxconn 4000
defaults
  mode tcp
  timeout connect 1s
  timeout client 30s
  timeout server 30s
frontend front
  bind 127.0.0.1:{free_ports(1)[0]}
  default_backend nodes
backend nodes
  option redis-check
  default-server check inter 2s rise 2 fall 3
{servers}
""")
    proc = subprocess.Popen([exe, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(work / f"haproxy-{size}.log", "ab"))
    try:
        time.sleep(3.0)
        if proc.poll() is not None:
            log = (work / f"haproxy-{size}.log").read_text()[-500:]
            raise SystemExit(f"haproxy exited with {proc.returncode}:\n{log}")
        c0, t0 = cpu_seconds([proc.pid]), time.monotonic()
        time.sleep(idle)
        return (cpu_seconds([proc.pid]) - c0) / (time.monotonic() - t0)
    finally:
        stop_all([proc])


def export(rev: str, work: Path) -> Path:
    """An older commit's tree, as files (no worktree), with this tree's native engine."""
    target = work / f"src-{rev}"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    for so in (ROOT / "proxy" / "relay").glob("_engine*.so"):
        shutil.copy2(so, target / "proxy" / "relay" / so.name)
    return target


COLUMNS = [
    ("python_quiet_rps", "GET/s py", "{:,.0f}"), ("python_quiet_max_ms", "max ms py", "{:.2f}"),
    ("python_scraped_rps", "GET/s py +scrape", "{:,.0f}"),
    ("python_scraped_max_ms", "max ms py +scrape", "{:.2f}"),
    ("native_quiet_rps", "GET/s native", "{:,.0f}"),
    ("native_quiet_max_ms", "max ms native", "{:.2f}"),
    ("native_scraped_rps", "GET/s native +scrape", "{:,.0f}"),
    ("native_scraped_max_ms", "max ms native +scrape", "{:.2f}"),
    ("python_quiet_p99_ms", "p99 ms py", "{:.3f}"),
    ("idle_cpu", "idle CPU", "{:.1%}"), ("haproxy_cpu", "HAProxy CPU", "{:.1%}"),
    ("scrape_s", "scrape s", "{:.3f}"), ("scrape_bytes", "scrape KB", "{}"),
    ("series", "series", "{:,}"), ("scrape_hold_s", "loop held by scrape s", "{:.3f}"),
    ("series_sum", "series (histograms=sum)", "{:,}"),
    ("status_s", "/status s", "{:.3f}"), ("status_hold_s", "loop held by /status s", "{:.3f}"),
    ("page_s", "page / s", "{:.3f}"), ("page_hold_s", "loop held by / s", "{:.3f}"),
    ("rss_mb", "RSS MB", "{:.0f}"),
    ("startup_s", "start s", "{:.2f}"),
    ("reload_s", "reload s", "{:.3f}"),
]


def table(rows: list[tuple[str, int, dict[str, Any]]]) -> str:
    lines = ["| build | listeners | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(COLUMNS)]
    for build, size, figures in rows:
        cells = []
        for key, _title, fmt in COLUMNS:
            value = figures.get(key)
            if value is None:
                cells.append("-")
            elif key == "scrape_bytes":
                cells.append(f"{value / 1024:,.0f}")
            else:
                cells.append(fmt.format(value))
        lines.append(f"| {build} | {size:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,100,1000",
                        help="listener counts, comma-separated (default 1,100,1000; "
                             "3000 is heavy on a shared machine)")
    parser.add_argument("--reps", type=int, default=3, help="redis-benchmark runs per cell")
    parser.add_argument("--requests", type=int, default=20000, help="GETs per run")
    parser.add_argument("--idle", type=float, default=6.0, help="seconds of idle CPU sampling")
    parser.add_argument("--relays", default="python,native")
    parser.add_argument("--before", metavar="REV", help="also run this commit's cacheport")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--admin-only", action="store_true",
                        help="only start-up, scrape, /status and the page (/), with how long "
                             "each held the event loop; no GET/s, idle CPU, HAProxy or reload")
    args = parser.parse_args(argv)
    args.relays = args.relays.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    if shutil.which("redis-benchmark") is None or shutil.which("redis-server") is None:
        print("scale: needs redis-server and redis-benchmark (Debian: redis-server)",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cacheport-scale-"))
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[tuple[str, int, dict[str, Any]]] = []
    busy0 = host_cpu()
    try:
        redis_port = start_redis(procs)
        portfile = work / "nodes.json"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bench.nodes", str(max(sizes)), str(portfile),
             "--max-seconds", "3600"], cwd=ROOT))
        deadline = time.monotonic() + 60
        while not portfile.exists() or not portfile.read_text():
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                raise SystemExit("bench.nodes did not start")
            time.sleep(0.1)
        node_ports = json.loads(portfile.read_text())
        builds = [("this", ROOT)]
        if args.before:
            builds.insert(0, (args.before, export(args.before, work)))
        for size in sizes:
            haproxy = None if args.admin_only else measure_haproxy(size, node_ports, work,
                                                                   args.idle)
            for name, source in builds:
                figures = measure_cacheport(source, size, redis_port, node_ports, work, args)
                figures["haproxy_cpu"] = haproxy
                rows.append((name, size, figures))
                print(f"scale: {name} {size}: {json.dumps(figures)}", file=sys.stderr,
                      flush=True)
    except KeyboardInterrupt:
        return 130
    finally:
        stop_all(procs)
    busy1 = host_cpu()
    load = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    what = (f"scale: listener under test + N-1 checked listeners, checks at defaults; "
            f"host busy {load:.0%} on average during the run (other tenants included)")
    text = header(what, args.reps) + "\n\n" + table(rows)
    print(text)
    if not args.no_save:
        save_results("scale", text, [{"build": b, "listeners": n, **f} for b, n, f in rows])
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise SystemExit(main())
