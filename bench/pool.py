"""``python -m bench pool RUN.json ...``: where cacheport stands over several runs, not one.

On a shared 2-vCPU machine a cell of one run's standing table moves between runs
by more than the 5 % that separates "matches" from "behind", and the best of four
peers is the minimum of four noisy figures. So this takes each run's figure per
target and column exactly as that run's own standing table does (paired with
direct inside the run), then the median of each target's figures over the runs,
and judges cacheport's median against the best peer's median.

Every run given must be of one topology; the commits and plans are listed so a
reader can see that the runs measured the same code the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import (
    PSS_GOAL_KB,
    PSS_LABEL,
    Summary,
    best_of,
    columns,
    median_of,
    pss_goal_row,
    table,
    tolerance_line,
    verdict,
)
from .runner import Record
from .targets import PEERS


class PoolError(Exception):
    """The runs cannot be pooled (unreadable, or of different topologies)."""


def load(path: Path) -> tuple[dict[str, Any], Summary]:
    try:
        doc = json.loads(path.read_text())
        records = [Record(**r) for r in doc["records"]]
        return doc, Summary(records, list(doc["targets"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PoolError(f"{path}: not a bench JSON report ({exc})") from exc


def pooled(runs: Sequence[tuple[dict[str, Any], Summary]], who: str = "cacheport") -> list[str]:
    """The markdown: the runs, then one row per column with each run's figure and the medians."""
    if not runs:
        raise PoolError("no runs given")
    topologies = {doc["topology"] for doc, _ in runs}
    if len(topologies) > 1:
        raise PoolError(f"runs of different topologies cannot be pooled: {sorted(topologies)}")
    lines = [f"## cacheport bench — {topologies.pop()} — {len(runs)} runs pooled", "",
             "Each run's figure is the one its own standing table shows; the pooled figure is "
             "the median over the runs, for cacheport and for each peer, and the best peer is "
             "the one whose median is best.", "", tolerance_line(), ""]
    lines += table(["run", "commit", "repetitions", "workloads", "load average at start"],
                   [[doc["started"], f"`{doc['commit'].get('short', '?')}`"
                     + (" (dirty)" if doc["commit"].get("dirty") else ""),
                     str(doc["plan"]["reps"]), _workloads(doc),
                     " ".join(f"{v:.1f}" for v in doc["machine"].get("loadavg_start", ()))]
                    for doc, _ in runs])
    labels: list[str] = []
    lower: dict[str, tuple[bool, float]] = {}
    each_run: list[dict[str, dict[str, float]]] = []  # per run: column -> target -> figure
    for _, s in runs:
        here: dict[str, dict[str, float]] = {}
        for col in columns(s):
            if col.label not in lower:
                labels.append(col.label)
                lower[col.label] = (col.lower_better, col.abs_tol)
            here[col.label] = {t: v for t in s.targets
                               if (t == who or t in PEERS) and (v := col.get(t)) is not None}
        each_run.append(here)
    rows: list[list[str]] = []
    pss_row: list[str] | None = None
    for label in labels:
        lower_better, abs_tol = lower[label]
        in_runs = [run.get(label, {}) for run in each_run]
        by_target = {t: m for t in {t for r in in_runs for t in r}
                     if (m := median_of(r[t] for r in in_runs if t in r)) is not None}
        mine = by_target.get(who)
        best = best_of(((v, t) for t, v in by_target.items() if t in PEERS), lower_better)
        if mine is None or best is None:
            continue
        each = ", ".join(f"{r[who]:,.2f}" if who in r else "-" for r in in_runs)
        rows.append([label, each, f"{mine:,.2f}", f"{best[0]:,.2f} ({best[1]})",
                     verdict(mine, best[0], lower_better, abs_tol),
                     _runs_level(in_runs, who, lower_better, abs_tol)])
        if label == PSS_LABEL:
            goal = pss_goal_row(mine)
            pss_row = [goal[0], "", goal[1], goal[2], goal[3], ""]
    if pss_row:
        rows.append(pss_row)
    lines += ["", *table(["column", f"{who}, each run", f"{who}, median",
                          "best peer, median", "verdict", "runs at matches or better"], rows)]
    behind = [r[0] for r in rows if r[4] in ("behind", "misses")]
    lines += ["", f"Behind in {len(behind)} of {len(rows)} rows"
              + (f": {'; '.join(behind)}." if behind else ".")
              + f" (PSS goal: at most {PSS_GOAL_KB:g} KB per idle connection.)"]
    return lines


def _runs_level(in_runs: list[dict[str, float]], who: str, lower_better: bool,
                abs_tol: float) -> str:
    """In how many runs the run's own standing table had ``who`` at "matches" or better."""
    level = judged = 0
    for run in in_runs:
        best = best_of(((v, t) for t, v in run.items() if t in PEERS), lower_better)
        if who in run and best is not None:
            judged += 1
            level += verdict(run[who], best[0], lower_better, abs_tol) != "behind"
    return f"{level} of {judged}"


def _workloads(doc: dict[str, Any]) -> str:
    seen: list[str] = []
    for r in doc["records"]:
        if r["workload"] not in seen:
            seen.append(r["workload"])
    return ", ".join(seen)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench pool",
                                     description="Where cacheport stands over several runs of one "
                                                 "topology, not one.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN.json")
    parser.add_argument("--who", default="cacheport", help="the target to judge")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    try:
        text = "\n".join(pooled([load(p) for p in args.runs], args.who)) + "\n"
    except PoolError as exc:
        print(f"bench pool: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0
