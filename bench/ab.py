"""``python -m bench ab --a KEY=VALUE ... --b KEY=VALUE ...``: two cacheport configurations.

The A/B that one-off scripts used to do (copy modes, worker counts, busy_poll,
buffer sizes), done by ``run``'s own machinery: the same workloads, clients,
rotation and pairing with ``direct``, so the two sides are measured exactly as
the standing table measures cacheport. ``cacheport-a`` gets the ``--a`` keys and
``cacheport-b`` the ``--b`` keys (none: cacheport as shipped); peers can be added
with ``--targets``. The report ends with B judged against A, column by column.

    python -m bench ab --a copy=buffer --b copy=splice --backends redis
    python -m bench ab --a workers=1 --b workers=2 --workloads throughput
    python -m bench ab --b busy_poll=off --netns
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from .run import add_common_arguments, guarded, parse_csv, parse_settings, run
from .targets import ALL_TARGETS, TOP_LEVEL_KEYS, Cacheport, Target

SIDES = ("cacheport-a", "cacheport-b")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench ab", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Two cacheport configurations side by side, through run's workloads and "
                    "paired with direct; the report ends with B judged against A.",
        epilog=f"Keys {', '.join(TOP_LEVEL_KEYS)} go to the top of the port map,\nany other "
               "into defaults:; values are YAML.\n\nexamples:\n"
               + "\n".join(line for line in __doc__.splitlines() if "python -m bench ab --" in line
                           and "KEY=VALUE" not in line))
    p.add_argument("--a", nargs="*", default=[], metavar="KEY=VALUE",
                   help="port-map keys of side A (default: none, cacheport as shipped)")
    p.add_argument("--b", nargs="*", default=[], metavar="KEY=VALUE",
                   help="port-map keys of side B")
    p.add_argument("--targets", type=lambda v: parse_csv(v, ALL_TARGETS, "target"), default=(),
                   help="more targets beside direct and the two sides, e.g. haproxy-tuned")
    add_common_arguments(p)
    return p


def sides(a: Sequence[str], b: Sequence[str]) -> dict[str, Target]:
    """The two cacheport targets, described by their keys."""
    out: dict[str, Target] = {}
    for name, flag, items in ((SIDES[0], "--a", a), (SIDES[1], "--b", b)):
        pairs = parse_settings(items, flag)
        text = ", ".join(f"{k}: {v}" for k, v in pairs) or "as shipped"
        out[name] = Cacheport(name, f"cacheport ({text})",
                              {k: yaml.safe_load(v) for k, v in pairs})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = ["ab", *argv]

    def body() -> int:
        extra = sides(args.a, args.b)
        args.targets = ("direct", *SIDES, *(t for t in args.targets
                                             if t not in ("direct", *SIDES)))
        return run(args, extra, compare=SIDES)

    return guarded(body)
