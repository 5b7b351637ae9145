"""``python -m bench SUBCOMMAND [...]``: the bench's one entry point.

Each subcommand is a module of this package with ``main(argv) -> int`` and its own
argument parser; this module only picks the module and hands it the rest of the
command line. Adding a subcommand is one line in ``SUBCOMMANDS``.

Without a subcommand (``python -m bench --quick``), ``run`` is meant, as before
the bench had subcommands. Exit status is the subcommand's: 0 done, 2 bad
arguments or a missing prerequisite, 130 interrupted.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# name -> (module, one line of help).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("bench.run", "direct vs cacheport vs HAProxy, nginx, socat (and DNAT with --netns): "
                         "the standing table"),
    "ab": ("bench.ab", "two cacheport configurations side by side (--a KEY=VALUE --b KEY=VALUE), "
                       "paired with direct"),
    "pool": ("bench.pool", "judge several runs' JSON of one topology together (medians)"),
    "tls": ("bench.tls", "TLS termination and origination (native, python) vs redis-server's "
                         "own TLS, stunnel, HAProxy, nginx"),
    "cluster": ("bench.cluster", "redis-cluster listeners (Python relay, native framing) vs "
                                 "a plain tcp listener vs twemproxy vs direct"),
    "scale": ("bench.scale", "1 to 3,000 checked listeners: the listener under test's GET/s and "
                             "latency, idle CPU vs HAProxy's checks, scrape, RSS, start, reload"),
    "admin-hold": ("bench.admin_hold", "how long /status, / and /metrics hold the event loop "
                                       "at 1,000-3,000 listeners (CPU time, in-process)"),
    "admin-http": ("bench.admin_http", "the admin endpoint's own HTTP/1.1 beside aiohttp's "
                                       "server: req/s, slow and huge requests, RSS"),
    "held": ("bench.held", "idle connections held up to the open-files limit (1 process, "
                           "workers: 2): memory and CPU per connection, accepts/s, latency"),
    "conformance": ("bench.conformance", "Redis's own test suite direct and through each kind of "
                                         "listener, compared test by test"),
    "arrival-order": ("bench.arrival_order", "how often a command sent second on another "
                                             "connection reaches Redis first"),
    "connlog": ("bench.connlog", "log_connections on vs off: new connections/s and p50, "
                                 "native engine and Python relay"),
    "soak": ("bench.soak.run", "many faults at once under mixed load; checks writes, errors per "
                               "fault, descriptors, RSS, log, /metrics"),
    "protocols": ("bench.protocols", "CPU cost of the sans-IO framers and rewriters (no sockets)"),
}
DEFAULT = "run"
EXIT_USAGE = 2


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: python -m bench SUBCOMMAND [options]   (python -m bench SUBCOMMAND --help)",
             "", "Subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", f"Without a subcommand, '{DEFAULT}' is meant. See bench/README.md."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args and not args[0].startswith("-"):
        name, rest = args[0], args[1:]
    else:
        name, rest = DEFAULT, args
    if name not in SUBCOMMANDS:
        print(f"bench: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(SUBCOMMANDS[name][0])
    code: int = module.main(rest)
    return code
