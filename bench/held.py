"""Connections held: does the cost of one connection stay flat up to the open-files limit?

``python -m bench held [--workers 1,2] [--steps 1000,5000,limit]`` starts cacheport
(one process, then ``workers: 2``) with two redis listeners, each to its own
redis-server (``--maxclients`` high, so neither node is the limit), and fills it with
idle client connections in steps, spread over several C ``hold`` clients (each client
process has the same open-files cap) and over both listeners. ``limit`` is as many
connections as the process(es) can take: (RLIMIT_NOFILE - descriptors in use at start)
/ 2 per process, less ~1 % for ``workers: 2`` (the kernel's SO_REUSEPORT hash does not
split exactly evenly). At each step it reports:

- RSS and PSS of the cacheport process tree per held connection (over the empty
  process), and CPU while the held connections sit idle;
- accept rate: new connections per second while a step's clients open theirs (each
  connection answers one PING through cacheport before it counts);
- ``--active`` connections (default 300) in a closed PING loop for ``--seconds``, with
  one more connection timing each request: p50/p99 through cacheport and direct to
  redis, measured alternately ``--reps`` times (medians), and cacheport's CPU per request.

After the last step it opens ``--over`` more connections: at the limit each must be
closed at once (EOF or reset, not left hanging) and counted under
``cacheport_connections_refused_total{reason="fd_limit"}``, while the held ones stay.
Everything is on loopback, bounded in time, and stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .clients import Client, Held, build_c_client
from .procs import BenchError, Reaper, cpu_seconds, host_cpu, memory, raise_nofile, wait_port
from .sidebyside import ROOT, free_port, header, save_results

PER_CLIENT = 4000  # connections per hold client process (each has its own fd cap)
HOLD_SECONDS = 3600.0


def _metrics(admin: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as reply:
        text: str = reply.read().decode()
    return text


def _refused_fd_limit(admin: int) -> int:
    found = re.findall(r'cacheport_connections_refused_total\{[^}]*reason="fd_limit"[^}]*\} (\d+)',
                       _metrics(admin))
    return sum(int(n) for n in found)


def _fds(pids: Sequence[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


class Rig:
    """Two redis-servers, one cacheport in front of them, the bench client."""

    def __init__(self, reaper: Reaper, client: Client, work: Path, nofile: int) -> None:
        self.reaper = reaper
        self.client = client
        self.work = work
        self.nofile = nofile
        self.redis = [self._redis(i) for i in range(2)]

    def _redis(self, i: int) -> int:
        port = free_port()
        proc = self.reaper.spawn(f"redis-{i}", [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--maxclients", str(self.nofile - 100)])
        wait_port("127.0.0.1", port, proc, 30)
        return port

    def cacheport(self, workers: int) -> tuple[Any, list[int], int]:
        ports, admin = [free_port(), free_port()], free_port()
        config = self.work / f"held-{workers}.yaml"
        listeners = "".join(
            f"  - {{name: r{i}, listen: '127.0.0.1:{port}', upstream: '127.0.0.1:{up}', "
            f"protocol: redis}}\n" for i, (port, up) in enumerate(zip(ports, self.redis,
                                                                       strict=True)))
        config.write_text(f"workers: {workers}\nadmin: {{listen: '127.0.0.1:{admin}'}}\n"
                          f"listeners:\n{listeners}")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = self.reaper.spawn(f"cacheport-{workers}", [
            sys.executable, "-m", "proxy", "run", "-c", str(config), "--log-level", "warning"],
            env=env, cwd=ROOT)
        for port in ports:
            wait_port("127.0.0.1", port, proc, 60)
        time.sleep(1.0)  # workers: every worker has bound and started its checks
        return proc, ports, admin


def _open(rig: Rig, ports: Sequence[int], count: int, first: int) -> tuple[list[Held], float]:
    """``count`` new held connections over both listeners, in parallel clients; wall time."""
    shares: list[tuple[int, int]] = []
    left, i = count, first
    while left > 0:
        take = min(PER_CLIENT, left)
        shares.append((ports[i % len(ports)], take))
        left -= take
        i += 1
    started = time.monotonic()
    held: list[Held | None] = [None] * len(shares)
    errors: list[BaseException] = []

    def one(k: int, port: int, n: int) -> None:
        try:
            held[k] = rig.client.hold(rig.reaper, "127.0.0.1", port, "redis", n, HOLD_SECONDS)
        except BaseException as exc:  # reported below, after every thread is done
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(k, p, n)) for k, (p, n) in enumerate(shares)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    done = [h for h in held if h is not None]
    if errors:
        for h in done:
            h.release()
        raise BenchError(f"opening held connections: {errors[0]}")
    return done, elapsed


def _active(rig: Rig, port: int, active: int, seconds: float,
            roots: Sequence[int]) -> dict[str, float]:
    """``active`` connections in a closed PING loop, one more timing every request."""
    result: dict[str, Any] = {}

    def load() -> None:
        result["pipe"] = rig.client.pipelined("127.0.0.1", port, "redis", "get", 3, active, 1,
                                              10_000_000, seconds)

    cpu0 = cpu_seconds(roots) if roots else 0.0
    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(0.2)
    run, samples = rig.client.latency("127.0.0.1", port, "redis", "get", 3, 10_000_000,
                                      seconds - 0.4, 200, rig.work / "lat.u32")
    thread.join()
    cpu = (cpu_seconds(roots) - cpu0) if roots else 0.0
    pipe = result["pipe"]
    ordered = sorted(samples)
    requests = pipe.requests + run.requests
    return {"p50_us": ordered[len(ordered) // 2] / 1e3,
            "p99_us": ordered[int(len(ordered) * 0.99)] / 1e3,
            "rps": pipe.requests / pipe.elapsed_s,
            "cpu_us_per_req": cpu / requests * 1e6 if requests else 0.0}


def _over_limit(ports: Sequence[int], admin: int, over: int) -> dict[str, Any]:
    """More clients until ``over`` of them were refused: each must be served (room left)
    or closed at once and counted, never left hanging in the backlog."""
    before = _refused_fd_limit(admin)
    closed = served = hung = 0
    socks: list[socket.socket] = []
    cap = over + 3000
    while closed + hung < over and len(socks) < cap:
        sock = socket.create_connection(("127.0.0.1", ports[len(socks) % len(ports)]),
                                        timeout=5)
        socks.append(sock)
        try:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(16)
        except (ConnectionResetError, BrokenPipeError):
            reply = b""
        except TimeoutError:
            hung += 1
            continue
        if reply.startswith(b"+PONG"):
            served += 1
        else:
            closed += 1
    for sock in socks:
        sock.close()
    # The count is read once the held connections are gone: at the limit the admin
    # endpoint (under workers, a full worker's, which the supervisor asks) cannot accept
    # a scrape either.
    return {"over_tried": len(socks), "over_closed": closed, "over_served": served,
            "over_hung": hung, "refused_before": before}


def measure(rig: Rig, workers: int, steps: Sequence[str], args: argparse.Namespace
            ) -> list[dict[str, Any]]:
    proc, ports, admin = rig.cacheport(workers)
    held: list[Held] = []
    rows: list[dict[str, Any]] = []
    try:
        proc.remember_tree()
        pids = sorted(proc.seen) or [proc.pid]
        base_fds = max(_fds([pid]) for pid in pids)
        per_process = (rig.nofile - base_fds - 20) // 2
        limit = per_process if workers == 1 else int(per_process * workers * 0.99)
        base = memory([proc.pid])
        count = 0
        for step in steps:
            total = limit if step == "limit" else int(step)
            target = total - args.active - 1  # the active ones need room too
            if target <= count:
                continue
            first = count
            new, elapsed = _open(rig, ports, target - count, len(held))
            held += new
            count = target
            time.sleep(1.0)
            mem = memory([proc.pid])
            idle0 = cpu_seconds([proc.pid])
            time.sleep(args.idle)
            idle = (cpu_seconds([proc.pid]) - idle0) / args.idle
            via: list[dict[str, float]] = []
            direct: list[dict[str, float]] = []
            for _ in range(args.reps):
                via.append(_active(rig, ports[0], args.active, args.seconds, [proc.pid]))
                direct.append(_active(rig, rig.redis[0], args.active, args.seconds, []))

            def med(runs: list[dict[str, float]], key: str) -> float:
                return statistics.median(r[key] for r in runs)

            row: dict[str, Any] = {
                "workers": workers, "step": step, "connections": count + args.active + 1,
                "held": count, "limit": limit,
                "rss_kb": mem.rss_kb, "pss_kb": mem.pss_kb,
                "rss_per_conn_kb": (mem.rss_kb - base.rss_kb) / count,
                "pss_per_conn_kb": (mem.pss_kb - base.pss_kb) / count,
                "accept_per_s": (target - first) / elapsed,
                "idle_cpu": idle,
                "p50_us": med(via, "p50_us"), "p99_us": med(via, "p99_us"),
                "direct_p50_us": med(direct, "p50_us"), "direct_p99_us": med(direct, "p99_us"),
                "rps": med(via, "rps"), "direct_rps": med(direct, "rps"),
                "cpu_us_per_req": med(via, "cpu_us_per_req"),
            }
            prev = rows[-1] if rows and rows[-1]["workers"] == workers else None
            if prev is not None:  # the curve: what the connections of this step added
                added = count - prev["held"]
                row["rss_marginal_kb"] = (mem.rss_kb - prev["rss_kb"]) / added
                row["pss_marginal_kb"] = (mem.pss_kb - prev["pss_kb"]) / added
            row["added_p50_us"] = row["p50_us"] - row["direct_p50_us"]
            row["added_p99_us"] = row["p99_us"] - row["direct_p99_us"]
            rows.append(row)
            print(f"held: {json.dumps(row)}", file=sys.stderr, flush=True)
        if args.over and rows:
            rows[-1].update(_over_limit(ports, admin, args.over))
            alive = _active(rig, ports[0], 10, 1.0, [proc.pid])  # the held ones go on
            rows[-1]["after_over_rps"] = alive["rps"]
            print(f"held: over the limit: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    finally:
        for h in held:
            h.release()
        if rows and "refused_before" in rows[-1]:
            # Every worker answers the supervisor again once it has closed its connections.
            deadline = time.monotonic() + 15
            while True:
                refused = _refused_fd_limit(admin) - rows[-1]["refused_before"]
                if refused >= rows[-1]["over_closed"] or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            rows[-1]["refused_fd_limit"] = refused
        rig.reaper.stop(proc)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| workers | connections | RSS/conn kB (this step's) | PSS/conn kB (this step's) "
             "| accepts/s | idle CPU | p50 us (direct) | p99 us (direct) | +p50 us | +p99 us "
             "| CPU us/req |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def step(r: dict[str, Any], key: str) -> str:
        return f" ({r[key]:.2f})" if key in r else ""

    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['connections']:,} "
            f"| {r['rss_per_conn_kb']:.2f}{step(r, 'rss_marginal_kb')} "
            f"| {r['pss_per_conn_kb']:.2f}{step(r, 'pss_marginal_kb')} "
            f"| {r['accept_per_s']:,.0f} | {r['idle_cpu']:.1%} "
            f"| {r['p50_us']:.0f} ({r['direct_p50_us']:.0f}) "
            f"| {r['p99_us']:.0f} ({r['direct_p99_us']:.0f}) "
            f"| {r['added_p50_us']:+.0f} | {r['added_p99_us']:+.0f} "
            f"| {r['cpu_us_per_req']:.1f} |")
    over = [r for r in rows if "over_tried" in r]
    for r in over:
        lines.append("")
        lines.append(
            f"workers {r['workers']} at the limit ({r['connections']:,}): {r['over_tried']} "
            f"more clients: {r['over_served']} served (the room the active ones left), "
            f"then {r['over_closed']} closed at once, "
            f"{r['over_hung']} left hanging; fd_limit refusals counted "
            f"{r['refused_fd_limit']}; held connections still answered "
            f"({r['after_over_rps']:,.0f} PING/s on 10 of them).")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench held", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="cacheport process counts (1,2)")
    parser.add_argument("--steps", default="1000,5000,limit",
                        help="connection counts, comma-separated; 'limit' = as many as fit")
    parser.add_argument("--active", type=int, default=300, help="connections in a PING loop")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one active run")
    parser.add_argument("--reps", type=int, default=3, help="active runs per step and target")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU sampling")
    parser.add_argument("--over", type=int, default=100,
                        help="clients refused past the limit before the probe stops")
    parser.add_argument("--nofile", type=int, default=20000, help="RLIMIT_NOFILE to run at")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    nofile = raise_nofile(args.nofile)
    binary, why = build_c_client()
    if binary is None:
        print(f"held: needs the C bench client ({why})", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cacheport-held-"))
    reaper = Reaper(work)
    rows: list[dict[str, Any]] = []
    busy0 = host_cpu()
    try:
        rig = Rig(reaper, Client(binary), work, nofile)
        for workers in (int(w) for w in args.workers.split(",")):
            rows += measure(rig, workers, args.steps.split(","), args)
    except KeyboardInterrupt:
        return 130
    except BenchError as exc:
        print(f"held: {exc}", file=sys.stderr)
        return 1
    finally:
        for problem in reaper.close():
            print(f"held: {problem}", file=sys.stderr)
    busy1 = host_cpu()
    load = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    what = (f"held: idle connections through cacheport (2 redis listeners), {args.active} "
            f"active in a PING loop, RLIMIT_NOFILE {nofile}; host busy {load:.0%} on average "
            f"(other tenants included)")
    text = header(what, args.reps) + "\n\n" + table(rows)
    print(text)
    if not args.no_save:
        save_results("held", text, rows)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise SystemExit(main())
