"""The admin endpoint's own HTTP/1.1 beside aiohttp's server, for the same routes.

``python -m bench admin-http [--requests 2000] [--reps 3]`` starts, alternately, one
process serving ``GET /healthz`` with cacheport's ``AdminServer`` and one with aiohttp's
``web`` server (both on uvloop; aiohttp is not a cacheport dependency: install it, or
point ``--aiohttp-path`` at a ``pip install --target`` folder). For each it reports:

- requests/s and p99 of ``/healthz`` on a new connection each, as probes ask it;
- how long a request whose head never ends keeps its connection (capped at ``--cap``);
- what a ``POST`` announcing a 1 GiB body gets, and how much of the body the server
  took before the connection ended (sent in 64 KiB writes, capped at 64 MiB);
- the server process's RSS (both load cacheport's admin package first, as cacheport
  would), and the import time the server adds on top of it.

Everything is on loopback and every load is bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .sidebyside import ROOT

OWN = """
import asyncio, sys, time
import uvloop
import proxy.admin
began = time.perf_counter()
from proxy.admin import AdminServer
from proxy.config import Address, AdminConfig
imported = time.perf_counter() - began  # nothing more: it is part of cacheport
async def main():
    admin = AdminServer(AdminConfig(listen=Address("127.0.0.1", 0)), lambda: [], lambda: None)
    admin.bind(); await admin.start()
    print(admin.bound.port, imported, flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""

AIOHTTP = """
import asyncio, sys, time
import uvloop
import proxy.admin  # what cacheport has loaded anyway: RSS and import time are aiohttp's extra
began = time.perf_counter()
from aiohttp import web
imported = time.perf_counter() - began
async def healthz(request):
    return web.Response(text="ok\\n")
async def reload(request):
    await request.read()
    return web.Response(text="reloaded\\n")
async def main():
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/-/reload", reload)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], imported, flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def healthz(port: int, requests: int) -> tuple[float, float]:
    """(requests/s, p99 ms) of GET /healthz, one connection per request."""
    took: list[float] = []
    began = time.perf_counter()
    for _ in range(requests):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while sock.recv(65536):
                pass
        took.append(time.perf_counter() - t0)
    took.sort()
    return requests / (time.perf_counter() - began), took[int(len(took) * 0.99)] * 1000


def unfinished_head(port: int, cap: float) -> float:
    """Seconds until the server closes a connection whose head never ends (cap: still open)."""
    with socket.create_connection(("127.0.0.1", port), timeout=cap) as sock:
        began = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            return cap
        except ConnectionResetError:
            pass
        return time.monotonic() - began


def huge_body(port: int) -> tuple[str, int]:
    """(status line, body bytes the server took before the connection ended)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n")
        sock.setblocking(False)
        sent, chunk, reply, deadline = 0, b"\0" * 65536, b"", time.monotonic() + 20
        while sent < 64 << 20 and time.monotonic() < deadline:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                break
            try:
                reply += sock.recv(4096)
            except BlockingIOError:
                pass
            except OSError:
                break
    return reply.split(b"\r\n", 1)[0].decode(errors="replace") or "(none)", sent


def start(kind: str, aiohttp_path: str | None) -> tuple[subprocess.Popen[str], int, float]:
    env = dict(os.environ)
    paths = [str(ROOT)] + ([aiohttp_path] if aiohttp_path and kind == "aiohttp" else [])
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-c", OWN if kind == "own" else AIOHTTP],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line:
        proc.wait(10)
        proc.stdout.close()
        raise SystemExit(f"admin-http: the {kind} server did not start")
    return proc, int(line[0]), float(line[1])


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench admin-http", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cap", type=float, default=20.0)
    parser.add_argument("--aiohttp-path", help="a folder holding aiohttp (pip install --target)")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, list[float]]] = {"own": {}, "aiohttp": {}}
    extras: dict[str, tuple[str, int, float]] = {}
    kinds = ["own", "aiohttp"]
    try:
        stop(start("aiohttp", args.aiohttp_path)[0])
    except SystemExit:
        print("admin-http: aiohttp is not importable here (pip install aiohttp, or "
              "--aiohttp-path DIR); measuring the own server alone", file=sys.stderr)
        kinds = ["own"]
        del results["aiohttp"]
    for _rep in range(args.reps):
        for kind in kinds:
            proc, port, imported = start(kind, args.aiohttp_path)
            try:
                healthz(port, 50)  # warm
                rps, p99 = healthz(port, args.requests)
                fig = results[kind]
                fig.setdefault("rps", []).append(rps)
                fig.setdefault("p99", []).append(p99)
                fig.setdefault("import", []).append(imported * 1000)
                fig.setdefault("rss", []).append(rss_kb(proc.pid) / 1024)
                if kind not in extras:
                    status, taken = huge_body(port)
                    extras[kind] = (status, taken, unfinished_head(port, args.cap))
            finally:
                stop(proc)
    print("| server | /healthz req/s | p99 ms | head never ended: closed after "
          "| 1 GiB POST: answer,"
          " body taken | RSS MB | import ms added |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for kind, fig in results.items():
        status, taken, held = extras[kind]
        closed = f"{held:.1f} s" if held < args.cap else f"open at {args.cap:.0f} s"
        print(f"| {kind} | {statistics.median(fig['rps']):,.0f} | "
              f"{statistics.median(fig['p99']):.2f} | {closed} | {status}, "
              f"{taken / 1048576:.1f} MiB | {statistics.median(fig['rss']):.0f} | "
              f"{statistics.median(fig['import']):.0f} |")
    print(f"\nmedians of {args.reps} alternating runs, {args.requests} requests each")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
