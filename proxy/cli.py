"""Command line: parse arguments, load the port map, call into the package.

Exit status: 0 on success and on a clean stop by signal, 2 for a port map or
start-up problem (bad YAML, a port already taken), 1 for anything unforeseen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__, aws, iptables, logs, runtime, supervisor
from .admin import AdminError, fetch_status, format_status, probe_address, probe_health
from .config import (
    DEFAULT_ADMIN_PORT,
    LOG_FORMATS,
    Address,
    Config,
    ConfigError,
    load_config,
    parse_address,
    parse_workers,
)

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_CONFIG = 2

log = logging.getLogger("cacheport")


def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop whenever it imports (``auto``), unless ``asyncio`` is asked for."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise SystemExit("cacheport: --loop uvloop: uvloop is not installed") from None
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


def _admin_address(text: str) -> Address:
    try:
        return parse_address(text, default_host="127.0.0.1", default_port=None)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text: str) -> int:
    try:
        return parse_workers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None



def _print_table(config: Config) -> None:
    rows = [("NAME", "LISTEN", "UPSTREAM", "PROTOCOL")]
    rows += [(lc.name, str(lc.listen), str(lc.upstream), lc.protocol) for lc in config.listeners]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"cacheport: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if config.listeners:
        _print_table(config)
    for cc in config.clusters:
        seed_port = "".join(f", {key} {port}" for key, port in (
            ("seed_port", cc.seed_port), ("primary_port", cc.primary_port),
            ("reader_port", cc.reader_port)) if port is not None)
        print(f"cluster {cc.name}: {cc.engine}, seed {cc.seed}, announce {cc.announce}, "
              f"ports {cc.ports[0]}-{cc.ports[1]}{seed_port}")
    clusters = f", {len(config.clusters)} cluster(s)" if config.clusters else ""
    print(f"{args.file}: OK, {len(config.listeners)} listener(s){clusters}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    """The port map's JSON Schema (or, with --markdown, its reference), from the model."""
    from .config import reference

    sys.stdout.write(reference.markdown() if args.markdown else reference.schema_text())
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    try:
        if args.config is None:
            address = parse_address(args.admin or f"127.0.0.1:{DEFAULT_ADMIN_PORT}",
                                    default_host="127.0.0.1", default_port=DEFAULT_ADMIN_PORT)
        else:
            config = load_config(args.config)
            if config.admin is None:
                print(f"cacheport: {args.config}: the admin endpoint is off (admin: off), so "
                      f"there is no status to read", file=sys.stderr)
                return EXIT_CONFIG
            address = config.admin.listen
    except ValueError as exc:
        print(f"cacheport: --admin: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        print(f"cacheport: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        doc = fetch_status(address, timeout=args.timeout)
    except AdminError as exc:
        print(f"cacheport: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(doc, indent=2) if args.json else format_status(doc))
    return EXIT_OK


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """For a container HEALTHCHECK or a Kubernetes exec probe: 0 healthy, 1 not (Docker
    reserves 2). Asks the admin endpoint wherever the map puts it; with ``admin: off``
    there is nothing to ask, and probing the listeners would count as clients (and dial
    upstreams), so it reports healthy while the process runs and says so."""
    if args.admin is not None:
        address = args.admin
    else:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"cacheport: unhealthy: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        if config.admin is None:
            print(f"{args.config}: admin: off, so there is no endpoint to ask; healthy while "
                  "the process runs (turn the admin endpoint on for a real check)")
            return EXIT_OK
        address = probe_address(config.admin.listen)
    healthy, seen = probe_health(address, "/readyz" if args.ready else "/healthz",
                                 timeout=args.timeout)
    print(f"{'healthy' if healthy else 'unhealthy'}: {seen}",
          file=sys.stdout if healthy else sys.stderr)
    return EXIT_OK if healthy else EXIT_UNREACHABLE


def cmd_run(args: argparse.Namespace) -> int:
    # The flag's format (text by default) until the map is read; then the map's, unless
    # the flag was given.
    logs.setup(args.log_level, args.log_format or "text")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    log_format = args.log_format or config.log_format
    if log_format != (args.log_format or "text"):
        logs.setup(args.log_level, log_format)
    options = runtime.RunOptions(config_path=args.config, pid_file=args.pid_file,
                                 watch=args.watch, reuse_port=args.reuse_port)
    workers = config.workers if args.workers is None else args.workers
    with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
        if workers > 1 and not args.reuse_port:
            log.info("cacheport %s supervising %d workers", __version__, workers)
            worker_args = ["--loop", args.loop, "--log-level", args.log_level,
                           "--log-format", log_format]
            return runner.run(supervisor.supervise(options, worker_args, workers))
        log.info("cacheport %s on %s", __version__, type(runner.get_loop()).__module__)
        return runner.run(runtime.serve(config, options))


def cmd_reload(args: argparse.Namespace) -> int:
    """Validate the file here first, so a bad file is reported by this command; then ask
    the running cacheport through its admin endpoint (which answers with the outcome) or,
    with --pid-file, by SIGHUP."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"cacheport: {exc}; nothing was reloaded", file=sys.stderr)
        return EXIT_CONFIG
    if args.pid_file is not None:
        try:
            pid = int(Path(args.pid_file).read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            print(f"cacheport: cannot signal the process in {args.pid_file}: {reason}",
                  file=sys.stderr)
            return 1
        print(f"{args.config}: valid; reload signalled to cacheport (pid {pid})")
        return EXIT_OK
    address = args.admin or (config.admin.listen if config.admin is not None else None)
    if address is None:
        print("cacheport: the map says admin: off; use --pid-file", file=sys.stderr)
        return EXIT_CONFIG
    token = config.admin.token if config.admin is not None else None
    headers = {"Authorization": f"Bearer {token.reveal()}"} if token is not None else {}
    request = urllib.request.Request(f"http://{address}/-/reload", method="POST", data=b"",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as reply:
            print(reply.read().decode(errors="replace").strip())
            return EXIT_OK
    except urllib.error.HTTPError as exc:
        print(f"cacheport: {exc.read().decode(errors='replace').strip()}", file=sys.stderr)
        return EXIT_CONFIG
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"cacheport: cannot reach the admin endpoint at {address}: {reason} "
              "(is cacheport running? or use --pid-file)", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cacheport",
        description="Forward one port per ElastiCache node from a NAT host, per a YAML port map.",
    )
    parser.add_argument("--version", action="version", version=f"cacheport {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve the port map until SIGINT/SIGTERM")
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML port map")
    run.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                     help="event loop (default: uvloop when installed)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                     default="info", help="the least severe level logged (default: info)")
    run.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                     help="text (the default) or json: one object per line; wins over the "
                     "map's logging.log_format")
    run.add_argument("--pid-file", metavar="PATH", help="write the process id here "
                     "(for `cacheport reload`)")
    run.add_argument("--watch", action="store_true",
                     help="reload when the port map file changes")
    run.add_argument("--workers", type=_workers, metavar="N|auto",
                     help="worker processes sharing every port (default: the map's "
                     "'workers', else 1)")
    run.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    reload = sub.add_parser("reload", help="validate a port map, then make the running "
                            "cacheport re-read it (SIGHUP)")
    reload.add_argument("-c", "--config", required=True, metavar="FILE",
                        help="the port map the running cacheport was started with: validated "
                        "here first, then re-read by it")
    reload.add_argument("--pid-file", metavar="PATH",
                        help="signal the process in this pid file instead of asking the "
                        "admin endpoint")
    reload.add_argument("--admin", type=_admin_address, metavar="HOST:PORT",
                        help="admin endpoint (default: the map's admin.listen)")
    reload.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for the admin endpoint's answer (default: 30)")
    reload.set_defaults(func=cmd_reload)

    check = sub.add_parser("check", help="validate a port map and print it as a table")
    check.add_argument("file", metavar="FILE", help="YAML port map")
    check.set_defaults(func=cmd_check)
    schema = sub.add_parser("schema", help="print the port map's JSON Schema (for editors "
                            "with the YAML language server)")
    schema.add_argument("--markdown", action="store_true",
                        help="print the configuration reference (docs/configuration.md) instead")
    schema.set_defaults(func=cmd_schema)
    iptables.register(sub)
    aws.register(sub)

    status = sub.add_parser("status", help="show a running cacheport's listeners, upstreams "
                            "and their health (from its admin endpoint)")
    where = status.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", metavar="FILE",
                       help="ask the admin endpoint this port map configures")
    where.add_argument("--admin", metavar="HOST:PORT",
                       help=f"ask this admin endpoint (default: 127.0.0.1:{DEFAULT_ADMIN_PORT})")
    status.add_argument("--json", action="store_true", help="print the raw /status JSON")
    status.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long to wait for an answer (default: %(default)s)")
    status.set_defaults(func=cmd_status)

    health = sub.add_parser("healthcheck", help="exit 0 if the running cacheport's admin "
                            "endpoint (wherever the map puts it) answers healthy, else 1")
    where = health.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", metavar="FILE",
                       help="the port map cacheport runs with (its admin.listen is asked)")
    where.add_argument("--admin", type=_admin_address, metavar="HOST:PORT",
                       help="ask this admin endpoint instead")
    health.add_argument("--ready", action="store_true",
                        help="ask /readyz (serving and an upstream healthy) instead of /healthz")
    health.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                        help="how long to wait for an answer (default: %(default)s)")
    health.set_defaults(func=cmd_healthcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return EXIT_OK
    return code
