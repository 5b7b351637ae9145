"""How long one admin request holds cacheport's event loop, at N listeners.

``python -m bench admin-hold [--sizes 1000,3000] [--paths /status,/,/metrics]
[--before REV]`` runs, per size and build, one cacheport ``Server`` in a child process
with N listeners (checks off, so nothing else competes for the loop) and, on the same
loop, a beat task that sleeps 1 ms at a time. While the child GETs each path from its
own admin endpoint, the longest stretch of the loop thread's CPU time between two beats
is how long the request held the loop in one piece. CPU time, not wall time: on a
shared machine a descheduled process would otherwise count as a held loop. Wall-clock
figures under load with checks on are ``python -m bench scale --admin-only``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .scale import export
from .sidebyside import ROOT, header, save_results

CHILD = r"""
import asyncio, gc, json, sys, time
import uvloop
import yaml
from proxy.config import load_yaml, parse_config
from proxy.server import Server

size, paths, reps = int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])

async def main():
    doc = {"defaults": {"health": False}, "admin": {"listen": "127.0.0.1:0"}, "listeners": [
        {"name": f"n{i}", "listen": "127.0.0.1:0", "upstream": f"192.0.2.{i % 250 + 1}:6379",
         "protocol": "redis"} for i in range(size)]}
    server = Server(parse_config(load_yaml(yaml.safe_dump(doc)), "<bench>"))
    await server.start()
    gc.freeze()  # as cacheport run does after start (runtime.settle_heap)
    port = server.admin.bound.port
    gaps, stop = [], False

    async def beat():
        last = time.thread_time()
        while not stop:
            await asyncio.sleep(0.001)
            now = time.thread_time()
            gaps.append(now - last)
            last = now

    async def get(path):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        began = time.perf_counter()
        data = await reader.read()
        writer.close()
        return time.perf_counter() - began, len(data), data.split(b" ", 2)[1]

    task = asyncio.create_task(beat())
    out = {}
    for path in paths:
        held, took = [], []
        for _ in range(reps):
            await asyncio.sleep(0.05)
            gaps.clear()
            t, size_, status = await get(path)
            took.append(t)
            held.append(max(gaps, default=0.0))
        out[path] = {"status": int(status), "bytes": size_, "took": took, "held": held}
    stop = True
    await task
    await server.stop()
    print(json.dumps(out))

uvloop.run(main())
"""


def measure(source: Path, size: int, paths: list[str], reps: int) -> dict[str, dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=str(source))
    done = subprocess.run([sys.executable, "-c", CHILD, str(size), ",".join(paths), str(reps)],
                          capture_output=True, text=True, env=env, cwd=source, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"admin-hold: the child failed:\n{done.stderr[-2000:]}")
    result: dict[str, dict[str, Any]] = json.loads(done.stdout.splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench admin-hold", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,3000")
    parser.add_argument("--paths", default="/status,/,/metrics")
    parser.add_argument("--reps", type=int, default=5, help="requests per path (median)")
    parser.add_argument("--before", metavar="REV", help="also measure this commit's tree")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    paths = args.paths.split(",")
    work = Path(tempfile.mkdtemp(prefix="cacheport-admin-hold-"))
    builds = [("this", ROOT)]
    if args.before:
        builds.insert(0, (args.before, export(args.before, work)))
    lines = [header("admin-hold: loop thread CPU between 1 ms beats while one request is "
                    "answered, checks off", args.reps), "",
             "| build | listeners | path | answer | held the loop ms (median, max) | took ms |",
             "|---|---:|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            for name, source in builds:
                for path, fig in measure(source, size, paths, args.reps).items():
                    held = [h * 1000 for h in fig["held"]]
                    took = [t * 1000 for t in fig["took"]]
                    answer = f"{fig['status']}, {int(fig['bytes']) / 1024:,.0f} KB"
                    lines.append(f"| {name} | {size:,} | `{path}` | {answer} | "
                                 f"{statistics.median(held):.1f}, {max(held):.1f} | "
                                 f"{statistics.median(took):.0f} |")
                    print(lines[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_save:
        save_results("admin-hold", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
