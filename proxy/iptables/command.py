"""``cacheport import-iptables`` / ``export-iptables``: the file and terminal I/O around
the pure parse and render steps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError, load_config, load_yaml, parse_config
from .parse import parse_rules
from .render import _count, render_iptables, render_yaml

EXIT_OK = 0
EXIT_CONFIG = 2


class InputError(Exception):
    """The rules could not be read; the message names the input."""


def read_input(name: str) -> tuple[str, str]:
    """Read ``name`` (``-`` is standard input) as UTF-8; returns (text, display name)."""
    label = "standard input" if name == "-" else name
    try:
        if name == "-":
            if sys.stdin.isatty():
                print("cacheport: reading iptables rules from the terminal; end with Ctrl-D",
                      file=sys.stderr)
            data = sys.stdin.buffer.read()
        else:
            data = Path(name).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{label}: is a directory, expected a file of iptables rules") from None
    except OSError as exc:
        raise InputError(f"{label}: cannot read: {exc.strerror}") from None
    try:
        return data.decode("utf-8"), label
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected the "
            "output of iptables-save or iptables -t nat -S") from None


def cmd_import(args: argparse.Namespace) -> int:
    """``cacheport import-iptables``: rules in, port map out, every leftover reported."""
    try:
        text, label = read_input(args.file)
    except InputError as exc:
        print(f"cacheport: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    listeners, untranslated = parse_rules(text)
    for item in untranslated:
        kind = "warning: skipped" if item.needed else "note: not needed"
        print(f"cacheport: {kind}: {label}:{item.line.number}: {item.reason}\n"
              f"    {item.line.text}", file=sys.stderr)
    if not listeners:
        found = f"{len(untranslated)} line(s) skipped" if untranslated else "no rules found"
        print(f"cacheport: {label}: no DNAT port forward could be translated ({found}); "
              "nothing written", file=sys.stderr)
        return EXIT_CONFIG
    document = render_yaml(listeners, untranslated, source=label)
    if not write_translated(document, args.output):
        return EXIT_CONFIG
    skipped = sum(1 for u in untranslated if u.needed)
    print(f"cacheport: {_count(len(listeners), 'listener')} from "
          f"{_count(sum(len(lc.lines) for lc in listeners), 'DNAT rule')}"
          f"{f' written to {args.output}' if args.output else ''}; {skipped} line(s) skipped, "
          f"{len(untranslated) - skipped} not needed", file=sys.stderr)
    return EXIT_OK


def write_translated(document: str, output: str | None) -> bool:
    """Check a translated port map with the loader every map goes through, then write it to
    ``output`` (stdout when None); False, with the reason on stderr, if either fails."""
    target = output or "<output>"
    try:
        parse_config(load_yaml(document, target), target)
    except ConfigError as exc:
        print(f"cacheport: the translated port map is not valid: {exc}", file=sys.stderr)
        return False
    if output:
        try:
            Path(output).write_text(document, encoding="utf-8")
        except OSError as exc:
            print(f"cacheport: {output}: cannot write: {exc.strerror}", file=sys.stderr)
            return False
    else:
        sys.stdout.write(document)
    return True


def cmd_export(args: argparse.Namespace) -> int:
    """``cacheport export-iptables``: the port map as DNAT rules."""
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"cacheport: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    text, warnings = render_iptables(config)
    sys.stdout.write(text)
    for warning in warnings:
        print(f"cacheport: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``import-iptables`` and ``export-iptables`` to the ``cacheport`` command."""
    imp = sub.add_parser(
        "import-iptables",
        help="translate iptables DNAT rules into a port map",
        description="Read iptables-save or `iptables -t nat -S` output, or the "
        "`iptables -t nat -A PREROUTING ... -j DNAT` commands themselves, and write the "
        "equivalent port map. Lines it cannot translate are listed as comments in the map "
        "and as warnings. Exit status 0 when at least one rule was translated, 2 when none "
        "was or the input cannot be read.",
    )
    imp.add_argument("file", nargs="?", default="-", metavar="FILE|-",
                     help="the rules (default: standard input)")
    imp.add_argument("-o", "--output", metavar="FILE",
                     help="write the port map to FILE instead of standard output")
    imp.set_defaults(func=cmd_import)
    exp = sub.add_parser(
        "export-iptables",
        help="print the iptables DNAT rules equivalent to a port map",
        description="Print one `iptables -t nat -A PREROUTING ... -j DNAT` rule per listener "
        "(one per allow entry), for comparison or as a fallback.",
    )
    exp.add_argument("file", metavar="FILE", help="YAML port map")
    exp.set_defaults(func=cmd_export)
