"""``python -m bench run``: start everything, run the workloads, write the report, stop everything.

Exit status: 0 when the run completed (individual failed measurements are
reported in the tables and the JSON), 2 for bad arguments or a missing
prerequisite, 130 when interrupted. Whatever happens, every process the bench
started is stopped by PID and every namespace it created is deleted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from . import clients
from .procs import BenchError, Reaper, raise_nofile
from .report import Summary, build_doc, markdown, plot, write_json
from .runner import WORKLOADS, Bench, Plan
from .targets import (
    ALL_TARGETS,
    BACKENDS,
    DEFAULT_TARGETS,
    TOP_LEVEL_KEYS,
    Options,
    Running,
    Target,
    make_targets,
    start_backends,
)
from .topology import Topology, build_netns, loopback, remove_stale

ROOT = Path(__file__).resolve().parent.parent
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """SIGTERM or SIGHUP: unwind like Ctrl-C so the clean-up runs."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_csv(value: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench run",
        description="Measure cacheport against direct, HAProxy, nginx, socat (and iptables "
                    "DNAT with --netns), the same way, in one run.",
    )
    p.add_argument("--list", action="store_true",
                   help="list the targets, whether each can run here, and exit")
    p.add_argument("--targets", type=lambda v: parse_csv(v, ALL_TARGETS, "target"), default=None,
                   help=f"comma-separated, from: {', '.join(ALL_TARGETS)} (default: "
                        f"{','.join(DEFAULT_TARGETS)} -- those installed)")
    add_common_arguments(p)
    return p


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``run`` and ``ab`` share: how much to measure, where, and how."""
    p.add_argument("--quick", action="store_true",
                   help="1 repetition and small counts (under 2 minutes)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    p.add_argument("--workloads", type=lambda v: parse_csv(v, WORKLOADS, "workload"),
                   default=WORKLOADS, help=f"comma-separated, from: {', '.join(WORKLOADS)}")
    p.add_argument("--backends", type=lambda v: parse_csv(v, BACKENDS, "backend"), default=BACKENDS,
                   help="redis,memcached (default both)")
    p.add_argument("--netns", action="store_true",
                   help="NAT topology in network namespaces, with iptables DNAT (root)")
    p.add_argument("--requests", type=int, default=None, metavar="N",
                   help="cap every workload's request count at N")
    p.add_argument("--connections", type=int, default=None, metavar="N",
                   help="idle connections to hold (default 5000; quick 1000)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                   help="directory for the .md, .json and .png (default bench/results)")
    p.add_argument("--python-client", action="store_true",
                   help="use the Python client even if a C compiler is available")
    p.add_argument("--cacheport-protocol", choices=("native", "tcp"), default="native",
                   help="listener protocol in cacheport's port map: the backend's (native, "
                        "as config/example.yaml) or plain tcp")
    p.add_argument("--cacheport-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra port-map key for every cacheport target (repeatable): "
                        f"{', '.join(TOP_LEVEL_KEYS)} at the top, any other in defaults, "
                        "e.g. buffer_size=256k")


def _plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick() if args.quick else Plan()
    if args.reps is not None:
        if args.reps < 1:
            raise BenchError("--reps must be at least 1")
        plan = replace(plan, reps=args.reps)
    if args.requests is not None:
        if args.requests < 10:
            raise BenchError("--requests must be at least 10")
        plan = plan.capped(args.requests)
    if args.connections is not None:
        if args.connections < 1:
            raise BenchError("--connections must be at least 1")
        plan = replace(plan, connections=args.connections)
    return plan


def _first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return ""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (r.stdout.strip() or r.stderr.strip()).splitlines()
    return lines[0] if lines else ""


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        uvloop_version = metadata.version("uvloop")
    except metadata.PackageNotFoundError:
        uvloop_version = ""
    return {
        "cpu_model": cpu_model or platform.processor(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "python": platform.python_version(),
        "uvloop": uvloop_version,
        "haproxy": _first_line(["haproxy", "-v"]),
        "nginx": _first_line(["nginx", "-v"]),
        "socat": next((ln for ln in subprocess.run(
            ["socat", "-V"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.splitlines() if ln.startswith("socat version")), "")
        if shutil.which("socat") else "",
        "memcached": _first_line(["memcached", "-V"]),
        "redis_server": _first_line(["redis-server", "--version"]),
        "redis_benchmark": _first_line(["redis-benchmark", "--version"]),
        "cc": _first_line(["cc", "--version"]),
        "mem_total_kb": _meminfo("MemTotal"),
    }


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def commit_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                               timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return r.stdout.strip() if r.returncode == 0 else ""

    full = git("rev-parse", "HEAD")
    return {
        "commit": full,
        "short": full[:10],
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        # The results a run writes are not part of what it measures.
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                          ":(exclude)bench/results")),
    }


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def list_targets(netns: bool) -> int:
    """What ``--targets`` accepts, and why a target would be skipped on this machine."""
    topo = loopback() if not netns else Topology("netns", "-", "-", "-", "", "")
    for name, target in make_targets().items():
        reason = target.unavailable(topo)
        default = "default" if name in DEFAULT_TARGETS else "on request"
        state = f"skipped: {reason}" if reason else "available"
        print(f"{name:<17} {default:<11} {state}\n{'':<17} {target.description}")
    return 0


def run(args: argparse.Namespace, extra_targets: dict[str, Target] | None = None,
        compare: tuple[str, str] | None = None) -> int:
    """One run; ``ab`` adds its two cacheport targets and asks for them to be compared."""
    if getattr(args, "list", False):
        return list_targets(args.netns)
    plan = _plan(args)
    if args.netns and os.geteuid() != 0:
        raise BenchError("--netns needs root (network namespaces and iptables)")
    extra = parse_settings(args.cacheport_set, "--cacheport-set")
    needed = 2 * plan.connections + 2000
    nofile = raise_nofile(max(needed * 2, 65536))
    if nofile < needed:
        raise BenchError(f"RLIMIT_NOFILE is {nofile}; {plan.connections} connections through "
                         f"a proxy need about {needed} (ulimit -n, or --connections)")
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()
    t0 = time.monotonic()
    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="cacheport-bench-"))
    reaper = Reaper(workdir)
    ok = False
    try:
        binary, why = (None, "--python-client given") if args.python_client else \
            clients.build_c_client()
        if binary is None:
            warning = (f"WARNING: using the Python client ({why}); latency figures include "
                       "tens of µs of Python per round trip and are far coarser")
            _say(warning)
            notes.append(warning)
        if args.netns:
            notes += remove_stale()
            topo: Topology = build_netns(reaper)
        else:
            topo = loopback()
        client = clients.Client(binary, topo.client_ns)
        all_targets = {**make_targets(), **(extra_targets or {})}
        wanted = args.targets or DEFAULT_TARGETS
        opts = Options(plan.connections, nofile, args.cacheport_protocol, extra)
        _say(f"==> {topo.name}: starting {', '.join(args.backends)} (logs in {workdir})")
        backends = start_backends(reaper, topo, tuple(args.backends),
                                  max_clients=plan.connections + 2000)
        running: dict[str, Running] = {}
        for name in wanted:
            target = all_targets[name]
            reason = target.unavailable(topo)
            if reason is None:
                try:
                    running[name] = target.launch(reaper, topo, backends, opts, workdir)
                    continue
                except BenchError as exc:
                    reason = str(exc)
            note = f"{name} skipped: {reason}"
            notes.append(note)
            _say(f"    {note}")
        if "direct" not in running:
            notes.append("direct was not measured: no ratios or added latency")
        _say(f"==> targets: {', '.join(running)}; workloads: {', '.join(args.workloads)}; "
             f"{plan.reps} repetition(s)")
        bench = Bench(reaper, topo, client, backends, all_targets, running, opts, plan,
                      tuple(args.workloads), workdir)
        bench.run()
        versions = {n: all_targets[n].version() for n in running}
        configs = {n: r.config for n, r in running.items()}
        machine = machine_info()
        machine["loadavg_start"] = load_start
        machine["loadavg_end"] = os.getloadavg()
        base: dict[str, Any] = {
            "schema": 1,
            "started": started.isoformat(timespec="seconds"),
            "duration_s": round(time.monotonic() - t0, 1),
            "topology": topo.name,
            "argv": list(args.argv),
            "plan": asdict(plan),
            "client": f"{client.kind} client" + ("" if binary else " (fallback)"),
            "machine": machine,
            "commit": commit_info(),
            "targets": {n: {"description": all_targets[n].description,
                            "version": versions.get(n, ""), "config": configs.get(n, "")}
                        for n in running},
            "backends": {k: {"address": f"{b.host}:{b.port}", "argv": b.argv}
                         for k, b in backends.items()},
            "notes": notes,
        }
        if compare:
            base["compare"] = list(compare)
        summary = Summary(bench.records, list(running))
        stem = f"{started.strftime('%Y%m%d-%H%M%S')}-{topo.name}"
        args.out.mkdir(parents=True, exist_ok=True)
        png = args.out / f"{stem}.png"
        why_no_plot = plot(png, bench.samples, list(running),
                           f"cacheport bench {topo.name} {started.date()}")
        if why_no_plot:
            notes.append(why_no_plot)
        doc = build_doc(base, bench.records, summary)
        text = markdown(doc, summary)
        write_json(args.out / f"{stem}.json", doc)
        (args.out / f"{stem}.md").write_text(text)
        print(text)
        _say(f"==> wrote {args.out / stem}.md, .json" + ("" if why_no_plot else ", .png"))
        ok = True
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # let the clean-up finish
        problems = reaper.close()
        for problem in problems:
            _say(f"clean-up: {problem}")
        if ok and not problems:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            _say(f"logs kept in {workdir}")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGHUP, _on_signal)


def parse_settings(items: Sequence[str], flag: str) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` items, checked for shape only: cacheport itself judges key and value."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"{flag} {item!r}: expected KEY=VALUE")
        pairs.append((key.strip(), value))
    return tuple(pairs)


def guarded(body: Callable[[], int]) -> int:
    """Run ``body`` with the bench's signal handling and exit statuses."""
    # Explicitly: a shell starts background jobs with SIGINT ignored, and Python keeps that.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        return body()
    except BenchError as exc:
        _say(f"bench: {exc}")
        return EXIT_USAGE
    except (KeyboardInterrupt, Interrupted):
        _say("bench: interrupted; everything it started has been stopped")
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = ["run", *argv]
    return guarded(lambda: run(args))
